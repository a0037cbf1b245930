"""Hub datasets, read through a local stand-in for the Hub (tests/fake_hub.py), and from the Hub cache when the Hub
cannot be reached: a cluster node without network, after `hf download --repo-type dataset` or a run elsewhere."""

import json
import os
import re
import shutil
import sys

import pytest

from tests.conftest import REPO, read_json, read_jsonl, run_cli
from tests.fake_hub import FakeHub

FOOTBALL = "ybelkada/football-dataset"
UNREACHABLE = "http://127.0.0.1:9"

CARD = """---
dataset_info:
  features:
  - name: image
    dtype: image
  - name: text
    dtype: string
  splits:
  - name: train
    num_bytes: 4000
    num_examples: 6
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# A stand-in for ybelkada/football-dataset
"""


@pytest.fixture(scope="module")
def football_repo(tmp_path_factory, shapes_dir):
    """The files of a repo laid out as ybelkada/football-dataset is: a card with its configs and split sizes, and one
    parquet file of 6 rows, an Image column with embedded bytes and a text column (shapes images stand in)."""
    import datasets

    folder = tmp_path_factory.mktemp("football-repo")
    metadata = read_jsonl(os.path.join(shapes_dir, "train", "metadata.jsonl"))[:6]
    rows = []
    for row in metadata:
        with open(os.path.join(shapes_dir, "train", row["file_name"]), "rb") as handle:
            rows.append({"image": {"bytes": handle.read(), "path": row["file_name"]}, "text": row["text"][0]})
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    os.makedirs(folder / "data")
    datasets.Dataset.from_list(rows, features=features).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet")
    )
    (folder / "README.md").write_text(CARD)
    return folder


def hub_env(tmp_path, endpoint, offline=False, datasets_cache="datasets"):
    """The Hub at `endpoint`, a Hub cache and a datasets cache of this test's own."""
    flag = "1" if offline else "0"
    return {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": flag, "HF_DATASETS_OFFLINE": flag, "HF_TOKEN": "",
            "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_DATASETS_CACHE": str(tmp_path / datasets_cache),
            "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip


def test_the_football_recipe_trains_on_its_hub_dataset_as_written(tmp_path, football_repo):
    """recipes/football/full.yaml as written (its dataset_name is the Hub id ybelkada/football-dataset, eval on the
    training images, image cache), the tiny model swapped in: the dataset comes through datasets from the Hub, and
    the card names it by its id."""
    with FakeHub(datasets={FOOTBALL: football_repo}) as hub:
        result = run_cli(
            ["train", "recipes/football/full.yaml", "--model_name_or_path", "builtin:tiny-blip", "--output_dir",
             str(tmp_path / "run"), "--num_train_epochs", "2", "--eval_steps", "3", "--save_steps", "3",
             "--eval_on_start", "false", "--dataloader_num_workers", "0"],
            env=hub_env(tmp_path, hub.url),
        )  # fmt: skip
        downloads = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert any(path.endswith("data/train-00000-of-00001.parquet") for path in downloads)
    assert len(read_jsonl(tmp_path / "run" / "eval_predictions.jsonl")) == 6
    assert read_json(tmp_path / "run" / "eval_results.json")["eval_cider"] >= 0
    assert f"- {FOOTBALL}" in (tmp_path / "run" / "README.md").read_text().split("---")[1]  # the card's metadata


READ = """
import json, sys
from blip_recipes.config import DataArguments
from blip_recipes.data.records import collect_splits
from blip_recipes.data.sources import DataError, load_raw_splits
from blip_recipes.data.streaming import stream_shards

for name in sys.argv[1:]:
    arguments = DataArguments(dataset_name=name, image_column="image", caption_column="text")
    try:
        splits, _root = load_raw_splits(arguments)
        shards = stream_shards(arguments)
        records = collect_splits(arguments, seed=0, need_eval=False)[0].train.records
    except DataError as error:
        print(json.dumps({"error": str(error)}))
        continue
    rows = [row["text"] for row in splits["train"]]
    streamed = [sample.captions for shard in shards for sample in shard.samples()]
    names = sorted(record.image_id for record in records)
    print(json.dumps({"rows": rows, "streamed": streamed, "shards": len(shards), "names": names}))
"""


def read_datasets(env, *names):
    """Each dataset's training captions as load_raw_splits reads them and as stream_shards streams them (or the
    DataError), in one process; and its log."""
    result = run_cli(["-c", READ, *names], env=env, launcher=[sys.executable])
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()[-len(names) :]], result.stderr


