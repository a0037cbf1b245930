"""COCO Karpathy: both annotation formats load, and the published recipe runs end to end on a tiny fixture."""

import glob
import json
import os

import pytest
from PIL import Image

from blip_recipes.config import DataArguments
from blip_recipes.data import blip_caption, load_caption_splits
from blip_recipes.data.coco import load_coco_karpathy_file, load_lavis_karpathy_dir
from tests.conftest import read_json, read_jsonl, run_main

SPLITS = {"train": 10, "restval": 4, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def coco(tmp_path_factory, shapes_dir):
    """A COCO-format fixture: images under train2014/ and val2014/, Karpathy's dataset_coco.json, LAVIS' files."""
    root = tmp_path_factory.mktemp("coco")
    metadata = read_jsonl(os.path.join(shapes_dir, "train", "metadata.jsonl"))
    images, lavis = [], {"train": [], "val": [], "test": []}
    index = 0
    for split, count in SPLITS.items():
        for _ in range(count):
            record = metadata[index]
            folder = "train2014" if split in ("train", "restval") else "val2014"
            name = f"COCO_{folder}_{100000 + index:012d}.jpg"
            os.makedirs(root / "images" / folder, exist_ok=True)
            Image.open(os.path.join(shapes_dir, "train", record["file_name"])).convert("RGB").save(
                root / "images" / folder / name, quality=95
            )
            captions = record["text"] + [record["text"][0].upper() + ".", f"  {record['text'][1]}!! "]
            sentences = [{"raw": c, "tokens": c.split()} for c in captions]
            images.append({"filepath": folder, "filename": name, "imgid": index, "cocoid": 100000 + index,
                           "split": split, "sentences": sentences})  # fmt: skip
            path = f"{folder}/{name}"
            if split in ("train", "restval"):
                lavis["train"] += [{"caption": c, "image": path, "image_id": f"coco_{index}"} for c in captions]
            else:
                lavis[split].append({"image": path, "caption": captions})
            index += 1
    os.makedirs(root / "annotations")
    (root / "annotations" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for split, rows in lavis.items():
        (root / "annotations" / f"coco_karpathy_{split}.json").write_text(json.dumps(rows))
    return root


def test_karpathy_file_merges_restval_into_train(coco):
    splits = load_coco_karpathy_file(str(coco / "annotations" / "dataset_coco.json"))
    assert {name: len(split) for name, split in splits.items()} == {"train": 14, "val": 4, "test": 4}
    assert splits["val"][0]["image"].startswith("val2014/COCO_val2014_") and len(splits["val"][0]["text"]) == 5
    assert splits["train"][0]["image_id"] == "100000"


def test_lavis_files_group_one_caption_per_row_into_images(coco):
    assert set(load_lavis_karpathy_dir(str(coco / "annotations"))) == {"train", "val", "test"}
    args = DataArguments(dataset_name=str(coco / "annotations"), image_root=str(coco / "images"), eval_split="val",
                         test_split="test")  # fmt: skip
    data = load_caption_splits(args, seed=0, need_eval=True)
    assert len(data.train.records) == 14 and all(len(r.captions) == 5 for r in data.train.records)
    assert len(data.evaluation.records) == 4 and len(data.test.records) == 4
    assert data.train.table.load(data.train.records[0].row).size == (128, 128)


def test_without_eval_split_karpathys_val_split_is_the_evaluation_split(coco):
    """Karpathy's files name it "val": it was passed over for a held-out 5% of the training images."""
    args = DataArguments(dataset_name=str(coco / "annotations" / "dataset_coco.json"), image_root=str(coco / "images"))
    data = load_caption_splits(args, seed=0, need_eval=True)
    assert data.evaluation.name == "val" and len(data.evaluation.records) == 4 and len(data.train.records) == 14


def test_blip_caption_preprocessing_matches_lavis():
    assert blip_caption("  A Man, riding a horse!! (on the beach).  ") == "a man, riding a horse on the beach"
    assert len(blip_caption("word " * 80).split()) == 50


def test_base_recipe_runs_end_to_end_on_the_fixture(coco, tmp_path, capfd, caplog):
    output_dir = tmp_path / "coco-run"
    # The published recipe as written, except: the model (tiny, offline), the data location, sizes, and the
    # GPU-only switches (torch.compile, worker count) that make no sense on a 2-core CPU.
    result = run_main(
        ["train", "recipes/coco_karpathy/blip_base_full.yaml", "--model_name_or_path", "builtin:tiny-blip",
         "--dataset_name", str(coco / "annotations" / "dataset_coco.json"), "--image_root", str(coco / "images"),
         "--output_dir", str(output_dir), "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
         "--per_device_eval_batch_size", "4", "--torch_compile", "false", "--dataloader_num_workers", "0",
         "--dataloader_persistent_workers", "false", "--dataloader_prefetch_factor", "null", "--logging_steps", "2"],
        capfd, caplog,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    history = read_json(output_dir / "trainer_state.json")
    evaluations = [entry for entry in history["log_history"] if "eval_cider" in entry]
    assert [entry["epoch"] for entry in evaluations] == [1.0, 2.0]
    assert history["best_metric"] == max(entry["eval_cider"] for entry in evaluations)
    test = read_json(output_dir / "test_results.json")
    assert {"test_bleu_4", "test_meteor", "test_rouge_l", "test_cider"} <= set(test)
    predictions = read_jsonl(output_dir / "test_predictions.jsonl")
    assert len(predictions) == 4 and all(len(p["references"]) == 5 for p in predictions)
    assert predictions[0]["references"][3].endswith(".")  # references are scored raw; only training text is cleaned
    events = glob.glob(str(output_dir / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in events:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"])
    assert {"eval/caption_grid", "eval/worst_captions"} <= tags  # the grids reach TensorBoard
    assert "test_cider" in log and "label_smoothing_factor: 0.1" in (output_dir / "README.md").read_text()


def coco_captions_file(path, images, first_id=0):
    """The official COCO captions format from (file_name, captions) pairs, annotations in a shuffled order."""
    entries = [
        {"id": first_id + i, "file_name": name, "height": 128, "width": 128} for i, (name, _) in enumerate(images)
    ]
    annotations = [{"id": 1000 * i + k, "image_id": first_id + i, "caption": caption}
                   for i, (_, captions) in enumerate(images) for k, caption in enumerate(captions)]  # fmt: skip
    annotations = annotations[1::2] + annotations[::2]  # COCO does not keep an image's captions together
    path.write_text(json.dumps({"info": {}, "images": entries, "annotations": annotations}))
    return str(path)


def test_official_coco_captions_format_groups_captions_by_image(coco, tmp_path):
    train = [(f"train2014/{os.path.basename(p)}", [f"caption {k} of {i}" for k in range(5)])
             for i, p in enumerate(sorted(glob.glob(str(coco / "images" / "train2014" / "*.jpg"))))]  # fmt: skip
    path = coco_captions_file(tmp_path / "captions_train2014.json", train)
    args = DataArguments(dataset_name=path, image_root=str(coco / "images"), image_id_column="image_id",
                         validation_split_percentage=25)  # fmt: skip
    data = load_caption_splits(args, seed=0, need_eval=True)
    records = data.train.records + data.evaluation.records
    assert len(records) == 14 and all(len(record.captions) == 5 for record in records)
    by_id = {record.image_id: record for record in records}
    assert sorted(by_id["3"].captions) == [f"caption {k} of 3" for k in range(5)]  # all five, though scattered
    assert data.train.table.load(data.train.records[0].row).mode == "RGB"  # file_name resolved under image_root


def test_a_folder_of_coco_captions_files_gives_train_and_validation(coco, tmp_path):
    folder = tmp_path / "annotations"
    folder.mkdir()
    train = [(f"train2014/{os.path.basename(p)}", ["a caption", "another caption"])
             for p in sorted(glob.glob(str(coco / "images" / "train2014" / "*.jpg")))]  # fmt: skip
    val = [(f"val2014/{os.path.basename(p)}", ["a val caption"])
           for p in sorted(glob.glob(str(coco / "images" / "val2014" / "*.jpg")))]  # fmt: skip
    coco_captions_file(folder / "train.json", train)
    coco_captions_file(folder / "val.json", val, first_id=500)
    args = DataArguments(dataset_name=str(folder), image_root=str(coco / "images"))
    data = load_caption_splits(args, seed=0, need_eval=True)
    assert (len(data.train.records), data.evaluation.name, len(data.evaluation.records)) == (14, "validation", 8)
    assert data.evaluation.records[0].image_id.startswith("val2014/")
