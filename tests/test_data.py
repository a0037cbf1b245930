"""Every supported data source loads; bad input fails before training with the file, row and reason."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blip_recipes.config import DataArguments
from blip_recipes.data import DataError, load_caption_splits
from tests.conftest import QUICK, run_main


def make_jsonl_dataset(tmp_path, shapes_dir, rows=12, one_row_per_caption=False):
    """A JSONL file of relative image paths, built from the shapes images."""
    metadata = [json.loads(line) for line in open(os.path.join(shapes_dir, "train", "metadata.jsonl"))][:rows]
    os.makedirs(tmp_path / "images", exist_ok=True)
    with open(tmp_path / "data.jsonl", "w") as handle:
        for record in metadata:
            shutil.copy(os.path.join(shapes_dir, "train", record["file_name"]), tmp_path / "images")
            image = f"images/{record['file_name']}"
            if one_row_per_caption:
                for caption in record["text"]:
                    handle.write(json.dumps({"image": image, "caption": caption}) + "\n")
            else:
                handle.write(json.dumps({"image": image, "caption": record["text"]}) + "\n")
    return str(tmp_path / "data.jsonl")


def test_evaluation_images_that_are_training_images_are_named(tmp_path, shapes_dir, caplog):
    """A dataset split by row before it reached us puts images in both splits: their scores would be recall."""
    make_jsonl_dataset(tmp_path, shapes_dir, rows=12)
    rows = open(tmp_path / "data.jsonl").read().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(rows[:10]))
    (tmp_path / "validation.jsonl").write_text("".join(rows[8:]))  # images 8 and 9 are in both
    os.remove(tmp_path / "data.jsonl")
    arguments = {"dataset_name": str(tmp_path), "caption_column": "caption", "image_column": "image"}
    with pytest.raises(DataError) as error:
        load_caption_splits(DataArguments(**arguments), seed=0, need_eval=True)
    assert "2 bad row(s) found before training" in str(error.value)
    assert "split 'validation' row 0 (images/00008.png): also a training image (split 'train' row 8)" in str(
        error.value
    )
    assert "split 'validation' row 1 (images/00009.png): also a training image (split 'train' row 9)" in str(
        error.value
    )
    kept = load_caption_splits(DataArguments(**arguments, skip_bad_samples=True), seed=0, need_eval=True)
    assert [record.image_id for record in kept.evaluation.records] == ["images/00010.png", "images/00011.png"]
    assert len(kept.train.records) == 10  # training keeps them
    # Evaluating on the training split itself is a choice (the football recipe), said in the log.
    same = load_caption_splits(DataArguments(**arguments, eval_split="train"), seed=0, need_eval=True)
    assert len(same.evaluation.records) == 10
    assert "split 'train' is also the training split: its scores measure the fit on training images" in caplog.text


def test_a_scored_image_that_is_a_training_image_under_another_name_is_found(tmp_path, shapes_dir, caplog):
    """The same bytes under another file name (a copy made before the data was split, a renamed export): the image
    check hashes each file it decodes, so a copy is found like the same file is, also from the check's cache."""
    make_jsonl_dataset(tmp_path, shapes_dir, rows=12)
    rows = open(tmp_path / "data.jsonl").read().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(rows[:10]))
    os.makedirs(tmp_path / "copies")
    shutil.copy(tmp_path / "images" / "00003.png", tmp_path / "copies" / "renamed.png")
    copy = json.dumps({"image": "copies/renamed.png", "caption": ["a shape"]}) + "\n"
    (tmp_path / "validation.jsonl").write_text("".join(rows[10:]) + copy)
    os.remove(tmp_path / "data.jsonl")
    arguments = {"dataset_name": str(tmp_path), "caption_column": "caption"}
    said = ("split 'validation' row 2 (copies/renamed.png): a copy of training image images/00003.png (split 'train' "
            "row 3): the same bytes under another name")  # fmt: skip
    for attempt in ("decoded", "from the image check's cache"):
        caplog.clear()
        caplog.set_level(logging.INFO)
        with pytest.raises(DataError) as error:
            load_caption_splits(DataArguments(**arguments), seed=0, need_eval=True)
        assert "1 bad row(s) found before training" in str(error.value) and said in str(error.value), attempt
        assert ("not decoded again" in caplog.text) == (attempt != "decoded")
    kept = load_caption_splits(DataArguments(**arguments, skip_bad_samples=True), seed=0, need_eval=True)
    assert [record.image_id for record in kept.evaluation.records] == ["images/00010.png", "images/00011.png"]
    # Held out of one file: a copy of a training image in the held-out part is found too
    (tmp_path / "train.jsonl").write_text("".join(rows[:10]) + copy)
    os.remove(tmp_path / "validation.jsonl")
    for seed in range(20):  # a seed that holds out the copy and keeps the original for training
        data = load_caption_splits(DataArguments(**arguments, skip_bad_samples=True, validation_split_percentage=30),
                                   seed=seed, need_eval=True)  # fmt: skip
        trained = {record.image_id for record in data.train.records}
        if "images/00003.png" in trained:
            assert "copies/renamed.png" not in {record.image_id for record in data.evaluation.records}
            assert "a copy of training image images/00003.png" in caplog.text
            break
    else:
        pytest.fail("no seed held out the copy")


