"""Caption datasets: load any supported source, check every row before training, serve images to the collator.

A split becomes a list of `ImageRecord`s (one per image, with all of its captions) over an `ImageTable` that
decodes images by row. Training iterates (image, caption) pairs, so every caption is trained on; evaluation
iterates images, so each image is captioned once and scored against all of its references.
"""

import hashlib
import json
import logging
import math
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .builtin import cache_root, is_builtin, resolve_builtin
from .transforms import BadImageError, ImageTransform, open_image, resolve_image_path

logger = logging.getLogger(__name__)

MAX_LISTED_BAD_ROWS = 20


class DataError(ValueError):
    """Unusable data; the message names the dataset, split, row and column."""


@dataclass
class ImageRecord:
    row: int
    image_id: str
    captions: list[str]


@dataclass
class BadRow:
    split: str
    row: int
    where: str
    reason: str

    def __str__(self) -> str:
        return f"  split {self.split!r} row {self.row} ({self.where}): {self.reason}"


class ImageTable:
    """Random access to the images of one split, by row; decoding errors become `BadImageError`."""

    def __init__(self, dataset, image_column: str, image_root: str | None):
        self.dataset = dataset
        self.image_column = image_column
        self.image_root = image_root

    def raw(self, row: int):
        return self.dataset[row][self.image_column]

    def describe(self, row: int) -> str:
        value = self.raw(row)
        if isinstance(value, dict):
            return value.get("path") or f"row {row} bytes"
        return value if isinstance(value, str) else f"row {row}"

    def load(self, row: int):
        return open_image(self.raw(row), self.image_root)


@dataclass
class CaptionSplit:
    name: str
    table: ImageTable
    records: list[ImageRecord]


def _resolve_source(dataset_name: str) -> str:
    return resolve_builtin(dataset_name) if is_builtin(dataset_name) else dataset_name


def load_raw_splits(data_args) -> tuple[dict, str | None]:
    """dataset_name -> ({split: datasets.Dataset}, default image root)."""
    source = _resolve_source(data_args.dataset_name)
    if os.path.isfile(source) and os.path.getsize(source) == 0:
        raise DataError(f"{source}: empty file, no rows")
    try:
        return _load_raw_splits(source, data_args)
    except DataError:
        raise
    except Exception as error:  # datasets raises anything from StopIteration to pyarrow errors on bad files
        raise DataError(f"{source}: could not load the dataset ({type(error).__name__}: {error})") from error


def _load_raw_splits(source: str, data_args) -> tuple[dict, str | None]:
    import datasets

    if os.path.isfile(source):
        from .coco import is_coco_karpathy_file, load_coco_karpathy_file

        if is_coco_karpathy_file(source):
            return load_coco_karpathy_file(source), os.path.dirname(os.path.abspath(source))
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise DataError(f"{source}: unsupported data file; use .json, .jsonl or .csv (or a directory)")
        loaded = datasets.load_dataset(builder, data_files={"train": source})
        return dict(loaded), os.path.dirname(os.path.abspath(source))
    if os.path.isdir(source):
        from .coco import is_lavis_karpathy_dir, load_lavis_karpathy_dir

        if os.path.isfile(os.path.join(source, "dataset_dict.json")) or os.path.isfile(
            os.path.join(source, "state.json")
        ):
            loaded = datasets.load_from_disk(source)
            return (dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}), source
        if is_lavis_karpathy_dir(source):
            return load_lavis_karpathy_dir(source), source
        split_files = _split_files(source)
        if split_files:
            builder = "csv" if next(iter(split_files.values())).endswith(".csv") else "json"
            return dict(datasets.load_dataset(builder, data_files=split_files)), source
        if _has_imagefolder_metadata(source):
            return dict(datasets.load_dataset("imagefolder", data_dir=source)), source
        raise DataError(
            f"{source}: directory is neither a save_to_disk dataset, an imagefolder with metadata.jsonl/metadata.csv, "
            "nor split files (train.jsonl, validation.jsonl, ...)"
        )
    loaded = datasets.load_dataset(source, data_args.dataset_config_name, revision=data_args.dataset_revision)
    return dict(loaded), None


def _split_files(directory: str) -> dict[str, str]:
    found = {}
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in (".json", ".jsonl", ".csv") and stem in ("train", "validation", "val", "test"):
            found[stem] = os.path.join(directory, name)
    return found


def _has_imagefolder_metadata(directory: str) -> bool:
    for _root, _dirs, files in os.walk(directory):
        if "metadata.jsonl" in files or "metadata.csv" in files:
            return True
    return False