def test_hub_datasets_stream_from_the_hub_and_read_from_the_hub_cache_when_unreachable_or_offline(
    tmp_path, football_repo, shapes_dir
):
    """Streaming a Hub id goes through the Hub as datasets streams it (byte ranges of the parquet file). When the Hub
    cannot be reached, or offline (HF_HUB_OFFLINE) without a copy datasets prepared, a dataset the Hub cache holds
    is read from there at once, map-style and streamed (datasets retried ~25 s and failed "Couldn't reach" unless it
    had prepared the dataset itself: fetched with `hf download`, or on another node); one the Hub cache lacks too
    fails naming `hf download`. A cached copy with fewer rows than its card declares (a download cut off between
    files) is refused, not trained on. A dataset of several configurations names dataset_config_name, on one line.
    An imagefolder repo without a card (datasets leaves no refs/main in the Hub cache then) is read from its one
    cached snapshot, and its images are named by their paths in the repo, not in this machine's cache."""
    two_configs, partial = tmp_path / "two-configs", tmp_path / "partial"
    shutil.copytree(football_repo / "data", two_configs / "a")
    shutil.copytree(football_repo / "data", two_configs / "b")
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n" for c in "ab")
    (two_configs / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    shutil.copytree(football_repo, partial)
    (partial / "README.md").write_text(CARD.replace("num_examples: 6", "num_examples: 60"))
    folder = tmp_path / "folder"
    os.makedirs(folder / "train")
    metadata = read_jsonl(os.path.join(shapes_dir, "train", "metadata.jsonl"))[:6]
    for row in metadata:
        shutil.copy(os.path.join(shapes_dir, "train", row["file_name"]), folder / "train")
    (folder / "train" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metadata))
    repos = {FOOTBALL: football_repo, "someone/folder": folder, "someone/two-configs": two_configs,
             "someone/partial": partial}  # fmt: skip
    with FakeHub(datasets=repos) as hub:
        (online, images, unnamed, short), _log = read_datasets(hub_env(tmp_path, hub.url), *repos)
        ranges = [path for method, path, _ in hub.requests if method == "GET" and path.endswith(".parquet")]
    assert len(online["rows"]) == 6 and online["streamed"] == online["rows"] and online["shards"] == 1 and ranges
    assert images["rows"] == [row["text"] for row in metadata] and images["streamed"] == images["rows"]
    assert images["names"] == [f"train/{row['file_name']}" for row in metadata]
    assert unnamed["error"].startswith("someone/two-configs: the Hub dataset has several configurations: set "
                                       "dataset_config_name to one of them (Config name is missing. "
                                       "Please pick one among the available configs: ['a', 'b']")  # fmt: skip
    refused = "someone/partial: no local file or folder of that name, and loading it as a Hub dataset failed "
    assert short["error"].startswith(refused + "(NonMatchingSplitsSizesError")

    unreachable = hub_env(tmp_path, UNREACHABLE, datasets_cache="datasets-unreachable")
    (cached, cached_images, short), log = read_datasets(unreachable, FOOTBALL, "someone/folder", "someone/partial")
    assert cached == online and cached_images == images
    assert short["error"].startswith(refused + "(NonMatchingSplitsSizesError")
    assert f"{FOOTBALL}: asking the Hub for the dataset failed" in log and "Retrying" not in log

    offline = hub_env(tmp_path, UNREACHABLE, offline=True, datasets_cache="datasets-offline")
    (cached, cached_images, missing), log = read_datasets(
        offline, FOOTBALL, "someone/folder", "someone/not-downloaded"
    )
    assert cached == online and cached_images == images
    assert f"{FOOTBALL}: offline, and datasets has not prepared this dataset: reading it from the Hub cache" in log
    assert missing["error"] == (
        "someone/not-downloaded: no local file or folder of that name; offline (HF_HUB_OFFLINE or "
        "HF_DATASETS_OFFLINE), and neither datasets' cache nor the Hub cache holds a Hub dataset of that name "
        "(download it where there is network: `hf download --repo-type dataset someone/not-downloaded`)"
    )