def test_imagefolder_with_validation_split(shapes_dir):
    data = load_caption_splits(DataArguments(dataset_name=shapes_dir), seed=0, need_eval=True)
    train, evaluation = data.train, data.evaluation
    assert (train.name, len(train.records)) == ("train", 480)
    assert (evaluation.name, len(evaluation.records)) == ("validation", 60)
    assert len(train.records[0].captions) == 3
    assert train.table.load(train.records[0].row).mode == "RGB"


def test_jsonl_paths_grouped_by_image_and_held_out_by_image(tmp_path, shapes_dir):
    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=20, one_row_per_caption=True)
    args = DataArguments(dataset_name=path, caption_column="caption", validation_split_percentage=25)
    data = load_caption_splits(args, seed=0, need_eval=True)
    train, evaluation = data.train, data.evaluation
    assert len(train.records) + len(evaluation.records) == 20  # 60 rows, 20 images
    assert len(evaluation.records) == 5
    assert all(len(record.captions) == 3 for record in train.records + evaluation.records)
    assert not {r.image_id for r in train.records} & {r.image_id for r in evaluation.records}


def test_save_to_disk_and_csv(tmp_path, shapes_dir):
    import datasets

    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=6)
    loaded = datasets.load_dataset("json", data_files=path)["train"]
    loaded = loaded.map(lambda row: {"image": str(tmp_path / row["image"]), "caption": row["caption"][0]})
    loaded = loaded.cast_column("image", datasets.Image())
    loaded.save_to_disk(str(tmp_path / "saved"))
    train = load_caption_splits(
        DataArguments(dataset_name=str(tmp_path / "saved"), caption_column="caption"), 0, False
    ).train
    assert len(train.records) == 6 and train.table.load(0).size == (128, 128)

    with open(tmp_path / "train.csv", "w") as handle:
        handle.write("file,text\nimages/00000.png,a thing\nimages/00001.png,another thing\n")
    os.makedirs(tmp_path / "csvset", exist_ok=True)
    shutil.move(str(tmp_path / "train.csv"), tmp_path / "csvset" / "train.csv")
    shutil.copytree(tmp_path / "images", tmp_path / "csvset" / "images")
    train = load_caption_splits(
        DataArguments(dataset_name=str(tmp_path / "csvset"), image_column="file"), 0, False
    ).train
    assert [r.captions for r in train.records] == [["a thing"], ["another thing"]]


def test_missing_column_is_named(tmp_path, shapes_dir):
    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=3)
    with pytest.raises(DataError, match=r"data.jsonl: split 'train' has no column 'text' \(columns: image, caption\)"):
        load_caption_splits(DataArguments(dataset_name=path), 0, False)
    with pytest.raises(DataError, match=r"has no column 'picture'"):
        load_caption_splits(
            DataArguments(dataset_name=path, caption_column="caption", image_column="picture"), 0, False
        )


