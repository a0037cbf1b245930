"""The resized-image cache (`image_cache: true`): each image decoded and resized once into a memory-mapped file."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..builtin import cache_root
from ..transforms import ImageTransform
from .records import CaptionSplit, split_fingerprint

logger = logging.getLogger(__name__)


def image_cache_dir() -> str:
    return os.path.join(cache_root(), "resized-images")


class ResizedImageCache:
    """A split's images decoded and resized once into a uint8 (N, 3, H, W) .npy file, read through a memory map.

    Later epochs, evaluations and runs read pixels instead of decoding JPEGs; worker processes share the pages.
    The file name hashes the images' identity (path, size, mtime or row) and the target size, so a change to
    either builds a new file. Only for deterministic transforms (no augmentation).
    """

    def __init__(self, path: str):
        self.path = path
        self._array = None

    def __getstate__(self):  # pickled by path: a spawned worker re-opens the map instead of copying the array
        return {"path": self.path, "_array": None}

    @property
    def array(self):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index]))

    @classmethod
    def build(cls, split: CaptionSplit, transform: ImageTransform, directory: str, workers: int | None = None):
        os.makedirs(directory, exist_ok=True)
        height, width = transform.size
        key = split_fingerprint(split, height, width, transform.resample)
        final = os.path.join(directory, f"{key}.npy")
        if not os.path.isfile(final):
            staging = f"{final}.{os.getpid()}.tmp"
            array = np.lib.format.open_memmap(
                staging, mode="w+", dtype=np.uint8, shape=(len(split.records), 3, height, width)
            )

            def fill(position: int) -> None:
                array[position] = transform(split.table.load(split.records[position].row)).numpy()

            with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
                list(pool.map(fill, range(len(split.records))))
            array.flush()
            del array
            os.replace(staging, final)
            logger.info("cached %d resized images of split %r in %s", len(split.records), split.name, final)
        return cls(final)
