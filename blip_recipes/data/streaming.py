"""Streaming training data (`streaming: true`): WebDataset tar shards, or any source `datasets` can stream.

Nothing is decoded before step 1. A training stream is an endless sequence of passes; pass `e` of reader `r` (one
reader per process x DataLoader worker) is:

1. the shards in an order drawn from (seed, e);
2. with at least as many shards as readers, reader `r` reads shards r, r + readers, ... of that order; with fewer,
   every reader walks all of them and keeps samples r, r + readers, ... (it reads the others' tar headers or rows,
   never their images). Either way each sample is read by exactly one reader per pass and none is dropped;
   readers whose shards are larger take longer over their pass (the stream never ends, so nobody waits);
3. a shuffle buffer of `shuffle_buffer_size` samples, drawn from (seed, e, r). It holds references (tar offsets,
   rows), not decoded images, so the position in the stream can be replayed without decoding anything;
4. one training item per (image, caption), the image decoded once for all its captions.

The reader's position (pass, sample, caption) is its `state_dict`; torchdata's StatefulDataLoader collects it with
every batch, checkpoints.StreamPositionCallback saves it in each checkpoint, and a resume replays the references to
that position (tar headers and rows only) and goes on: the same items as a run that never stopped. Bad samples are
skipped and counted as they are met, each logged with its key and reason; past `max_bad_samples_fraction` the run
stops.

Why our own reader rather than `datasets`' webdataset streaming: its shuffle buffer holds decoded samples and is lost
on resume (its documentation says a resumed stream differs), accelerate would make every process read every sample
of a plain torch IterableDataset, and it decodes images that another reader's split then discards. Sources other
than tar shards are streamed by `datasets` itself (`load_dataset(..., streaming=True)`, shards = its files).
"""

import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..transforms import MAX_IMAGE_PIXELS, BadImageError, ImageTransform, open_image
from .datasets import blip_caption
from .sources import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
MIN_SAMPLES_BEFORE_LIMIT = 100  # the bad fraction is judged once a reader has read this many samples


@dataclass(frozen=True)
class Sample:
    """A reference to one sample: where its image and captions are, nothing decoded."""

    key: str
    shard: str
    image: object  # ("tar", offset, size) in `shard`, or a dataset row's image value
    captions: object  # ("tar", offset, size, extension), or a dataset row's caption value
    problem: str | None = None  # known bad before decoding (a tar sample without image or caption)


class TarShard:
    """One WebDataset shard: files named KEY.EXT, the files of a sample next to each other."""

    def __init__(self, path: str):
        self.path = path
        self.name = path

    def samples(self) -> Iterator[Sample]:
        with tarfile.open(self.path, "r:") as archive:
            key, files = None, {}
            while True:
                member = archive.next()
                archive.members = []  # tarfile keeps every header it read: RSS would grow with the shard
                if member is None or (member.isfile() and _split_name(member.name)[0] != key):
                    if key is not None:
                        yield self._sample(key, files)
                    if member is None:
                        return
                    key, files = _split_name(member.name)[0], {}
                if member.isfile():
                    files[_split_name(member.name)[1]] = (member.offset_data, member.size)

    def _sample(self, key: str, files: dict) -> Sample:
        image = next((("tar", *files[ext]) for ext in IMAGE_EXTENSIONS if ext in files), None)
        captions = next((("tar", *files[ext], ext) for ext in CAPTION_EXTENSIONS if ext in files), None)
        problem = None
        if image is None:
            problem = f"no image file ({'/'.join(IMAGE_EXTENSIONS)}) among {sorted(files)}"
        elif captions is None:
            problem = f"no caption file ({'/'.join(CAPTION_EXTENSIONS)}) among {sorted(files)}"
        return Sample(key, self.path, image, captions, problem)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the extension the rest."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


class DatasetShard:
    """One shard (file) of a source `datasets` streams; image values are read undecoded."""

    def __init__(self, dataset, index: int, count: int, name: str, image_column: str, caption_column: str):
        self.dataset, self.index, self.count = dataset, index, count
        self.name = f"{name}[shard {index}]"
        self.image_column, self.caption_column = image_column, caption_column

    def samples(self) -> Iterator[Sample]:
        for row, values in enumerate(self.dataset.shard(num_shards=self.count, index=self.index)):
            yield Sample(f"{self.name} row {row}", self.name, values.get(self.image_column),
                         values.get(self.caption_column))  # fmt: skip


