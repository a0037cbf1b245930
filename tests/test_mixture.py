"""Several datasets in one run: extra_train_datasets (trained on together), extra_eval_datasets (scored together)."""

import collections
import json
import logging
import os
import shutil

import pytest
import torch
from PIL import Image

from blip_recipes.builders import load_data
from blip_recipes.checkpoints import resume_conflicts
from blip_recipes.data import training_pairs
from blip_recipes.recipe_parser import parse_recipe
from blip_recipes.transforms import ImageTransform
from tests.conftest import QUICK, REPO, read_json, read_jsonl, run_main

RECIPE = os.path.join(REPO, "recipes", "shapes", "full.yaml")
COLORS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 210), "yellow": (230, 220, 30)}


def own_dataset(folder, rows=None) -> str:
    """A JSONL file of four solid-colour images no other dataset has (paths relative to the file, as one's own data
    usually is), with the shapes dataset's column names."""
    os.makedirs(folder / "pictures", exist_ok=True)
    lines = []
    for name, color in COLORS.items():
        Image.new("RGB", (40, 30), color).save(folder / "pictures" / f"{name}.png")
        lines.append({"image": f"pictures/{name}.png", "text": [f"a plain {name} picture", f"all {name}"]})
    with open(folder / "own.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in (rows or lines))
    return str(folder / "own.jsonl")


def test_extra_datasets_are_trained_on_with_their_own_images_and_repeats(tmp_path, shapes_dir, caplog):
    """The mixture is one training split: dataset_name's images, then each extra dataset's (K times with *K), each
    read through its own dataset's folder; evaluation stays dataset_name's."""
    own = own_dataset(tmp_path / "own")
    # Another dataset's own layout: a CSV of bare file names under a folder elsewhere, its own column names
    os.makedirs(tmp_path / "elsewhere" / "photos")
    Image.new("RGB", (20, 20), (250, 250, 250)).save(tmp_path / "elsewhere" / "photos" / "white.png")
    (tmp_path / "listing.csv").write_text("file,words\nwhite.png,a plain white picture\n")
    listing = {"dataset_name": str(tmp_path / "listing.csv"), "image_root": str(tmp_path / "elsewhere" / "photos"),
               "image_column": "file", "caption_column": "words", "repeat": 2}  # fmt: skip
    # image_root is dataset_name's alone: own.jsonl's relative paths are still read next to it
    mixture = json.dumps([f"{own}*3", listing])
    recipe = parse_recipe([RECIPE, "--dataset_name", shapes_dir, "--image_root", str(tmp_path), "--output_dir",
                           str(tmp_path / "run"), "--extra_train_datasets", mixture])  # fmt: skip
    data = load_data(recipe, need_train=True)
    assert len(data.train.records) == 480 + 4 + 1 and not data.extra_train  # each image once; repeats per record
    assert [record.repeat for record in data.train.records[479:]] == [1, 3, 3, 3, 3, 2]
    colors = {**COLORS, "white": (250, 250, 250)}
    assert data.evaluation.name == "validation" and len(data.evaluation.records) == 60
    transform = ImageTransform(8, 8)
    for record in data.train.records[480:]:
        pixels = transform(data.train.table.load(record.row))
        color = record.captions[0].split()[2]
        expected = transform(Image.new("RGB", (40, 30), colors[color]))
        assert torch.equal(pixels, expected), color
    captions = [caption for _, caption in training_pairs(data.train)]
    assert captions.count("a plain red picture") == 3 and captions.count("all blue") == 3
    assert captions.count("a plain white picture") == 2
    assert len(captions) == sum(len(record.captions) for record in data.train.records[:480]) + 3 * 4 * 2 + 2

    # Self-critical training's epoch (one item per image) repeats them too
    from blip_recipes.builders import build_trainer

    scst = parse_recipe([os.path.join(REPO, "recipes", "shapes", "scst.yaml"), "--model_name_or_path",
                         "builtin:tiny-blip", "--dataset_name", shapes_dir, "--output_dir", str(tmp_path / "scst"),
                         "--extra_train_datasets", mixture, "--image_root", str(tmp_path), *QUICK])  # fmt: skip
    items = build_trainer(scst).train_dataset
    times = collections.Counter(items.indices)
    assert len(items) == 480 + 3 * 4 + 2 and (times[0], times[480], times[483], times[484]) == (1, 3, 3, 2)
    assert items[480]["index"] == 480  # Subset item 480: the red image, the split's position 480

    # Each dataset's image check is cached on its own: shapes alone is not decoded again
    caplog.clear()
    caplog.set_level(logging.INFO)
    shapes_only = load_data(parse_recipe([RECIPE, "--dataset_name", shapes_dir, "--output_dir", str(tmp_path / "x")]),
                            need_train=True)  # fmt: skip
    assert [r.captions for r in data.train.records[:480]] == [r.captions for r in shapes_only.train.records]
    assert "images of split 'train': checked before (0 bad), not decoded again" in caplog.text

    # max_train_samples keeps the first N images of each dataset; evaluate (need_train=False) reads no extra dataset
    cut = parse_recipe([RECIPE, "--dataset_name", shapes_dir, "--extra_train_datasets", own,
                        "--max_train_samples", "2", "--output_dir", str(tmp_path / "cut")])  # fmt: skip
    assert [r.captions[0] for r in load_data(cut, need_train=True).train.records][2:] == [
        "a plain red picture", "a plain green picture"
    ]  # fmt: skip
    os.remove(own)
    assert load_data(cut, need_train=False).train is None


def test_a_run_on_a_mixture_trains_caches_and_names_every_dataset(tmp_path, shapes_dir, capfd, caplog):
    """End to end: the image cache and the model card see the mixture; a resume that adds a dataset is refused."""
    own = own_dataset(tmp_path / "own")
    run = ["train", RECIPE, "--dataset_name", shapes_dir, "--extra_train_datasets", f"{own}*2", "--max_steps",
           "2", *QUICK, "--do_eval", "true", "--max_eval_samples", "4", "--image_cache", "true"]  # fmt: skip
    result = run_main([*run, "--output_dir", tmp_path / "run"], capfd, caplog)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"training on 484 images of 2 datasets (488 per epoch): 480 x1 (train), 4 x2 (train of {own})" in log
    assert "cached 484 resized images of split 'train'" in log  # each image once, whatever its repeats
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"on `{os.path.basename(shapes_dir)} + own.jsonl`" in card
    assert "coco-caption metrics (pycocoevalcap, PTB tokenization) on `" + os.path.basename(shapes_dir) in card
    assert len(read_jsonl(tmp_path / "run" / "eval_predictions.jsonl")) == 4

    recorded = str(tmp_path / "run" / "checkpoint-2")  # its recipe: the run's (recorded_recipe)
    without = [RECIPE, "--dataset_name", shapes_dir, *QUICK, "--output_dir", str(tmp_path / "run")]
    resolved = parse_recipe(without).resolved()
    assert resume_conflicts(resolved, recorded)[1] == [f"  extra_train_datasets: ['{own}*2'] -> None"]
    with open(tmp_path / "run" / "recipe.yaml") as handle:  # a run from before the key existed
        older = handle.read().replace(f"extra_train_datasets:\n- {own}*2\n", "")
    assert older.count("extra_train_datasets") == 0
    with open(tmp_path / "run" / "recipe.yaml", "w") as handle:
        handle.write(older)
    assert resume_conflicts(resolved, recorded) is None


def test_bad_and_leaked_rows_of_an_extra_dataset_are_named_by_its_own_rows(tmp_path, shapes_dir, capfd, caplog):
    validation = read_jsonl(os.path.join(shapes_dir, "validation", "metadata.jsonl"))
    rows = [
        {"image": "pictures/red.png", "text": "red"},
        {"image": "pictures/missing.png", "text": "lost"},
        {"image": os.path.join(shapes_dir, "validation", validation[7]["file_name"]), "text": "a scored image"},
        {"image": "pictures/renamed.png", "text": "a scored image under another name"},
    ]
    own = own_dataset(tmp_path / "own", rows)
    shutil.copy(os.path.join(shapes_dir, "validation", validation[9]["file_name"]),
                tmp_path / "own" / "pictures" / "renamed.png")  # fmt: skip
    run = ["train", RECIPE, "--dataset_name", shapes_dir, "--extra_train_datasets", own, *QUICK, "--do_eval",
           "true", "--output_dir", tmp_path / "run"]  # fmt: skip
    result = run_main(run, capfd, caplog)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{shapes_dir}, {own} (training): 3 bad row(s) found before training" in result.stderr
    assert f"split 'train of {own}' row 1 (pictures/missing.png): file not found" in result.stderr
    assert "split 'validation' row 7 (" in result.stderr
    assert f"also a training image (split 'train of {own}' row 2)" in result.stderr
    assert ("split 'validation' row 9 (" in result.stderr and "a copy of training image pictures/renamed.png "
            f"(split 'train of {own}' row 3): the same bytes under another name" in result.stderr)  # fmt: skip
    assert not os.path.exists(tmp_path / "run" / "recipe.yaml")

    skipped = run_main([*run[:-1], tmp_path / "skipped", "--skip_bad_samples", "true", "--max_steps", "1",
                        "--max_eval_samples", "10"], capfd, caplog)  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    said = skipped.stdout + skipped.stderr
    assert "training on 483 images of 2 datasets (483 per epoch): 480 x1 (train), 3 x1" in said
    predicted = read_jsonl(tmp_path / "skipped" / "eval_predictions.jsonl")  # the leaked images are not scored
    assert len(predicted) == 8 and {validation[7]["file_name"], validation[9]["file_name"]}.isdisjoint(
        row["image_id"] for row in predicted
    )


TIMES = "the times per epoch (SOURCE*K, or repeat) must be a whole number from 1 to 1000"


@pytest.mark.parametrize(
    "entries, keys, said",
    [
        ("OWN*0", [], f"'OWN*0': {TIMES}"),
        ("OWN*two", [], f"'OWN*two': {TIMES}"),
        ("[{dataset_name: OWN, repeat: 1.5}]", [], TIMES),
        (
            "OWN,OWN*2",
            [],
            "'OWN*2': its 'train' split is already trained on (dataset_name or an entry before); to "
            "train on a dataset more often, give it once with a number of times (SOURCE*K, or repeat)",
        ),
        ("SHAPES", [], "'SHAPES': its 'train' split is already trained on"),
        ("*3", [], "'*3' names no dataset"),
        ("[{image_root: /data}]", [], "names no dataset (dataset_name)"),
        (
            "[{dataset_name: OWN, caption: text}]",
            [],
            "unknown key(s) caption; an entry takes dataset_name, dataset_config_name, dataset_revision, "
            "image_root, image_column, caption_column, image_id_column, train_split, repeat",
        ),
        ("[{dataset_name: OWN, caption_column: null}]", [], "caption_column must be text, got None"),
        ("[[OWN]]", [], "an entry is a dataset (SOURCE or SOURCE*K) or a mapping with dataset_name"),
        ("OWN", ["--streaming", "true", "--max_steps", "2", *QUICK], "extra_train_datasets mixes map-style datasets"),
    ],
)
def test_a_mixture_that_cannot_be_read_is_refused_before_anything_loads(tmp_path, shapes_dir, entries, keys, said):
    from blip_recipes.config import RecipeError

    own = own_dataset(tmp_path / "own")
    entries = entries.replace("OWN", own).replace("SHAPES", shapes_dir)
    with pytest.raises(RecipeError) as error:
        parse_recipe([RECIPE, "--dataset_name", shapes_dir, "--extra_train_datasets", entries, *keys,
                      "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert said.replace("OWN", own).replace("SHAPES", shapes_dir) in str(error.value)


def test_an_extra_dataset_with_other_columns_or_a_missing_root_is_named(tmp_path, shapes_dir):
    from blip_recipes.data import DataError

    own = own_dataset(tmp_path / "own", [{"image": "pictures/red.png", "caption": "red"}])

    def load(entry):
        recipe = parse_recipe([RECIPE, "--dataset_name", shapes_dir, "--extra_train_datasets", json.dumps([entry]),
                               "--output_dir", str(tmp_path / "run")])  # fmt: skip
        with pytest.raises(DataError) as error:
            load_data(recipe, need_train=True)
        return str(error.value)

    assert load(own) == (
        f"{own}: split 'train' has no column 'text' (columns: image, caption): an extra_train_datasets entry is read "
        f"with the recipe's caption_column unless it sets its own: {{dataset_name: {own}, caption_column: ...}}"
    )
    assert load({"dataset_name": own, "caption_column": "words"}).endswith(
        "has no column 'words' (columns: image, caption): its extra_train_datasets entry sets caption_column"
    )
    assert load({"dataset_name": own, "caption_column": "caption", "image_root": str(tmp_path / "nowhere")}) == (
        f"{own}: image_root {tmp_path / 'nowhere'}: no such directory"
    )


def test_extra_evaluation_datasets_are_scored_at_every_evaluation_under_their_own_names(
    tmp_path, shapes_dir, capfd, caplog
):
    """extra_eval_datasets: each scored beside the validation split at every evaluation (eval_NAME_*), one of them
    can pick the best checkpoint, the final evaluation writes each one's files, the card files each result under its
    own dataset; an extra evaluation image that is a training image is a bad row like any scored one."""
    own = own_dataset(tmp_path / "own")
    (tmp_path / "listing.csv").write_text(f"image,text\n{tmp_path / 'own' / 'pictures' / 'red.png'},red\n")
    extras = json.dumps([{"dataset_name": own, "name": "colors"}, str(tmp_path / "listing.csv")])
    run = ["train", RECIPE, "--dataset_name", shapes_dir, "--extra_eval_datasets", extras, "--max_steps", "2", *QUICK,
           "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
           "--max_eval_samples", "4", "--load_best_model_at_end", "true", "--metric_for_best_model",
           "colors_cider"]  # fmt: skip
    result = run_main([*run, "--output_dir", tmp_path / "run"], capfd, caplog)
    assert result.returncode == 0, result.stderr[-3000:]
    state = read_json(tmp_path / "run" / "trainer_state.json")
    scored = {entry["step"]: entry for entry in state["log_history"] if "eval_colors_cider" in entry}
    assert sorted(scored) == [1, 2]
    assert sorted(entry["step"] for entry in state["log_history"] if "eval_listing_cider" in entry) == [1, 2]
    best_step = max(scored, key=lambda step: scored[step]["eval_colors_cider"])
    assert state["best_metric"] == scored[best_step]["eval_colors_cider"]
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    predicted = read_jsonl(tmp_path / "run" / "eval_colors_predictions.jsonl")
    assert sorted(row["image_id"] for row in predicted) == sorted(f"pictures/{name}.png" for name in COLORS)
    assert read_json(tmp_path / "run" / "eval_listing_results.json")["eval_listing_cider"] >= 0
    assert len(read_jsonl(tmp_path / "run" / "eval_predictions.jsonl")) == 4
    card = (tmp_path / "run" / "README.md").read_text()
    assert "name: own.jsonl" in card and "name: listing.csv" in card
    assert f"on `{os.path.basename(shapes_dir)}`, `own.jsonl`, `listing.csv`" in card
    # `evaluate` with the run's recipe scores them too, each into a folder of its name, with the run's numbers
    evaluate = ["evaluate", tmp_path / "run" / "recipe.yaml", "--model", tmp_path / "run"]
    again = run_main([*evaluate, "--output_dir", tmp_path / "scored"], capfd, caplog)
    assert again.returncode == 0, again.stderr[-3000:]
    results = read_json(tmp_path / "scored" / "eval_results.json")
    for name in ("colors", "listing"):
        final = read_json(tmp_path / "run" / f"eval_{name}_results.json")
        assert results[f"{name}_cider"] == final[f"eval_{name}_cider"] and results[f"{name}_bleu_4"] == final[
            f"eval_{name}_bleu_4"]  # fmt: skip
        assert read_json(tmp_path / "scored" / name / "metrics.json")["cider"] == results[f"{name}_cider"]
    assert read_jsonl(tmp_path / "scored" / "colors" / "predictions.jsonl") == read_jsonl(
        tmp_path / "run" / "eval_colors_predictions.jsonl")  # fmt: skip
    assert results["validation_cider"] == read_json(tmp_path / "run" / "eval_results.json")["eval_cider"]
    assert len(read_jsonl(tmp_path / "scored" / "predictions.jsonl")) == 4  # the evaluation split's, as before
    named_as_split = json.dumps([{"dataset_name": own, "name": "validation"}])
    clash = run_main([*evaluate, "--extra_eval_datasets", named_as_split, "--metric_for_best_model", "cider",
                      "--output_dir", tmp_path / "clash"], capfd, caplog)  # fmt: skip
    assert clash.returncode == 2 and "'validation' is the name of the split evaluate scores" in clash.stderr
    # ... unless --dataset names what to score: then they are not even read
    os.remove(tmp_path / "listing.csv")
    alone = run_main([*evaluate, "--dataset", shapes_dir, "--output_dir", tmp_path / "alone"], capfd, caplog)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert not (tmp_path / "alone" / "colors").exists() and "validation_cider" in read_json(
        tmp_path / "alone" / "eval_results.json")  # fmt: skip
    assert not any(
        key.startswith(("colors", "listing")) for key in read_json(tmp_path / "alone" / "eval_results.json")
    )

    leaked = {"dataset_name": str(tmp_path / "leaked.jsonl"), "name": "colors"}
    train_image = read_jsonl(os.path.join(shapes_dir, "train", "metadata.jsonl"))[5]["file_name"]
    (tmp_path / "leaked.jsonl").write_text(json.dumps({"image": os.path.join(shapes_dir, "train", train_image),
                                                       "text": "a training image"}) + "\n")  # fmt: skip
    refused = run_main([*run[:5], json.dumps([leaked]), *run[6:], "--output_dir", tmp_path / "leak"], capfd, caplog)
    assert refused.returncode == 2
    assert "split 'train of colors' row 0 (" in refused.stderr
    assert "also a training image (split 'train' row 5)" in refused.stderr


@pytest.mark.parametrize(
    "entries, keys, said",
    [
        ("[{dataset_name: OWN, name: Colors}]", [], "name 'Colors' must be lowercase letters, digits and _"),
        ("[OWN, {dataset_name: OTHER, name: own}]", [], "are both named 'own' (their metrics would mix)"),
        ("[{dataset_name: OWN, train_split: x}]", [], "unknown key(s) train_split; an entry takes dataset_name"),
        ("[{dataset_name: OWN, name: generation}]", [], "the name 'generation' is taken by the evaluation split's"),
        ("OWN", QUICK, "extra_eval_datasets are scored at each evaluation, and this run"),
        (
            "OWN",
            ["--metric_for_best_model", "nocaps_cider", "--load_best_model_at_end", "true"],
            "metric_for_best_model 'nocaps_cider' is not computed",
        ),
    ],
)
def test_extra_evaluation_datasets_that_cannot_be_scored_are_refused(tmp_path, shapes_dir, entries, keys, said):
    from blip_recipes.config import RecipeError

    own = own_dataset(tmp_path / "own")
    entries = entries.replace("OWN", own).replace("OTHER", str(tmp_path / "other" / "own.csv"))
    with pytest.raises(RecipeError) as error:
        parse_recipe([RECIPE, "--dataset_name", shapes_dir, "--extra_eval_datasets", entries, *keys,
                      "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert said in str(error.value)
