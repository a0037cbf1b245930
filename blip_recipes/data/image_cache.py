"""The resized-image cache (`image_cache: true`): each image decoded and resized once into a memory-mapped file."""

import contextlib
import glob
import logging
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..builtin import cache_root
from ..checkpoints import process_is_gone
from ..transforms import ImageTransform
from .records import CaptionSplit, split_fingerprint
from .sources import DataError

logger = logging.getLogger(__name__)


def image_cache_dir() -> str:
    return os.path.join(cache_root(), "resized-images")


class CacheSpaceError(DataError):
    """The cache would not fit on its disk; the message says how much it needs and where."""


def remove_abandoned_staging(final: str) -> None:
    """Staging files of `final` left by a process of this host that is gone (SIGKILL, OOM): each is as large as
    the cache. Another host's (a cache directory shared over NFS) may still be filling; those are left alone."""
    for path in glob.glob(glob.escape(final) + ".*.tmp"):
        owner = path[len(final) + 1 : -len(".tmp")]
        staging_host, _, pid = owner.rpartition(".")
        if process_is_gone(staging_host, pid):
            with contextlib.suppress(OSError):
                os.remove(path)
                logger.warning("removed %s, left by a process that is gone", path)


def check_free_space(directory: str, nbytes: int, label: str) -> None:
    """Say how large the cache will be, and refuse before writing when its disk lacks the space (COCO at 384 px is
    ~50 GB): a full disk halfway through would also starve checkpoints."""
    free = shutil.disk_usage(directory).free
    logger.info("resized-image cache for split %r: %s in %s (%s free)", label, _size(nbytes), directory, _size(free))
    if nbytes > free * 0.95:
        raise CacheSpaceError(
            f"image_cache: split {label!r} needs {_size(nbytes)} in {directory}, which has {_size(free)} free; "
            "free space, point BLIP_RECIPES_CACHE at a larger disk, or set image_cache: false"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


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
            remove_abandoned_staging(final)
            check_free_space(directory, len(split.records) * 3 * height * width, split.label)
            staging = f"{final}.{socket.gethostname()}.{os.getpid()}.tmp"
            try:
                cls._fill(staging, split, transform, workers)
                os.replace(staging, final)
            except BaseException:  # an error, Ctrl-C or SIGTERM: a half-filled cache (COCO: ~50 GB) is not left behind
                with contextlib.suppress(OSError):
                    os.remove(staging)
                raise
            logger.info("cached %d resized images of split %r in %s", len(split.records), split.name, final)
        return cls(final)

    @staticmethod
    def _fill(staging: str, split: CaptionSplit, transform: ImageTransform, workers: int | None) -> None:
        height, width = transform.size
        array = np.lib.format.open_memmap(
            staging, mode="w+", dtype=np.uint8, shape=(len(split.records), 3, height, width)
        )

        def fill(position: int) -> None:
            array[position] = transform(split.table.load(split.records[position].row)).numpy()

        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
            filled = pool.map(fill, range(len(split.records)))
            list(tqdm(filled, total=len(split.records), desc=f"caching resized images ({split.label})", leave=False))
        array.flush()
