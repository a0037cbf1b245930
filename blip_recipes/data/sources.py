"""Data sources: `dataset_name` -> raw `datasets.Dataset` splits (nothing decoded, nothing checked yet).

Hub ids, imagefolder directories, save_to_disk folders, JSON/JSONL/CSV files or folders of split files, COCO
Karpathy files (coco.py) and builtin:shapes.
"""

import csv
import json
import logging
import os

from ..builtin import is_builtin, resolve_builtin

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Unusable data; the message names the dataset, split, row and column."""


def _resolve_source(dataset_name: str) -> str:
    return resolve_builtin(dataset_name) if is_builtin(dataset_name) else dataset_name


def load_raw_splits(data_args) -> tuple[dict, str | None]:
    """dataset_name -> ({split: datasets.Dataset}, default image root)."""
    source = _resolve_source(data_args.dataset_name)
    if os.path.isfile(source) and os.path.getsize(source) == 0:
        raise DataError(f"{source}: empty file, no rows")
    if os.path.exists(source):
        check_hub_keys_for_local(data_args)
        try:
            return _load_raw_splits(source, data_args)
        except DataError:
            raise
        except Exception as error:  # datasets raises anything from StopIteration to pyarrow errors on bad files
            config_problem = missing_config_problem(source, error, "dataset repo folder")
            if config_problem is not None:
                raise DataError(config_problem) from error
            # datasets wraps the reader's error ("An error occurred while generating the dataset"): name the reader's
            # own, which says where (pandas: "Expected 2 fields in line 6, saw 4").
            cause = error
            while (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            said = " ".join(str(cause).split())
            raise DataError(f"{source}: could not load the dataset ({type(cause).__name__}: {said})") from error
    return read_hub_dataset(source, data_args), None


def check_hub_keys_for_local(data_args) -> None:
    """dataset_revision, and dataset_config_name outside a folder laid out as a Hub dataset repo, name what only a Hub
    dataset has: a local file or folder was read whole, at what it holds now, whatever they said."""
    source = data_args.dataset_name
    if data_args.dataset_revision is not None:
        raise DataError(f"{source}: a local file or folder has no revisions; dataset_revision "
                        f"({data_args.dataset_revision}) names one of a Hub dataset: remove it, or check out that "
                        "revision into the folder")  # fmt: skip
    if data_args.dataset_config_name is not None and not is_dataset_repo_folder(_resolve_source(source)):
        raise DataError(
            f"{source}: dataset_config_name ({data_args.dataset_config_name}) names a configuration of a "
            "Hub dataset (its card's `configs`), and this local file or folder has none: remove it"
        )


def read_hub_dataset(name: str, data_args, streaming: bool = False) -> dict:
    """A Hub dataset's splits, through datasets: from the Hub, or from the Hub cache's snapshot when the Hub cannot
    be reached (hub_dataset_snapshot), or when offline and datasets has not prepared a copy of its own."""
    snapshot = hub_dataset_snapshot(name, data_args.dataset_revision)
    try:
        try:
            return _load_hub_dataset(snapshot or name, data_args, streaming)
        except ConnectionError:  # offline, and nothing in datasets' cache ("Couldn't reach ... on the Hub")
            if snapshot is not None or not datasets_offline():
                raise
            snapshot = cached_hub_dataset(name, data_args.dataset_revision)
            if snapshot is None:
                raise
            logger.warning("%s: offline, and datasets has not prepared this dataset: reading it from the Hub cache "
                           "(%s)", name, snapshot)  # fmt: skip
            return _load_hub_dataset(snapshot, data_args, streaming)
    except Exception as error:  # datasets raises anything from StopIteration to pyarrow errors on bad files
        if isinstance(error, ConnectionError):
            why = "the Hub cannot be reached"
            if datasets_offline():
                why = "offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
            raise DataError(f"{name}: no local file or folder of that name; {why}, and neither datasets' cache "
                            "nor the Hub cache holds a Hub dataset of that name (download it where there is network: "
                            f"`hf download --repo-type dataset {name}`)") from error  # fmt: skip
        config_problem = missing_config_problem(name, error)
        if config_problem is not None:
            raise DataError(config_problem) from error
        said = " ".join(str(error).split())
        raise DataError(f"{name}: no local file or folder of that name, and loading it as a Hub dataset failed "
                        f"({type(error).__name__}: {said})") from error  # fmt: skip


def missing_config_problem(name: str, error: Exception, what: str = "Hub dataset") -> str | None:
    """The message for a dataset of several configurations loaded without dataset_config_name, on one line (datasets'
    own spans several: "Config name is missing.\nPlease pick one among ..."); None for another error."""
    said = " ".join(str(error).split())
    if "Config name is missing" not in said:
        return None
    return f"{name}: the {what} has several configurations: set dataset_config_name to one of them ({said})"


def is_dataset_repo_folder(directory: str) -> bool:
    """A folder laid out as a Hub dataset repo (`hf download --repo-type dataset ID --local-dir DIR`, a git clone),
    which datasets reads as it reads the repo: a dataset card (README.md) whose YAML header declares `configs` or
    `dataset_info`, or, for a folder that is no imagefolder, Parquet/Arrow data files (the order _load_raw_splits
    takes; an imagefolder's metadata is found at its top, before a walk through every image)."""
    if not os.path.isdir(directory):
        return False
    if card_declares_data(os.path.join(directory, "README.md")):
        return True
    return not _has_imagefolder_metadata(directory) and _has_repo_data_files(directory)


def _has_repo_data_files(directory: str) -> bool:
    for _folder, folders, files in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]  # .git, .cache (hf download's own)
        if any(name.endswith((".parquet", ".arrow")) for name in files):
            return True
    return False