def test_missing_split_and_eval_without_a_split(tmp_path, shapes_dir):
    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=3)
    args = DataArguments(dataset_name=path, caption_column="caption", eval_split="test")
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train\)"):
        load_caption_splits(args, 0, True)
    args = DataArguments(dataset_name=path, caption_column="caption", validation_split_percentage=0)
    with pytest.raises(DataError, match="evaluation is requested but the dataset has no 'validation' split"):
        load_caption_splits(args, 0, True)


def test_a_hold_out_share_for_a_dataset_with_an_evaluation_split_is_refused(shapes_dir):
    """validation_split_percentage was ignored when the dataset has a 'validation' split (or eval_split names one):
    the run trained on every training image and evaluated elsewhere than the recipe said. 0 (hold out nothing) and
    the default (a recorded recipe.yaml holds it) pass; so does a run that evaluates nothing."""
    args = DataArguments(dataset_name=shapes_dir, validation_split_percentage=10)
    said = r": validation_split_percentage \(10\) holds out training images only for a dataset without an evaluation "
    with pytest.raises(DataError, match=said + "split, and this one evaluates on 'validation': remove "):
        load_caption_splits(args, 0, True)
    assert len(load_caption_splits(args, 0, need_eval=False).train.records) == 480
    for share in (0, 5):
        data = load_caption_splits(DataArguments(dataset_name=shapes_dir, validation_split_percentage=share), 0, True)
        assert (len(data.train.records), data.evaluation.name) == (480, "validation")


def test_a_cut_split_is_named_as_a_part_and_the_test_split_has_its_own_limit(tmp_path, shapes_dir):
    """max_eval_samples also cut test_split, and results named the part as the split: CIDEr on the first 500
    Karpathy test images went to the card as the test split's. The test split now has max_test_samples, and a cut
    split's label (card, logs, final evaluation) says which part it is."""
    data = load_caption_splits(DataArguments(dataset_name=shapes_dir, max_eval_samples=10, test_split="validation"),
                               0, True)  # fmt: skip
    assert (data.evaluation.label, len(data.evaluation.records)) == ("validation (first 10 of 60 images)", 10)
    assert (data.test.label, len(data.test.records)) == ("validation", 60)
    data = load_caption_splits(DataArguments(dataset_name=shapes_dir, max_test_samples=5, test_split="validation",
                                             max_eval_samples=60, validation_split_percentage=0), 0, True)  # fmt: skip
    assert (data.evaluation.label, data.test.label) == ("validation", "validation (first 5 of 60 images)")
    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=12)
    held_out = load_caption_splits(
        DataArguments(dataset_name=path, caption_column="caption", validation_split_percentage=50, max_eval_samples=2),
        0,
        True,
    )
    assert held_out.evaluation.label == "train (held-out part, first 2 of 6 images)"


