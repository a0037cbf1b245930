"""Data sources: `dataset_name` -> raw `datasets.Dataset` splits (nothing decoded, nothing checked yet).

Hub ids, imagefolder directories, save_to_disk folders, JSON/JSONL/CSV files or folders of split files, COCO
Karpathy files (coco.py) and builtin:shapes.
"""

import os

from ..builtin import is_builtin, resolve_builtin


class DataError(ValueError):
    """Unusable data; the message names the dataset, split, row and column."""


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