def card_declares_data(card: str) -> bool:
    """A dataset card whose YAML header declares `configs` or `dataset_info` (which datasets then reads)."""
    import yaml

    if not os.path.isfile(card):
        return False
    with open(card, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if not text.startswith("---"):
        return False
    header = text[3:].split("\n---", 1)[0]
    try:
        metadata = yaml.safe_load(header)
    except yaml.YAMLError:
        return False
    return isinstance(metadata, dict) and bool({"configs", "dataset_info"} & set(metadata))


def _load_hub_dataset(name_or_snapshot: str, data_args, streaming: bool) -> dict:
    import datasets

    # A snapshot folder is read as datasets reads the repo: the same card configs, data files and splits.
    revision = None if os.path.isdir(name_or_snapshot) else data_args.dataset_revision
    loaded = datasets.load_dataset(name_or_snapshot, data_args.dataset_config_name, revision=revision,
                                   streaming=streaming)  # fmt: skip
    return dict(loaded)


def hub_dataset_snapshot(name: str, revision: str | None) -> str | None:
    """Checks a dataset_name that is no local file or folder and says where to read it: None for the Hub (through
    datasets), or the Hub cache's snapshot folder when the Hub cannot be reached and the cache holds it.

    A path (a data file's extension, or a name the Hub would refuse) fails at once; a Hub id is asked for with one
    request, online, so a mistyped folder is named as one instead of after datasets' retries ("Couldn't reach
    'data/coco' on the Hub"). When the Hub cannot be reached, datasets retries for ~25 s and then reads only a copy
    it prepared itself: a dataset fetched with `hf download --repo-type dataset`, or prepared in another datasets
    cache (another machine's), failed with "Couldn't reach"."""
    from ..model import ask_hub

    if can_only_be_a_path(name):
        raise DataError(f"{name}: no such file or directory")
    if datasets_offline():
        return None  # datasets reads its own prepared copy at once; read_hub_dataset falls back to the Hub cache
    answer, reason = ask_hub(name, revision, repo_type="dataset")
    if answer == "missing":
        raise DataError(f"{name}: no local file or folder of that name, and no Hub dataset of that name either (a "
                        "private one needs a login: `hf auth login` or HF_TOKEN)")  # fmt: skip
    if answer == "no revision":
        raise DataError(f"{name}: the Hub dataset has no revision {revision!r} (dataset_revision)")
    if answer != "unreachable":
        return None
    snapshot = cached_hub_dataset(name, revision)
    if snapshot is None:
        logger.warning("%s: asking the Hub for the dataset failed (%s) and the Hub cache does not hold it: datasets "
                       "tries its own cache", name, reason)  # fmt: skip
    else:
        logger.warning("%s: asking the Hub for the dataset failed (%s): reading it from the Hub cache (%s)", name,
                       reason, snapshot)  # fmt: skip
    return snapshot


def datasets_offline() -> bool:
    """No Hub calls from datasets: HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE (both read at import)."""
    import datasets

    from ..model import hub_offline

    return bool(datasets.config.HF_HUB_OFFLINE) or hub_offline()


def cached_hub_dataset(name: str, revision: str | None) -> str | None:
    """The Hub cache's snapshot folder of a dataset repo at `revision` (main), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from ..model import cached_snapshot

    snapshot = cached_snapshot(name, revision, repo_type="dataset")
    if snapshot is not None:
        return snapshot
    # datasets downloads a repo's files by commit, and names the branch only when it fetches the card (README.md):
    # a repo without one leaves no refs/main. Its one snapshot is the copy to read; with several, none is certain.
    snapshots = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=name, repo_type="dataset"), "snapshots")
    found = sorted(os.listdir(snapshots)) if revision in (None, "main") and os.path.isdir(snapshots) else []
    return os.path.join(snapshots, found[0]) if len(found) == 1 else None


def _load_raw_splits(source: str, data_args) -> tuple[dict, str | None]:
    import datasets

    if os.path.isfile(source):
        from .coco import (
            is_coco_captions_file,
            is_coco_karpathy_file,
            load_coco_captions_file,
            load_coco_karpathy_file,
        )

        if file_builder(source) is not None:
            check_utf8(source)
        if is_coco_karpathy_file(source):
            return load_coco_karpathy_file(source), os.path.dirname(os.path.abspath(source))
        if is_coco_captions_file(source):
            return load_coco_captions_file(source), os.path.dirname(os.path.abspath(source))
        builder = file_builder(source)
        if builder is None:
            raise DataError(f"{source}: unsupported data file; use .json, .jsonl or .csv (or a directory)")
        if builder == "json":
            check_json_file(source)
        loaded = datasets.load_dataset(builder, data_files={"train": source})
        return dict(loaded), os.path.dirname(os.path.abspath(source))
    if os.path.isdir(source):
        from .coco import (
            LAVIS_FILES,
            is_coco_captions_file,
            is_lavis_karpathy_dir,
            load_coco_captions_file,
            load_lavis_karpathy_dir,
        )

        if os.path.isfile(os.path.join(source, "dataset_dict.json")) or os.path.isfile(
            os.path.join(source, "state.json")
        ):
            loaded = datasets.load_from_disk(source)
            return (dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}), source
        # A Hub repo's card configs name its splits and data files; without them, its Parquet/Arrow files, below.
        if card_declares_data(os.path.join(source, "README.md")):
            return _load_dataset_repo_folder(source, data_args), source
        if is_lavis_karpathy_dir(source):
            for name in LAVIS_FILES.values():
                if os.path.isfile(os.path.join(source, name)):
                    check_utf8(os.path.join(source, name))
            return load_lavis_karpathy_dir(source), source
        split_files = _split_files(source)
        for path in split_files.values():
            check_utf8(path)
        if split_files and all(is_coco_captions_file(path) for path in split_files.values()):
            splits = {}
            for name, path in split_files.items():
                splits.update(load_coco_captions_file(path, "validation" if name == "val" else name))
            return splits, source
        if split_files:
            builder = "csv" if next(iter(split_files.values())).endswith(".csv") else "json"
            for path in split_files.values() if builder == "json" else ():
                check_json_file(path)
            return dict(datasets.load_dataset(builder, data_files=split_files)), source
        if _has_imagefolder_metadata(source):
            check_imagefolder_metadata(source)
            return dict(datasets.load_dataset("imagefolder", data_dir=source)), source
        if _has_repo_data_files(source):  # a repo without a card that declares its data
            return _load_dataset_repo_folder(source, data_args), source
        raise DataError(
            f"{source}: directory is neither a save_to_disk dataset, an imagefolder with metadata.jsonl/metadata.csv, "
            "split files (train.jsonl, validation.jsonl, ...), nor a Hub dataset repo's files (a card with configs, "
            "Parquet files)"
        )
    raise DataError(f"{source}: neither a file nor a directory")  # a socket, a device


def _load_dataset_repo_folder(source: str, data_args, streaming: bool = False) -> dict:
    """A Hub dataset repo's files in a local folder, read as datasets reads the repo (its card's configs, data files
    and split names); an imagefolder repo's metadata is checked as a local imagefolder's is."""
    if _has_imagefolder_metadata(source):
        check_imagefolder_metadata(source)
    return _load_hub_dataset(source, data_args, streaming)


def can_only_be_a_path(name: str) -> bool:
    """A dataset_name that is never a Hub dataset id, wherever it is read: a data file's extension (JSON, JSONL,
    CSV, a WebDataset .tar), or a name the Hub would refuse as a repo id (an absolute path, ./x, a glob)."""
    from ..hub import repo_id_problem

    data_file = file_builder(name) is not None or os.path.splitext(name)[1].lower() == ".tar"
    return data_file or repo_id_problem(name) is not None


def file_builder(path: str) -> str | None:
    """The `datasets` builder that reads a data file of this kind (json for .json/.jsonl, csv), or None."""
    return {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(os.path.splitext(path)[1].lower())


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


def check_utf8(path: str) -> None:
    """DataError naming the file and line when a text data file is not UTF-8 (datasets, pandas and json would raise
    a UnicodeDecodeError naming neither); a BOM at the start is allowed, as datasets reads it."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start} of the line); save it as "
                    "UTF-8"
                ) from None