_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard-list notation: `shard-{000..099}.tar` (zero-padded ranges) and `{a,b}` alternatives."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def find_shards(dataset_name: str) -> list[str] | None:
    """The .tar shards `dataset_name` names (a directory holding them, a glob, a brace list such as
    `shard-{000..099}.tar`, or one file), sorted; else None."""
    path = os.path.expanduser(dataset_name)
    if "{" in path and path.endswith(".tar"):
        found = expand_braces(path)
        missing = [name for name in found if not os.path.isfile(name)]
        if missing:
            raise DataError(f"dataset_name {dataset_name}: {len(missing)} of {len(found)} shards do not exist, e.g. "
                            f"{missing[0]}")  # fmt: skip
        return found
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        return found or None
    if any(character in path for character in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise DataError(f"dataset_name {dataset_name}: the pattern matches no file")
        if not all(name.endswith(".tar") for name in found):
            raise DataError(f"dataset_name {dataset_name}: the pattern matches files that are not .tar shards")
        return found
    return [path] if path.endswith(".tar") and os.path.isfile(path) else None


def stream_shards(data_args) -> list:
    """The shards of `dataset_name`'s training split, to stream."""
    tar_files = find_shards(data_args.dataset_name)
    if tar_files is not None:
        return [TarShard(path) for path in tar_files]
    import datasets

    from .sources import (
        _load_dataset_repo_folder,
        _resolve_source,
        check_hub_keys_for_local,
        file_builder,
        is_dataset_repo_folder,
        read_hub_dataset,
    )

    source = _resolve_source(data_args.dataset_name)
    if os.path.exists(source):
        check_hub_keys_for_local(data_args)
    if os.path.isfile(source):
        builder = file_builder(source)
        if builder is None:
            raise DataError(f"{source}: cannot stream this file; use .tar shards, .json, .jsonl or .csv")
        loaded = datasets.load_dataset(builder, data_files={"train": source}, streaming=True)
    elif is_dataset_repo_folder(source):
        loaded = _load_dataset_repo_folder(source, data_args, streaming=True)
    elif os.path.isdir(source):
        loaded = datasets.load_dataset("imagefolder", data_dir=source, streaming=True)
    else:
        loaded = read_hub_dataset(source, data_args, streaming=True)
    if data_args.train_split not in loaded:
        raise DataError(f"{source}: no split {data_args.train_split!r} (splits: {', '.join(loaded)}); set train_split")
    dataset = loaded[data_args.train_split]
    features = dataset.features or {}
    if isinstance(features.get(data_args.image_column), datasets.Image):
        dataset = dataset.cast_column(data_args.image_column, datasets.Image(decode=False))
    return [
        DatasetShard(dataset, index, dataset.num_shards, source, data_args.image_column, data_args.caption_column)
        for index in range(dataset.num_shards)
    ]


class CaptionStream(torch.utils.data.IterableDataset):
    """Endless (image, caption) training items from `shards`, split over processes and DataLoader workers."""

    def __init__(
        self, shards: list, transform: ImageTransform, seed: int, process_index: int = 0, num_processes: int = 1,
        buffer_size: int = 1000, caption_preprocessing: str = "none", image_root: str | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS, max_bad_fraction: float = 0.01,
    ):  # fmt: skip
        if not shards:
            raise DataError("streaming: no shards to read")
        self.shards = shards
        self.transform = transform
        self.seed = seed
        self.process_index, self.num_processes = process_index, num_processes
        self.buffer_size = max(1, buffer_size)
        self.clean = blip_caption if caption_preprocessing == "blip" else (lambda caption: caption)
        self.image_root = image_root
        self.max_pixels = max_pixels
        self.max_bad_fraction = max_bad_fraction
        self.position = {"pass": 0, "sample": 0, "caption": 0, "read": 0, "bad": 0}
        self.reader = None  # (reader, readers), known once iteration starts in the worker

    # -- the order of samples -------------------------------------------------------------------------------------

    def _readers(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.process_index * workers + worker, self.num_processes * workers

    def references(self, epoch: int, reader: int, readers: int) -> Iterator[Sample]:
        """Reader `reader`'s samples of pass `epoch`, in training order (module docstring, steps 1-3)."""
        order = list(self.shards)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        if len(order) >= readers:
            mine = (sample for shard in order[reader::readers] for sample in shard.samples())
        else:
            everything = (sample for shard in order for sample in shard.samples())
            mine = (sample for index, sample in enumerate(everything) if index % readers == reader)
        rng = random.Random(f"{self.seed}/{epoch}/{reader}")
        buffer: list[Sample] = []
        for sample in mine:
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            yield buffer[slot]
            buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer

    # -- iteration, resumable ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {**self.position, "reader": self.reader}

    def load_state_dict(self, state: dict) -> None:
        self.position = {key: state[key] for key in ("pass", "sample", "caption", "read", "bad")}
        self.reader = state.get("reader")

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self._readers()
        if self.reader is not None and tuple(self.reader) != (reader, readers):
            raise DataError(
                f"streaming resume: the checkpoint's position belongs to reader {self.reader[0]} of "
                f"{self.reader[1]}, this is reader {reader} of {readers}; resume with the same number of processes "
                "and dataloader_num_workers"
            )
        self.reader = [reader, readers]
        position = self.position
        while True:
            for index, sample in enumerate(self.references(position["pass"], reader, readers)):
                if index < position["sample"]:
                    continue  # before the resumed position: replayed, not decoded
                loaded = self._load(sample, counted=position["caption"] > 0)
                if loaded is None:
                    position.update(sample=index + 1, caption=0)
                    continue
                image, captions = loaded
                for number in range(position["caption"], len(captions)):
                    item = {"pixel_values": self.transform(image), "caption": captions[number]}
                    if number + 1 < len(captions):
                        position.update(sample=index, caption=number + 1)
                    else:
                        position.update(sample=index + 1, caption=0)
                    yield item
            position.update({"pass": position["pass"] + 1, "sample": 0, "caption": 0})

    def _load(self, sample: Sample, counted: bool = False):
        """(RGB image, captions), or None for a bad sample (logged, counted, and the run stopped past the limit).

        `counted`: the sample was read before (a resume between two of its captions) and is not counted again."""
        position = self.position
        position["read"] += 0 if counted else 1
        try:
            if sample.problem is not None:
                raise BadImageError(sample.problem)
            captions = _captions(self._read(sample, sample.captions) if _in_tar(sample.captions) else sample.captions)
            captions = [self.clean(caption) for caption in captions]
            if not all(caption.strip() for caption in captions):
                raise BadImageError("an empty caption")
            source = self._read(sample, sample.image) if _in_tar(sample.image) else sample.image
            return open_image(source, self.image_root, self.max_pixels), captions
        except (BadImageError, DataError, OSError, ValueError) as error:
            position["bad"] += 1
            logger.warning("streaming: skipped sample %s of %s: %s (%d bad of %d read by this reader)", sample.key,
                           sample.shard, error, position["bad"], position["read"])  # fmt: skip
            if position["read"] >= MIN_SAMPLES_BEFORE_LIMIT and position["bad"] > self.max_bad_fraction * position[
                "read"
            ]:  # fmt: skip
                raise DataError(
                    f"streaming: {position['bad']} of {position['read']} samples read were bad, more than "
                    f"max_bad_samples_fraction={self.max_bad_fraction}; the last: {sample.key} in {sample.shard} "
                    f"({error})"
                ) from None
            return None

    @staticmethod
    def _read(sample: Sample, where) -> bytes:
        _, offset, size = where[:3]
        with open(sample.shard, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)


def _in_tar(value) -> bool:
    return isinstance(value, tuple) and len(value) >= 3 and value[0] == "tar"


def _captions(value) -> list[str]:
    """One caption or a list, from a .txt/.json file's bytes or a row's value."""
    if isinstance(value, (bytes, bytearray)):
        text = value.decode("utf-8")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
    if isinstance(value, dict):
        value = next((value[key] for key in ("captions", "caption", "text") if key in value), None)
    if isinstance(value, str):
        value = [value.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(caption, str) for caption in value):
        raise DataError(f"captions must be text or a list of texts, got {type(value).__name__}")
    return value


def write_shards(samples, directory: str, samples_per_shard: int, prefix: str = "shard") -> list[str]:
    """Write (key, image bytes, image extension, captions) samples as WebDataset shards; returns their paths.

    The way to turn any dataset into shards for `streaming: true` (benchmarks and tests use it too)."""
    os.makedirs(directory, exist_ok=True)
    paths, archive, count = [], None, 0
    for key, image_bytes, extension, captions in samples:
        if archive is None or count == samples_per_shard:
            if archive is not None:
                archive.close()
            paths.append(os.path.join(directory, f"{prefix}-{len(paths):05d}.tar"))
            archive, count = tarfile.open(paths[-1], "w"), 0
        text = captions if isinstance(captions, str) else json.dumps(captions)
        caption_extension = "txt" if isinstance(captions, str) else "json"
        for name, payload in ((f"{key}.{extension}", image_bytes), (f"{key}.{caption_extension}", text.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        count += 1
    if archive is not None:
        archive.close()
    return paths
