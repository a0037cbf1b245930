"""Records and checks: raw splits -> one `ImageRecord` per image (all of its captions), every row checked.

A split becomes a list of `ImageRecord`s over an `ImageTable` that decodes images by row. Captions and images of
every split are checked before training and reported in one complete list (or skipped with `skip_bad_samples`);
without an eval split, a share of the training images (by image, never by row) is held out.
"""

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..builtin import cache_root
from ..distributed import broadcast_from_main, gather_from_all
from ..transforms import MAX_IMAGE_PIXELS, BadImageError, open_image, resolve_image_path
from .sources import DataError, load_raw_splits

logger = logging.getLogger(__name__)

MAX_LISTED_BAD_ROWS = 20


@dataclass
class ImageRecord:
    row: int
    image_id: str
    captions: list[str]
    identity: str | None = None  # what made its rows one image (image_identities); None: derive it from the row
    content: str | None = None  # "sha1:..." of its file's bytes, once check_images has read it (images named by path)
    repeat: int = 1  # times per epoch it is trained on (extra_train_datasets' SOURCE*K); caches hold it once


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

    def __init__(self, dataset, image_column: str, image_root: str | None, max_pixels: int = MAX_IMAGE_PIXELS):
        self.dataset = dataset
        self.image_column = image_column
        self.image_root = image_root
        self.max_pixels = max_pixels

    def raw(self, row: int):
        return self.dataset[row][self.image_column]

    def describe(self, row: int) -> str:
        value = self.raw(row)
        if isinstance(value, dict):
            return value.get("path") or f"row {row} bytes"
        return value if isinstance(value, str) else f"row {row}"

    def load(self, row: int):
        return open_image(self.raw(row), self.image_root, self.max_pixels)


@dataclass
class CaptionSplit:
    """One split's images. `held_out`: the evaluation part held out of the `name` split (no eval split given);
    `cut`: (images kept, images in the split) when max_eval_samples/max_test_samples kept its first ones."""

    name: str
    table: ImageTable
    records: list[ImageRecord]
    held_out: bool = False
    cut: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        """How results name this split (model card, logs): a part of it says so, so that numbers on the first 500
        test images are never reported as the test split's."""
        parts = ["held-out part"] if self.held_out else []
        if self.cut is not None:
            parts.append(f"first {self.cut[0]:,} of {self.cut[1]:,} images")
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


class MissingColumnError(DataError):
    def __init__(self, source: str, split: str, column: str, columns: list[str], column_key: str):
        self.column_key = column_key  # the recipe key naming the column
        self.missing = f"{source}: split {split!r} has no column {column!r} (columns: {', '.join(columns)})"
        super().__init__(f"{self.missing}; set image_column / caption_column / image_id_column in the recipe")