def check_json_file(path: str) -> None:
    """A JSON Lines file (or one JSON document) that datasets can read; else DataError naming the file and line
    (datasets only says so in a log line and raises a generic error)."""
    first_bad = _first_bad_json_line(path)
    if first_bad is None:
        return  # JSON Lines
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)  # one JSON document (an array of rows, or columns)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        # A file whose first lines are rows is JSON Lines: its first bad line is the one to name.
        number, message, column = first_bad if first_bad[0] > 1 else (error.lineno, error.msg, error.colno)
        raise DataError(f"{path}:{number}: not valid JSON ({message} at column {column})") from None


def _first_bad_json_line(path: str) -> tuple[int, str, int] | None:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    return number, error.msg, error.colno
    return None


def check_imagefolder_metadata(directory: str) -> None:
    """Every metadata file parses, and every file_name stays inside the imagefolder (no ../ or absolute paths)."""
    root = os.path.realpath(directory)
    for folder, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            if name in ("metadata.jsonl", "metadata.csv"):
                check_utf8(path)
            if name == "metadata.jsonl":
                check_json_file(path)
                with open(path, encoding="utf-8") as handle:
                    rows = [(n, json.loads(line)) for n, line in enumerate(handle, start=1) if line.strip()]
            elif name == "metadata.csv":
                with open(path, encoding="utf-8", newline="") as handle:
                    rows = list(enumerate(csv.DictReader(handle), start=2))
            else:
                continue
            for number, row in rows:
                file_name = row.get("file_name") if isinstance(row, dict) else None
                target = os.path.realpath(os.path.join(folder, str(file_name)))
                if file_name is not None and not target.startswith(root + os.sep):
                    raise DataError(
                        f"{path}:{number}: file_name {file_name!r} points outside the imagefolder {directory}"
                    )