def _prepare_table(dataset, split: str, data_args, default_root: str | None, source: str) -> ImageTable:
    import datasets

    for column in (data_args.image_column, data_args.caption_column, data_args.image_id_column):
        if column and column not in dataset.column_names:
            raise DataError(
                f"{source}: split {split!r} has no column {column!r} (columns: {', '.join(dataset.column_names)}); "
                "set image_column / caption_column / image_id_column in the recipe"
            )
    feature = dataset.features[data_args.image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        # Decoding ourselves gives row-level error messages, EXIF orientation and safe mode conversion.
        dataset = dataset.cast_column(data_args.image_column, datasets.Image(decode=False))
    return ImageTable(dataset, data_args.image_column, data_args.image_root or default_root)


_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def blip_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS' BlipCaptionProcessor.pre_caption: lowercase, punctuation to spaces, at most `max_words` words."""
    caption = _BLIP_PUNCTUATION.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def _caption_list(value) -> tuple[list[str], str | None]:
    """A cell -> (usable captions, reason when there are none)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    captions, reasons = [], []
    for item in values:
        if item is None:
            reasons.append("caption is None")
        elif not isinstance(item, str):
            reasons.append(f"caption is {type(item).__name__}, not text")
        elif not item.strip():
            reasons.append("caption is empty")
        else:
            captions.append(" ".join(item.split()))
    if captions:
        return captions, None
    return [], reasons[0] if reasons else "no captions"


def build_records(table: ImageTable, split: str, data_args) -> tuple[list[ImageRecord], list[BadRow]]:
    """Group rows into images (by image_id_column, else by path, else one image per row) and check captions."""
    dataset = table.dataset
    captions_column = dataset[data_args.caption_column]
    if data_args.image_id_column:
        keys = [str(key) for key in dataset[data_args.image_id_column]]
    elif _is_string_column(dataset, table.image_column):
        keys = [str(path) for path in dataset[table.image_column]]
    else:
        keys = [f"{split}-{row}" for row in range(len(dataset))]
    records: dict[str, ImageRecord] = {}
    bad: list[BadRow] = []
    for row, (key, cell) in enumerate(zip(keys, captions_column)):
        captions, reason = _caption_list(cell)
        if reason:
            bad.append(BadRow(split, row, f"{data_args.caption_column}={cell!r}"[:80], reason))
            continue
        if key in records:
            records[key].captions.extend(captions)
        else:
            records[key] = ImageRecord(row=row, image_id=key, captions=captions)
    return list(records.values()), bad


def _is_string_column(dataset, column: str) -> bool:
    feature = dataset.features[column]
    return getattr(feature, "dtype", None) in ("string", "large_string")


def find_bad_images(table: ImageTable, records: list[ImageRecord], split: str, workers: int | None) -> list[BadRow]:
    def check(record: ImageRecord):
        try:
            table.load(record.row)
        except BadImageError as error:
            return BadRow(split, record.row, table.describe(record.row), str(error))
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        return [bad for bad in pool.map(check, records) if bad is not None]


def _report_bad_rows(bad: list[BadRow], skip: bool, source: str) -> None:
    if not bad:
        return
    if not skip:
        listed = "\n".join(str(row) for row in bad[:MAX_LISTED_BAD_ROWS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more" if len(bad) > MAX_LISTED_BAD_ROWS else ""
        raise DataError(
            f"{source}: {len(bad)} bad row(s) found before training:\n{listed}{more}\n"
            "Fix them, or set skip_bad_samples: true to train and evaluate without them."
        )
    for row in bad:
        logger.warning("skipping bad sample:%s", row)
    logger.warning("skipped %d bad sample(s) in %s", len(bad), source)


@dataclass
class CaptionData:
    train: CaptionSplit | None
    evaluation: CaptionSplit | None
    test: CaptionSplit | None


def load_caption_splits(data_args, seed: int, need_eval: bool, need_train: bool = True) -> CaptionData:
    """Load, group, validate and (when needed) hold out an evaluation part. Raises DataError before training."""
    raw, default_root = load_raw_splits(data_args)
    source = data_args.dataset_name

    def require(name: str, key: str) -> str:
        if name not in raw:
            raise DataError(f"{source}: no split {name!r} (splits: {', '.join(raw)}); set {key}")
        return name

    eval_name = data_args.eval_split
    if eval_name is not None:
        require(eval_name, "eval_split")
    elif "validation" in raw:
        eval_name = "validation"
    elif not need_train and "test" in raw:
        eval_name = "test"
    train = evaluation = test = None
    bad_rows: list[BadRow] = []
    if need_train:
        train = _load_split(
            raw, require(data_args.train_split, "train_split"), data_args, default_root, source, bad_rows
        )
    if need_eval and eval_name is not None:
        evaluation = _load_split(raw, eval_name, data_args, default_root, source, bad_rows)
    elif need_eval and train is None:
        raise DataError(f"{source}: no split to evaluate (splits: {', '.join(raw)}); name one with --split/eval_split")
    elif need_eval:
        if data_args.validation_split_percentage <= 0:
            raise DataError(
                f"{source}: evaluation is requested but the dataset has no 'validation' split and "
                "validation_split_percentage is 0; set eval_split or validation_split_percentage"
            )
        train, evaluation = _hold_out(train, data_args.validation_split_percentage, seed, source)
    if data_args.test_split is not None:
        test = _load_split(raw, require(data_args.test_split, "test_split"), data_args, default_root, source, bad_rows)

    if train is not None and data_args.max_train_samples is not None:
        train.records = train.records[: data_args.max_train_samples]
    for split in (evaluation, test):
        if split is not None and data_args.max_eval_samples is not None:
            split.records = split.records[: data_args.max_eval_samples]
    splits = [split for split in (train, evaluation, test) if split is not None]
    if data_args.validate_images:
        for split in splits:
            bad = find_bad_images(split.table, split.records, split.name, data_args.preprocessing_num_workers)
            unusable = {row.row for row in bad}
            split.records = [record for record in split.records if record.row not in unusable]
            bad_rows.extend(bad)
    # Captions and images of every split are checked before anything is reported: one complete list.
    _report_bad_rows(sorted(bad_rows, key=lambda row: (row.split, row.row)), data_args.skip_bad_samples, source)
    for split in splits:
        if not split.records:
            raise DataError(f"{source}: split {split.name!r} has no usable rows")
    return CaptionData(train, evaluation, test)


def _load_split(raw: dict, name: str, data_args, default_root, source: str, bad_rows: list) -> CaptionSplit:
    """Records of rows with usable captions; rows without one go to `bad_rows`."""
    table = _prepare_table(raw[name], name, data_args, default_root, source)
    records, bad_captions = build_records(table, name, data_args)
    bad_rows.extend(bad_captions)
    return CaptionSplit(name, table, records)


def _hold_out(train: CaptionSplit, percentage: float, seed: int, source: str):
    if len(train.records) < 2:
        raise DataError(f"{source}: need at least 2 images to hold out an evaluation split")
    order = list(range(len(train.records)))
    random.Random(seed).shuffle(order)
    count = min(len(order) - 1, max(1, math.ceil(len(order) * percentage / 100)))
    held = set(order[:count])
    kept = [record for index, record in enumerate(train.records) if index not in held]
    evaluated = [record for index, record in enumerate(train.records) if index in held]
    logger.info("held out %d of %d training images for evaluation", count, len(order))
    return CaptionSplit(train.name, train.table, kept), CaptionSplit(f"{train.name}[held-out]", train.table, evaluated)


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
        identity = [split.name, height, width, transform.resample]
        for record in split.records:
            raw = split.table.raw(record.row)
            path = raw if isinstance(raw, str) else (raw.get("path") if isinstance(raw, dict) else None)
            resolved = resolve_image_path(path, split.table.image_root) if path else None
            if resolved and os.path.exists(resolved):
                stat = os.stat(resolved)
                identity.append([resolved, stat.st_size, stat.st_mtime_ns])
            elif isinstance(raw, dict) and raw.get("bytes"):
                identity.append(hashlib.sha1(raw["bytes"]).hexdigest())
            else:
                identity.append([record.image_id, record.row, repr(raw)[:200]])
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
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


class CaptionTrainDataset(torch.utils.data.Dataset):
    """One item per (image, caption): every reference caption is a training target.

    With `feature_rows` an item names its image's position in the split ("feature_row") instead of carrying pixels:
    the vision features were computed once (feature_cache.py) and the model looks them up.
    """

    def __init__(
        self, split: CaptionSplit, transform: ImageTransform, caption_preprocessing: str = "none",
        cache: ResizedImageCache | None = None, feature_rows: bool = False,
    ):  # fmt: skip
        self.split = split
        self.transform = transform
        self.cache = cache
        self.feature_rows = feature_rows
        clean = blip_caption if caption_preprocessing == "blip" else (lambda caption: caption)
        self.pairs = [
            (position, clean(caption)) for position, record in enumerate(split.records) for caption in record.captions
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        position, caption = self.pairs[index]
        if self.feature_rows:
            return {"feature_row": position, "caption": caption}
        return {"pixel_values": _pixels(self.split, self.transform, self.cache, position), "caption": caption}


def _pixels(split: CaptionSplit, transform: ImageTransform, cache, position: int) -> torch.Tensor:
    if cache is not None:
        return cache[position]
    return transform(split.table.load(split.records[position].row))


class CaptionEvalDataset(torch.utils.data.Dataset):
    """One item per image, with every reference."""

    def __init__(self, split: CaptionSplit, transform: ImageTransform, cache: ResizedImageCache | None = None):
        self.split = split
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.split.records)

    def record(self, index: int) -> ImageRecord:
        return self.split.records[index]

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": _pixels(self.split, self.transform, self.cache, index), "index": index}

    def load_image(self, index: int):
        return self.split.table.load(self.split.records[index].row)
