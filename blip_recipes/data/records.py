"""Records and checks: raw splits -> one `ImageRecord` per image (all of its captions), every row checked.

A split becomes a list of `ImageRecord`s over an `ImageTable` that decodes images by row. Captions and images of
every split are checked before training and reported in one complete list (or skipped with `skip_bad_samples`);
without an eval split, a share of the training images (by image, never by row) is held out.
"""

import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..transforms import BadImageError, open_image
from .sources import DataError, load_raw_splits

logger = logging.getLogger(__name__)

MAX_LISTED_BAD_ROWS = 20


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
    """One split's images. `held_out`: the evaluation part held out of the `name` split (no eval split given)."""

    name: str
    table: ImageTable
    records: list[ImageRecord]
    held_out: bool = False

    @property
    def label(self) -> str:
        """How results name this split (model card, logs)."""
        return f"{self.name} (held-out part)" if self.held_out else self.name


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
    return CaptionSplit(train.name, train.table, kept), CaptionSplit(train.name, train.table, evaluated, held_out=True)