def _prepare_table(dataset, split: str, data_args, default_root: str | None, source: str) -> ImageTable:
    import datasets

    for key in ("image_column", "caption_column", "image_id_column"):
        column = getattr(data_args, key)
        if column and column not in dataset.column_names:
            raise MissingColumnError(source, split, column, dataset.column_names, key)
    feature = dataset.features[data_args.image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        # Decoding ourselves gives row-level error messages, EXIF orientation and safe mode conversion.
        dataset = dataset.cast_column(data_args.image_column, datasets.Image(decode=False))
    return ImageTable(
        dataset, data_args.image_column, data_args.image_root or default_root, data_args.max_image_pixels
    )


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


def listing(lines: list[str]) -> str:
    """The first MAX_LISTED_BAD_ROWS lines, and how many more there are."""
    more = len(lines) - MAX_LISTED_BAD_ROWS
    return "\n".join(lines[:MAX_LISTED_BAD_ROWS]) + (f"\n  ... and {more} more" if more > 0 else "")


def build_records(table: ImageTable, split: str, data_args) -> tuple[list[ImageRecord], list[BadRow]]:
    """Group rows into images and check captions: rows with the same image_id_column value, else the same image
    (the same path, or for stored images the same path inside the Image value, else the same bytes) are one image
    with all their captions. Rows sharing an image_id but naming different images are an error."""
    dataset = table.dataset
    identities, display_ids = image_identities(table, split)
    keys = [str(key) for key in dataset[data_args.image_id_column]] if data_args.image_id_column else identities
    records: dict[str, ImageRecord] = {}
    first_identity: dict[str, tuple[int, str]] = {}
    conflicts: list[str] = []
    bad: list[BadRow] = []
    for row, (key, cell) in enumerate(zip(keys, dataset[data_args.caption_column])):
        first_row, identity = first_identity.setdefault(key, (row, identities[row]))
        if identity != identities[row]:
            conflicts.append(f"  {data_args.image_id_column} {key!r}: row {first_row} is {display_ids[first_row]}, "
                             f"row {row} is {display_ids[row]}")  # fmt: skip
            continue
        captions, reason = _caption_list(cell)
        if reason:
            bad.append(BadRow(split, row, f"{data_args.caption_column}={cell!r}"[:80], reason))
        elif key in records:
            records[key].captions.extend(captions)
        else:
            records[key] = ImageRecord(row=row, image_id=key if data_args.image_id_column else display_ids[row],
                                       captions=captions, identity=identities[row])  # fmt: skip
    if conflicts:
        raise DataError(
            f"split {split!r}: {len(conflicts)} row(s) share an {data_args.image_id_column} with a different image:\n"
            f"{listing(conflicts)}\nGive each image its own id (or drop image_id_column to group rows by image)."
        )
    return list(records.values()), bad


def image_identities(table: ImageTable, split: str) -> tuple[list[str], list[str]]:
    """Per row: (what makes two rows the same image, how results name it).

    A path string is both. A stored image (datasets' Image value) is the same image as another when its bytes are
    the same (a hash), or, holding no bytes, when its path is; it is named by its path (relative to the data root
    when under it), else by split and row."""
    identities, names = [], []
    batches = table.dataset.iter(batch_size=1024) if hasattr(table.dataset, "iter") else [table.dataset]
    row = 0
    for batch in batches:
        values = batch[table.image_column] if isinstance(batch, dict) else [item[table.image_column] for item in batch]
        for value in values:
            identity, name = _image_identity(value, table.image_root)
            identities.append(identity or f"{split}-{row}")
            names.append(name or f"{split}-{row}")
            row += 1
    return identities, names


# A file of a Hub dataset repo in the Hub cache: .../datasets--OWNER--NAME/snapshots/COMMIT/PATH/IN/REPO
HUB_SNAPSHOT_FILE = re.compile(r"[\\/]datasets--[^\\/]+[\\/]snapshots[\\/][0-9a-f]{40}[\\/](.+)$")


def _image_identity(value, root: str | None) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, value
    if not isinstance(value, dict):
        return None, None
    path = value.get("path")
    name = None
    if path:
        name = path
        if root and os.path.isabs(path) and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
            name = os.path.relpath(path, root)
        elif in_hub_cache := HUB_SNAPSHOT_FILE.search(path):  # a Hub dataset's file: its path in the repo, not here
            name = in_hub_cache.group(1)
    if value.get("bytes"):
        return "sha1:" + hashlib.sha1(value["bytes"]).hexdigest(), name
    return (os.path.abspath(path) if path else None), name


def find_bad_images(
    table: ImageTable, records: list[ImageRecord], split: str, workers: int | None, progress: bool = False
) -> tuple[list[BadRow], dict[int, str]]:
    """The records' bad images, and {row: content digest} of the good ones named by path (file_digest)."""

    def check(record: ImageRecord):
        try:
            table.load(record.row)
        except BadImageError as error:
            return BadRow(split, record.row, table.describe(record.row), str(error)), None
        return None, file_digest(table, record)  # the file was just read: its bytes come from the page cache

    from tqdm.auto import tqdm

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes (and hashlib hashes) without the GIL
        results = list(tqdm(pool.map(check, records), total=len(records), desc=f"checking images ({split})",
                            disable=not progress, leave=False))  # fmt: skip
    digests = {record.row: digest for record, (_, digest) in zip(records, results) if digest is not None}
    return [bad for bad, _ in results if bad is not None], digests


def file_digest(table: ImageTable, record: ImageRecord) -> str | None:
    """The digest of the file a record names ("sha1:<hex>", the form of a stored image's identity); None for a stored
    image (its identity is that digest already) or a file that cannot be read."""
    identity = record.identity
    if identity is None or identity.startswith("sha1:"):
        return None
    try:
        digest = hashlib.sha1()
        with open(resolve_image_path(identity, table.image_root), "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):  # hashlib.file_digest is Python 3.11+
                digest.update(chunk)
        return "sha1:" + digest.hexdigest()
    except (OSError, TypeError):
        return None


def content_of(record: ImageRecord) -> str | None:
    """What a record's image is, by its bytes: a stored image's identity, else the digest of its file (known once
    check_images has run)."""
    if record.identity is not None and record.identity.startswith("sha1:"):
        return record.identity
    return record.content


IMAGE_CHECK_VERSION = 3  # bump when what makes an image bad, or its reason, changes: older cached results are ignored


def record_identity(table: ImageTable, record: ImageRecord):
    """What an image is, for caches: its file (path, size, mtime), else a hash of its bytes, else its row. The
    identity found when rows were grouped is reused: no dataset row is read again, no bytes hashed twice."""
    identity = record.identity
    if identity is None:  # a record made without grouping (benchmarks, tests)
        identity = _image_identity(table.raw(record.row), table.image_root)[0]
    if identity is not None and identity.startswith("sha1:"):
        return identity
    resolved = resolve_image_path(identity, table.image_root) if identity else None
    if resolved and os.path.exists(resolved):
        stat = os.stat(resolved)
        return [resolved, stat.st_size, stat.st_mtime_ns]
    return [record.image_id, record.row, identity]


def split_fingerprint(split: CaptionSplit, *extra) -> str:
    identity = [split.label, *extra, *(record_identity(split.table, record) for record in split.records)]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:24]


def check_images(
    data: "CaptionData", workers: int | None = None, process_index: int = 0, world_size: int = 1,
    progress: bool = True,
) -> list[BadRow]:  # fmt: skip
    """Decode every image once, per job: under several processes each checks every world_size-th image and the
    results are gathered. Each good image's file is hashed too (ImageRecord.content), so copied_training_images can
    find a scored image that is a training image under another name. The outcome is cached by the split's
    fingerprint (its files' paths, sizes and mtimes or bytes, and the pixel limit), so a resumed or repeated run does
    not decode the dataset again."""
    bad: list[BadRow] = []
    for split in data.splits():
        cache = None
        if process_index == 0:
            key = split_fingerprint(split, split.table.max_pixels, IMAGE_CHECK_VERSION)
            cache = os.path.join(cache_root(), "image-checks", f"{key}.json")
        cached = broadcast_from_main(_read_check(cache) if cache else None, world_size)
        if cached is not None:
            found, digests = cached
            logger.info("images of split %r: checked before (%d bad), not decoded again", split.label, len(found))
        else:
            own = split.records[process_index::world_size]
            logger.info("checking %d images of split %r (%d on this process)", len(split.records), split.label,
                        len(own))  # fmt: skip
            shares = gather_from_all(find_bad_images(split.table, own, split.name, workers, progress), world_size)
            found = sorted((row for rows, _ in shares for row in rows), key=lambda row: row.row)
            digests = {row: digest for _, share in shares for row, digest in share.items()}
            if cache:
                _write_check(cache, found, digests)
        for record in split.records:
            record.content = digests.get(record.row)
        bad += found
    return bad


def _read_check(path: str) -> tuple[list[BadRow], dict[int, str]] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        return [BadRow(**row) for row in saved["bad"]], {int(row): digest for row, digest in saved["content"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _write_check(path: str, rows: list[BadRow], digests: dict[int, str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.{os.getpid()}.tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump({"bad": [dataclasses.asdict(row) for row in rows], "content": digests}, handle)
    os.replace(staging, path)


def _report_bad_rows(bad: list[BadRow], skip: bool, source: str) -> None:
    if not bad:
        return
    if not skip:
        raise DataError(
            f"{source}: {len(bad)} bad row(s) found before training:\n{listing([str(row) for row in bad])}\n"
            "Fix them, or set skip_bad_samples: true to train and evaluate without them."
        )
    for row in bad:
        logger.warning("skipping bad sample:%s", row)
    logger.warning("skipped %d bad sample(s) in %s", len(bad), source)


@dataclass
class CaptionData:
    """`extra_train`: the training splits of extra_train_datasets, each checked under its own name (rows and
    bad-row reports are its dataset's own) until `mix_training_splits` folds them into `train`."""

    train: CaptionSplit | None
    evaluation: CaptionSplit | None
    test: CaptionSplit | None
    extra_train: list[CaptionSplit] = dataclasses.field(default_factory=list)
    extra_evaluation: dict[str, CaptionSplit] = dataclasses.field(default_factory=dict)  # by extra_eval_datasets name

    def splits(self) -> list[CaptionSplit]:
        named = (self.train, self.evaluation, self.test, *self.extra_train, *self.extra_evaluation.values())
        return [split for split in named if split is not None]

    def scored_splits(self) -> list[CaptionSplit]:
        return [split for split in (self.evaluation, self.test, *self.extra_evaluation.values()) if split is not None]


class MixedTable:
    """The images of several training splits as one table: rows of the first table keep their numbers, each next
    table's follow the one before (extra_train_datasets). Each image is read through its own table, with its
    dataset's image root."""

    def __init__(self, tables: list[ImageTable]):
        self.tables = tables
        self.offsets = [0]
        for table in tables[:-1]:
            self.offsets.append(self.offsets[-1] + len(table.dataset))
        self.image_root = None  # the records' identities are absolute (mix_training_splits)
        self.max_pixels = tables[0].max_pixels

    def _part(self, row: int) -> tuple[ImageTable, int]:
        index = bisect.bisect_right(self.offsets, row) - 1
        return self.tables[index], row - self.offsets[index]

    def raw(self, row: int):
        table, own_row = self._part(row)
        return table.raw(own_row)

    def describe(self, row: int) -> str:
        table, own_row = self._part(row)
        return table.describe(own_row)

    def load(self, row: int):
        table, own_row = self._part(row)
        return table.load(own_row)


def mix_training_splits(data: CaptionData, repeats: list[int]) -> CaptionData:
    """`data.train` and `data.extra_train` (checked, bad rows dropped) -> one training split, each extra split's
    images trained on `repeats[i]` times per epoch (ImageRecord.repeat). Records are copied with their rows moved
    into the mixed table and their identities made absolute (a relative path means a file under its own dataset's
    root), so caches tell the images apart."""
    if not data.extra_train:
        return data
    parts = [(data.train, 1), *zip(data.extra_train, repeats)]
    table = MixedTable([split.table for split, _ in parts])
    records = []
    for (split, times), offset in zip(parts, table.offsets):
        moved = []
        for record in split.records:
            identity = record.identity
            if identity is not None and not identity.startswith("sha1:"):
                path = os.path.abspath(resolve_image_path(identity, split.table.image_root))
                # not a file (a row without path or bytes): named by its split, apart from other datasets' rows
                identity = path if os.path.exists(path) else f"{split.name}:{identity}"
            moved.append(dataclasses.replace(record, row=record.row + offset, identity=identity, repeat=times))
        records += moved
    counts = ", ".join(f"{len(split.records)} x{times} ({split.name})" for split, times in parts)
    per_epoch = sum(len(split.records) * times for split, times in parts)
    logger.info("training on %d images of %d datasets (%d per epoch): %s", len(records), len(parts), per_epoch,
                counts)  # fmt: skip
    return dataclasses.replace(data, train=CaptionSplit(data.train.name, table, records), extra_train=[])


def load_caption_splits(data_args, seed: int, need_eval: bool, need_train: bool = True) -> CaptionData:
    """Load, group, check (one process) and, when needed, hold out an evaluation part. DataError before training."""
    data, bad_rows = collect_splits(data_args, seed, need_eval, need_train)
    if data_args.validate_images:
        bad_rows += check_images(data, data_args.preprocessing_num_workers)
        bad_rows += copied_training_images(data, bad_rows)
    return drop_bad_rows(data, bad_rows, data_args)


def collect_splits(data_args, seed: int, need_eval: bool, need_train: bool = True) -> tuple[CaptionData, list]:
    """The splits' records (grouped, held out, trimmed to max_*_samples) and their bad captions; images unchecked."""
    raw, default_root = load_raw_splits(data_args)
    source = data_args.dataset_name

    def require(name: str, key: str) -> str:
        if name not in raw:
            also = " (`blip-recipes evaluate`: --split)" if key == "eval_split" else ""
            raise DataError(f"{source}: no split {name!r} (splits: {', '.join(raw)}); set {key}{also}")
        return name

    eval_name = data_args.eval_split
    if eval_name is not None:
        require(eval_name, "eval_split")
    elif "validation" in raw:
        eval_name = "validation"
    elif "val" in raw:  # Karpathy's split files (COCO, Flickr8k/30k) and LAVIS' annotations name it so
        eval_name = "val"
    elif not need_train and "test" in raw:
        eval_name = "test"
    elif not need_train and len(raw) == 1:  # a file scored as a whole: datasets names its one split 'train'
        eval_name = next(iter(raw))
    # Refused when set (not 0, which holds out nothing; not the default, which a recorded recipe.yaml holds).
    held_out = data_args.validation_split_percentage
    if need_eval and eval_name is not None and held_out not in (0, type(data_args).validation_split_percentage):
        raise DataError(
            f"{source}: validation_split_percentage ({held_out:g}) holds out training "
            f"images only for a dataset without an evaluation split, and this one evaluates on {eval_name!r}: remove "
            "validation_split_percentage"
        )
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
    for split, limit in ((evaluation, data_args.max_eval_samples), (test, data_args.max_test_samples)):
        if split is not None and limit is not None and len(split.records) > limit:
            split.cut = (limit, len(split.records))
            split.records = split.records[:limit]
        if split is not None and train is not None:
            bad_rows.extend(training_images_in(split, train))
    return CaptionData(train, evaluation, test), bad_rows


def collect_with_eval_dataset(data_args, scored_args, seed: int, need_eval: bool) -> tuple[CaptionData, list]:
    """Training split from `data_args`, evaluation and test splits from `scored_args` (eval_dataset_name): as
    collect_splits, with the scored images that are also training images found across the two datasets. A scored
    split named as the training split (a single file's one split is 'train') is named after its dataset too, so
    results and bad rows never mix the two."""
    # eval_split and test_split name the evaluation dataset's splits: the training dataset need not have them
    training_only = dataclasses.replace(data_args, eval_split=None, test_split=None)
    trained, bad_rows = collect_splits(training_only, seed, False, need_train=True)
    scored, scored_bad = collect_splits(scored_args, seed, need_eval, need_train=False)
    train = trained.train
    for split in (scored.evaluation, scored.test):
        if split is None:
            continue
        if split.name == train.name:
            renamed = f"{split.name} of {os.path.basename(os.path.normpath(scored_args.dataset_name))}"
            for row in scored_bad:
                if row.split == split.name:
                    row.split = renamed
            split.name = renamed
        scored_bad.extend(training_images_in(split, train, across_datasets=True))
    return CaptionData(train, scored.evaluation, scored.test), bad_rows + scored_bad


def collect_extra_training(data_args, mixture: list, seed: int, scored: list[CaptionSplit]):
    """The training split of each extra_train_datasets entry (config.ExtraDataset), named `TRAIN_SPLIT of SOURCE`,
    with the scored images that it also holds found as bad rows of their split."""
    splits, bad_rows = [], []
    for extra in mixture:
        split, own_bad = _extra_split(data_args, extra, seed, "extra_train_datasets")
        for scored_split in scored:
            own_bad.extend(training_images_in(scored_split, split, across_datasets=True))
        splits.append(split)
        bad_rows += own_bad
    return splits, bad_rows


def collect_extra_evaluation(data_args, entries: list, seed: int, training: list[CaptionSplit]):
    """{name: evaluation split} of each extra_eval_datasets entry (config.ExtraDataset): its eval_split, else its
    validation/val/test split, else its one split; named `SPLIT of NAME`, with the images that a training split
    also holds found as bad rows."""
    splits, bad_rows = {}, []
    for extra in entries:
        split, own_bad = _extra_split(data_args, extra, seed, "extra_eval_datasets")
        for trained in training:
            own_bad.extend(training_images_in(split, trained, across_datasets=True))
        splits[extra.name] = split
        bad_rows += own_bad
    return splits, bad_rows


def _extra_split(data_args, extra, seed: int, key: str) -> tuple[CaptionSplit, list[BadRow]]:
    """An extra dataset's training split (extra_train_datasets) or scored split (extra_eval_datasets), with its bad
    captions, under a name of its own so that its bad rows are reported by its own rows: `SPLIT of SOURCE` (`SPLIT
    of NAME` when scored: names are unique, and results name the split so in the model card). An entry's own keys
    win; the column names, max_train_samples and max_eval_samples are otherwise the recipe's; image_root,
    configuration and revision are dataset_name's only (an extra dataset's relative paths are read where it is)."""
    scored = key == "extra_eval_datasets"
    dataset_own = {"dataset_config_name": None, "dataset_revision": None, "image_root": None, "eval_split": None}
    own = dataclasses.replace(data_args, test_split=None, validation_split_percentage=0,
                              dataset_name=extra.dataset_name, **{**dataset_own, **extra.settings})  # fmt: skip
    if own.image_root and not os.path.isdir(own.image_root):
        raise DataError(f"{own.dataset_name}: image_root {own.image_root}: no such directory")
    try:
        collected, own_bad = collect_splits(own, seed, need_eval=scored, need_train=not scored)
    except MissingColumnError as error:
        raise DataError(_extra_column_problem(error, extra, key)) from None
    split = collected.evaluation if scored else collected.train
    split.name = f"{split.name} of {extra.name if scored else extra.dataset_name}"
    for row in own_bad:
        row.split = split.name
    return split, own_bad


def _extra_column_problem(error: "MissingColumnError", extra, key: str) -> str:
    """The recipe's column names were taken for an extra dataset that lacks one."""
    if error.column_key in extra.settings:
        return f"{error.missing}: its {key} entry sets {error.column_key}"
    return (
        f"{error.missing}: an {key} entry is read with the recipe's {error.column_key} unless it sets its own: "
        f"{{dataset_name: {extra.dataset_name}, {error.column_key}: ...}}"
    )


def training_images_in(scored: CaptionSplit, train: CaptionSplit, across_datasets: bool = False) -> list[BadRow]:
    """The images of a scored split that the run also trains on (the same file, or the same bytes): their scores
    would measure recall of training captions. A split split by row, not by image, before it reached this tool
    is the usual cause. Evaluating on the training split itself (eval_split: train) is a choice and says so.
    `across_datasets`: the two splits come from different datasets, whose relative paths have different roots."""
    if scored.held_out and not across_datasets:  # held out of the training images by image: disjoint by construction
        return []
    if scored.name == train.name and not across_datasets:
        logger.warning("split %r is also the training split: its scores measure the fit on training images",
                       scored.name)  # fmt: skip
        return []

    def key(split: CaptionSplit, record: ImageRecord):
        identity = record.identity
        if not across_datasets or identity is None or identity.startswith("sha1:"):
            return identity
        return os.path.abspath(resolve_image_path(identity, split.table.image_root))

    trained = {key(train, record): record.row for record in train.records}
    trained.pop(None, None)
    found = ((record, key(scored, record)) for record in scored.records)
    return [
        BadRow(scored.name, record.row, scored.table.describe(record.row),
               f"also a training image (split {train.name!r} row {trained[identity]})")
        for record, identity in found if identity in trained
    ]  # fmt: skip


def copied_training_images(data: CaptionData, reported: list[BadRow]) -> list[BadRow]:
    """Scored images that are training images under another name: the same bytes (content_of, known once
    check_images has run) as an image of a training split, in another file. A copy left in a dataset before it was
    split, in the evaluation folder or in a second training dataset, would make its scores measure recall. Rows
    reported already (the same file: training_images_in; a bad image) are left alone, as is a training split
    evaluated on purpose (eval_split: train)."""
    trained: dict[str, tuple[CaptionSplit, ImageRecord]] = {}
    for split in (data.train, *data.extra_train):
        for record in split.records if split is not None else []:
            if (content := content_of(record)) is not None:
                trained.setdefault(content, (split, record))
    reported_rows = {(row.split, row.row) for row in reported}
    found = []
    for scored in data.scored_splits():
        if scored is None or (data.train is not None and scored.name == data.train.name and not scored.held_out):
            continue
        for record in scored.records:
            split, original = trained.get(content_of(record), (None, None))
            if original is None or (scored.name, record.row) in reported_rows:
                continue
            found.append(BadRow(
                scored.name, record.row, scored.table.describe(record.row),
                f"a copy of training image {split.table.describe(original.row)} (split {split.name!r} row "
                f"{original.row}): the same bytes under another name",
            ))  # fmt: skip
    return found


def drop_bad_rows(data: CaptionData, bad_rows: list[BadRow], data_args, source: str | None = None) -> CaptionData:
    """One complete report of the bad captions and images of every split (an error, or skipped with a warning
    under skip_bad_samples); splits left without rows are an error. `source`: how the report names the data
    (default: dataset_name)."""
    source = source or data_args.dataset_name
    for split in data.splits():
        unusable = {row.row for row in bad_rows if row.split == split.name}
        split.records = [record for record in split.records if record.row not in unusable]
    _report_bad_rows(sorted(bad_rows, key=lambda row: (row.split, row.row)), data_args.skip_bad_samples, source)
    for split in data.splits():
        if not split.records:
            raise DataError(f"{source}: split {split.name!r} has no usable rows")
    return data


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