def test_a_hub_dataset_downloaded_into_a_folder_is_read_as_the_hub_repo(tmp_path, football_repo, shapes_dir):
    """`hf download --repo-type dataset ID --local-dir DIR` (or a git clone) leaves the repo's files in a folder: a
    card with configs and Parquet files. It was refused ("directory is neither a save_to_disk dataset, ..."); now it
    is read as datasets reads the repo, map-style and streamed, with its card's configs (dataset_config_name)."""
    from blip_recipes.config import DataArguments
    from blip_recipes.data.records import collect_splits
    from blip_recipes.data.sources import DataError, load_raw_splits
    from blip_recipes.data.streaming import stream_shards

    def read(folder, **keys):
        arguments = DataArguments(dataset_name=str(folder), **keys)
        splits, _root = load_raw_splits(arguments)
        streamed = [sample.captions for shard in stream_shards(arguments) for sample in shard.samples()]
        records = collect_splits(arguments, seed=0, need_eval=False)[0].train.records
        return {name: [row["text"] for row in split] for name, split in splits.items()}, streamed, len(records)

    downloaded = tmp_path / "football"
    shutil.copytree(football_repo, downloaded)
    os.makedirs(downloaded / ".cache" / "huggingface" / "download")  # hf download's own bookkeeping
    splits, streamed, images = read(downloaded)
    assert list(splits) == ["train"] and len(splits["train"]) == 6 and images == 6
    assert streamed == splits["train"]

    no_card = tmp_path / "no-card"  # Parquet files alone, as a repo without a dataset card holds them
    shutil.copytree(football_repo / "data", no_card / "data")
    assert read(no_card)[0] == splits

    two_configs = tmp_path / "two-configs"
    shutil.copytree(football_repo / "data", two_configs / "a")
    shutil.copytree(football_repo / "data", two_configs / "b")
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: {s}\n    path: {c}/train-*\n"
                      for c, s in (("a", "train"), ("b", "validation")))  # fmt: skip
    (two_configs / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(two_configs))}: the dataset repo folder has several "
                       r"configurations: set dataset_config_name to one of them \(Config name is missing\. Please "
                       r"pick one among the available configs: \['a', 'b'\]"):  # fmt: skip
        load_raw_splits(DataArguments(dataset_name=str(two_configs)))
    assert read(two_configs, dataset_config_name="a")[0] == splits
    assert list(load_raw_splits(DataArguments(dataset_name=str(two_configs), dataset_config_name="b"))[0]) == [
        "validation"
    ]

    # Trained on with its configuration, beside an evaluation file (eval_dataset_name), which the configuration
    # does not apply to; the file's one split is scored whole, named after the file. eval_split names a split of the
    # evaluation dataset, which the training dataset need not have.
    from blip_recipes.builders import load_data
    from blip_recipes.recipe_parser import parse_recipe

    metadata = read_jsonl(os.path.join(shapes_dir, "validation", "metadata.jsonl"))[:3]
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "val.jsonl").write_text("".join(
        json.dumps({"image": os.path.join(shapes_dir, "validation", row["file_name"]), "text": row["text"]}) + "\n"
        for row in metadata
    ))  # fmt: skip

    def scored(evaluation, *keys):
        recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--dataset_name",
                               str(two_configs), "--dataset_config_name", "a", "--eval_dataset_name", str(evaluation),
                               "--output_dir", str(tmp_path / "run"), *keys])  # fmt: skip
        data = load_data(recipe, need_train=True)
        assert len(data.train.records) == 6
        return data.evaluation.label, len(data.evaluation.records)

    assert scored(tmp_path / "evaluation" / "val.jsonl") == ("train of val.jsonl", 3)
    assert scored(tmp_path / "evaluation", "--eval_split", "val") == ("val", 3)  # a folder of split files


@pytest.mark.parametrize(
    "keys, said",
    [
        ({"dataset_config_name": "2017"}, "builtin:shapes: dataset_config_name (2017) names a configuration of a Hub "
         "dataset (its card's `configs`), and this local file or folder has none: remove it"),
        ({"dataset_revision": "v1"}, "builtin:shapes: a local file or folder has no revisions; dataset_revision (v1) "
         "names one of a Hub dataset: remove it, or check out that revision into the folder"),
        ({"streaming": True, "dataset_revision": "v1"}, "builtin:shapes: a local file or folder has no revisions"),
    ],
)  # fmt: skip
def test_hub_only_keys_are_refused_for_a_local_dataset(keys, said):
    """dataset_config_name and dataset_revision were ignored for a local file or folder: it was read whole, as it is
    now, whatever configuration or revision the recipe named."""
    from blip_recipes.config import DataArguments
    from blip_recipes.data.sources import DataError, load_raw_splits
    from blip_recipes.data.streaming import stream_shards

    arguments = DataArguments(dataset_name="builtin:shapes", **keys)
    with pytest.raises(DataError, match=f"^{re.escape(said)}"):
        stream_shards(arguments) if arguments.streaming else load_raw_splits(arguments)