def test_a_separate_evaluation_dataset_is_scored_and_named_as_such(tmp_path, shapes_dir, capfd, caplog):
    """eval_dataset_name (streaming only until now) with a map-style training set: a training file and an evaluation
    file side by side, the usual layout of one's own data. The evaluation file's one split is scored whole; the
    card's results name that dataset, not the training one; an evaluation image that is a training image (the same
    file, reached from the other dataset's folder) is found; `evaluate` with the run's recipe scores it too."""
    from tests.conftest import read_jsonl

    train = make_jsonl_dataset(tmp_path / "train", shapes_dir, rows=12)
    os.makedirs(tmp_path / "val")
    metadata = [json.loads(line) for line in open(os.path.join(shapes_dir, "validation", "metadata.jsonl"))][:5]
    with open(tmp_path / "val" / "val.jsonl", "w") as handle:
        for record in metadata:
            shutil.copy(os.path.join(shapes_dir, "validation", record["file_name"]), tmp_path / "val")
            handle.write(json.dumps({"image": record["file_name"], "caption": record["text"]}) + "\n")
    run = ["train", "recipes/shapes/full.yaml", "--dataset_name", train, "--eval_dataset_name",
           tmp_path / "val" / "val.jsonl", "--caption_column", "caption", "--max_steps", "1", *QUICK,
           "--do_eval", "true"]  # fmt: skip
    result = run_main([*run, "--output_dir", tmp_path / "run"], capfd, caplog)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = read_jsonl(tmp_path / "run" / "eval_predictions.jsonl")
    assert sorted(row["image_id"] for row in predicted) == sorted(record["file_name"] for record in metadata)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "coco-caption metrics (pycocoevalcap, PTB tokenization) on `val.jsonl`" in card
    assert "name: val.jsonl" in card and "split: train of val.jsonl" in card and "name: data.jsonl" not in card

    # evaluate with the run's recipe scores eval_dataset_name; --dataset names another
    evaluated = run_main(["evaluate", tmp_path / "run" / "recipe.yaml", "--model", tmp_path / "run", "--output_dir",
                          tmp_path / "scored", "--num_beams", "1"], capfd, caplog)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "scored" / "predictions.jsonl")) == 5

    with open(tmp_path / "val" / "val.jsonl", "a") as handle:  # a training image, by its path from val/
        handle.write(json.dumps({"image": "../train/images/" + os.listdir(tmp_path / "train" / "images")[0],
                                 "caption": "a shape"}) + "\n")  # fmt: skip
    leaked = run_main([*run, "--output_dir", tmp_path / "leaked"], capfd, caplog)
    assert leaked.returncode == 2
    assert "split 'train of val.jsonl' row 5 (../train/images/" in leaked.stderr
    assert "also a training image (split 'train' row" in leaked.stderr
    held_out = run_main(
        [*run, "--output_dir", tmp_path / "both", "--validation_split_percentage", "10"], capfd, caplog
    )
    assert held_out.returncode == 2
    assert "validation_split_percentage holds out training images for evaluation, and eval_dataset_name" in (
        held_out.stderr
    )


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(Exception, match="empty.jsonl"):
        load_caption_splits(DataArguments(dataset_name=str(tmp_path / "empty.jsonl")), 0, False)


def test_cli_fails_before_training_on_an_unreadable_image(tmp_path, shapes_dir, capfd, caplog):
    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=8)
    lines = open(path).read().splitlines()
    lines[3] = json.dumps({"image": "images/missing.png", "caption": "a lost image"})
    open(path, "w").write("\n".join(lines) + "\n")
    output_dir = tmp_path / "out"
    result = run_main(
        ["train", "recipes/shapes/full.yaml", "--dataset_name", path, "--caption_column", "caption",
         "--output_dir", str(output_dir), "--max_steps", "2", *QUICK], capfd, caplog
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-2000:]
    assert "1 bad row(s) found before training" in log
    assert "split 'train' row 3 (images/missing.png): file not found" in log
    assert "skip_bad_samples: true" in log
    assert not os.path.exists(output_dir / "trainer_state.json") and not os.path.exists(output_dir / "recipe.yaml")


def test_cli_names_a_missing_caption_column(tmp_path, shapes_dir, capfd, caplog):
    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=4)
    result = run_main(
        ["train", "recipes/shapes/full.yaml", "--dataset_name", path, "--output_dir", str(tmp_path / "o"), *QUICK],
        capfd,
        caplog,
    )
    assert result.returncode == 2
    assert "split 'train' has no column 'text' (columns: image, caption)" in result.stdout + result.stderr


