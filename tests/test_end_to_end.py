"""The shapes recipe through the real CLI: CIDEr rises, files are written, the saved model reloads and agrees."""

import os

import pytest
import torch

from blip_recipes.metrics import compute_caption_metrics
from tests.conftest import QUICK, assert_readable_by_everyone, read_json, read_jsonl, run_cli

# Why 1.5: an untrained model, or one that ignores the image and always emits one caption, cannot pass it. The
# untrained tiny BLIP scores ~0.05; the best single caption repeated for every image scores ~1.0 on this
# evaluation set (checked below), because CIDEr's IDF weighting rewards only image-specific words. Above 1.5
# the captions must name colour, shape or position correctly for many images. Three epochs reach ~2.3.
CIDER_THRESHOLD = 1.5


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shapes_dir):
    output_dir = tmp_path_factory.mktemp("shapes-full")
    result = run_cli(
        ["train", "recipes/shapes/full.yaml", "--output_dir", str(output_dir), "--num_train_epochs", "3",
         *QUICK, "--per_device_train_batch_size", "32", "--eval_on_start", "true"]
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir, result


def test_cider_rises_above_threshold(full_run, shapes_dir):
    output_dir, result = full_run
    assert "processes: world_size=1 (not_parallel, device cpu, engine none)" in result.stdout
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr  # DeepSpeed's probe, in a run without it
    history = read_json(output_dir / "trainer_state.json")["log_history"]
    before = [entry for entry in history if "eval_cider" in entry and entry["step"] == 0]
    assert len(before) == 1 and before[0]["eval_cider"] < 0.2
    final = read_json(output_dir / "eval_results.json")
    assert final["eval_cider"] > CIDER_THRESHOLD, final
    for key in ("eval_bleu_1", "eval_bleu_2", "eval_bleu_3", "eval_bleu_4", "eval_meteor", "eval_rouge_l"):
        assert 0.0 <= final[key] <= 1.0
    # The threshold's justification: no constant caption gets there.
    rows = read_jsonl(output_dir / "eval_predictions.jsonl")
    references = [row["references"] for row in rows]
    counts = {}
    for refs in references:
        for ref in refs:
            counts[ref] = counts.get(ref, 0) + 1
    most_common = max(counts, key=counts.get)
    constant = compute_caption_metrics([most_common] * len(rows), references, metrics=["cider"])["cider"]
    assert constant < CIDER_THRESHOLD - 0.3


def test_run_writes_the_promised_files(full_run):
    output_dir, result = full_run
    files = set(os.listdir(output_dir))
    expected = [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
    ]
    expected += [
        "eval_results.json",
        "eval_predictions.jsonl",
        "recipe.yaml",
        "trainer_state.json",
        "training_args.json",
    ]
    assert set(expected) <= files, set(expected) - files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert_readable_by_everyone(output_dir)
    rows = read_jsonl(output_dir / "eval_predictions.jsonl")
    assert len(rows) == 60 and len({row["image_id"] for row in rows}) == 60
    assert set(rows[0]) == {"image_id", "prediction", "references", "scores"} and len(rows[0]["references"]) == 3
    assert "eval_cider" in result.stdout
    # The recipe's decoding settings travel with the full model too (beams 3, lengths 20 / 3, no prompt).
    saved = read_json(output_dir / "generation_config.json")
    assert (saved["num_beams"], saved["max_length"], saved["min_length"], saved["caption_prompt"]) == (3, 20, 3, "")


def test_builtins_are_readable_by_everyone(tiny_model_dir, shapes_dir):
    """A builtin cache shared by several users, or baked into a container image as root, is readable by all."""
    assert os.stat(tiny_model_dir).st_mode & 0o777 == os.stat(shapes_dir).st_mode & 0o777 == 0o755
    assert_readable_by_everyone(tiny_model_dir)


def test_saved_model_reloads_and_generates_the_same_captions(full_run, shapes_dir):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from blip_recipes.transforms import open_image

    output_dir, _ = full_run
    model = BlipForConditionalGeneration.from_pretrained(output_dir).eval()  # stock transformers, eager attention
    processor = BlipProcessor.from_pretrained(output_dir)
    generation = model.generation_config
    assert (generation.num_beams, generation.max_length, generation.min_length) == (3, 20, 3)
    rows = read_jsonl(output_dir / "eval_predictions.jsonl")[:12]
    images = [open_image(os.path.join(shapes_dir, row["image_id"])) for row in rows]  # ids name files (issue 13)
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            pixel_values=inputs.pixel_values,
            num_beams=generation.num_beams,
            max_length=generation.max_length,
            min_length=generation.min_length,
        )
    captions = [" ".join(text.split()) for text in processor.batch_decode(ids, skip_special_tokens=True)]
    assert captions == [row["prediction"] for row in rows]


def test_test_split_is_not_confused_with_the_eval_split_under_persistent_workers(tmp_path, full_run):
    from blip_recipes.builders import build_evaluator
    from blip_recipes.recipe_parser import parse_recipe

    def evaluate(output_dir, *extra):
        recipe = parse_recipe(["recipes/shapes/full.yaml", "--model_name_or_path", str(full_run[0]), "--output_dir",
                               str(output_dir), "--test_split", "train", "--max_eval_samples", "8",
                               "--max_test_samples", "8", "--eval_metrics", "bleu", *extra])  # fmt: skip
        trainer = build_evaluator(recipe, evaluation_layout="per_step")
        if extra:
            trainer.evaluate(metric_key_prefix="eval")
        trainer.evaluate(trainer.test_dataset, metric_key_prefix="test")
        return read_jsonl(output_dir / "evaluations" / "test-step-0" / "predictions.jsonl")

    # Persistent workers keep one cached loader for the eval split; the test split must not be served from it.
    after_eval = evaluate(tmp_path / "a", "--dataloader_num_workers", "1", "--dataloader_persistent_workers", "true")
    alone = evaluate(tmp_path / "b")
    assert [r["image_id"] for r in after_eval] == [f"train/{i:05d}.png" for i in range(8)]  # named by file
    assert [r["prediction"] for r in after_eval] == [r["prediction"] for r in alone]