def test_resized_image_cache_is_exact_and_reused(tmp_path, shapes_dir):
    from blip_recipes.data import CaptionEvalDataset, ResizedImageCache
    from blip_recipes.transforms import ImageTransform

    evaluation = load_caption_splits(DataArguments(dataset_name=shapes_dir), seed=0, need_eval=True).evaluation
    transform = ImageTransform(64, 64)
    cache = ResizedImageCache.build(evaluation, transform, str(tmp_path))
    assert len(cache) == 60
    dataset = CaptionEvalDataset(evaluation, transform, cache)
    plain = CaptionEvalDataset(evaluation, transform)
    for index in (0, 17, 59):
        assert torch.equal(dataset[index]["pixel_values"], plain[index]["pixel_values"])
    modified = os.stat(cache.path).st_mtime_ns
    again = ResizedImageCache.build(evaluation, transform, str(tmp_path))
    assert again.path == cache.path and os.stat(cache.path).st_mtime_ns == modified  # reused, not rebuilt
    assert ResizedImageCache.build(evaluation, ImageTransform(32, 32), str(tmp_path)).path != cache.path
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(cache))[3], cache[3])  # workers re-open the map by path


def test_an_interrupted_image_cache_leaves_no_partial_file(tmp_path, shapes_dir):
    """A half-filled cache (COCO at 384 px: ~50 GB) is removed when its build stops (error, Ctrl-C, SIGTERM), and one
    left by a killed process of this host is removed by the next build; another host's may still be filling."""
    import socket

    from blip_recipes.data import ResizedImageCache
    from blip_recipes.transforms import ImageTransform

    evaluation = load_caption_splits(DataArguments(dataset_name=shapes_dir), seed=0, need_eval=True).evaluation
    calls = []

    class Interrupted(ImageTransform):
        def __call__(self, image):
            calls.append(1)
            if len(calls) == 10:
                raise KeyboardInterrupt
            return super().__call__(image)

    with pytest.raises(KeyboardInterrupt):
        ResizedImageCache.build(evaluation, Interrupted(64, 64), str(tmp_path), workers=1)
    assert os.listdir(tmp_path) == []
    cache = ResizedImageCache.build(evaluation, ImageTransform(64, 64), str(tmp_path))
    os.remove(cache.path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed, elsewhere = f"{cache.path}.{host}.{gone.stdout.strip()}.tmp", f"{cache.path}.other-host.{os.getpid()}.tmp"
    for path in (killed, elsewhere):
        open(path, "wb").close()
    assert ResizedImageCache.build(evaluation, ImageTransform(64, 64), str(tmp_path)).path == cache.path
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(cache.path), os.path.basename(elsewhere)])


def test_image_checks_are_cached_by_fingerprint(tmp_path, shapes_dir, monkeypatch):
    """A second load of unchanged data decodes nothing; a changed file is checked again."""
    from blip_recipes.data.records import ImageTable

    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=6)
    args = DataArguments(dataset_name=path, caption_column="caption")
    decoded = []
    real_load = ImageTable.load
    monkeypatch.setattr(ImageTable, "load", lambda table, row: decoded.append(row) or real_load(table, row))
    load_caption_splits(args, 0, False)
    assert len(decoded) == 6
    load_caption_splits(args, 0, False)
    assert len(decoded) == 6  # cached: nothing decoded again
    image = sorted(os.listdir(tmp_path / "images"))[2]
    (tmp_path / "images" / image).write_bytes(b"not a png any more")
    with pytest.raises(DataError, match=f"images/{image}"):
        load_caption_splits(args, 0, False)
    assert len(decoded) == 12


def test_resized_image_cache_refuses_a_disk_without_the_space(tmp_path, shapes_dir, monkeypatch):
    import collections

    from blip_recipes.data import ResizedImageCache
    from blip_recipes.data.image_cache import CacheSpaceError
    from blip_recipes.transforms import ImageTransform

    evaluation = load_caption_splits(DataArguments(dataset_name=shapes_dir), seed=0, need_eval=True).evaluation
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 500_000, 500_000))
    with pytest.raises(CacheSpaceError, match=r"split 'validation' needs 0.7 MiB in .* which has 0.5 MiB free"):
        ResizedImageCache.build(evaluation, ImageTransform(64, 64), str(tmp_path))  # 60 x 3 x 64 x 64 = 737 kB
    assert not os.listdir(tmp_path)  # refused before writing anything
