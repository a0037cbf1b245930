"""Decoding settings (beams, lengths, prompt) travel with every output and are the default wherever it captions."""

import json
import os

import pytest

from blip_recipes.evaluation import Captioner
from tests.conftest import QUICK, assert_readable_by_everyone, read_json, run_main

PROMPT = "a picture of "
DECODING = {"num_beams": 2, "max_length": 12, "min_length": 4, "prompt": PROMPT}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, shapes_dir):
    from blip_recipes.cli import main

    output_dir = tmp_path_factory.mktemp("lora-prompt-run")
    assert main(["train", "recipes/shapes/lora.yaml", "--output_dir", str(output_dir), "--max_steps", "4", *QUICK,
                 "--prompt", PROMPT, "--generation_num_beams", "2", "--generation_max_length", "12",
                 "--generation_min_length", "4", "--merge_lora", "true"]) == 0  # fmt: skip
    return output_dir


def images(shapes_dir, count=4):
    from PIL import Image

    return [Image.open(os.path.join(shapes_dir, "validation", f"{i:05d}.png")).convert("RGB") for i in range(count)]


def test_adapter_and_merged_model_carry_the_recipes_decoding(lora_run):
    for folder in (lora_run, lora_run / "merged"):
        saved = read_json(folder / "generation_config.json")
        assert (saved["num_beams"], saved["max_length"], saved["min_length"]) == (2, 12, 4), folder
        assert saved["caption_prompt"] == PROMPT, folder
    assert os.path.isfile(lora_run / "adapter_config.json")  # the first folder really is an adapter
    assert_readable_by_everyone(lora_run)  # the adapter and merged/


def test_captioning_defaults_to_the_saved_decoding(lora_run, shapes_dir):
    pictures = images(shapes_dir)
    adapter = Captioner(str(lora_run), device="cpu")
    merged = Captioner(str(lora_run / "merged"), device="cpu")
    assert adapter.decoding == merged.decoding == DECODING
    explicit = Captioner(str(lora_run), device="cpu", **DECODING)
    defaults = adapter.caption(pictures)
    assert defaults == explicit.caption(pictures) == merged.caption(pictures)
    # A flag still overrides: without the prompt the decoder starts elsewhere (the model saw it in every step).
    assert Captioner(str(lora_run), device="cpu", prompt="").decoding["prompt"] == ""


def test_evaluate_with_equals_form_uses_the_saved_decoding(tmp_path, lora_run, capfd, caplog):
    result = run_main(["evaluate", f"--model={lora_run}", "--dataset=builtin:shapes", "--split=validation",
                       "--max_eval_samples=6", "--metrics=bleu,cider", f"--output_dir={tmp_path / 'ev'}"], capfd,
                      caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "decoding: prompt='a picture of ', num_beams=2, max_length=12, min_length=4" in result.stdout + result.stderr
    )
    results = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert {"validation_bleu_4", "validation_cider"} <= set(results)
    # An explicit value wins over the saved one.
    again = run_main(["evaluate", f"--model={lora_run}", "--dataset", "builtin:shapes", "--split", "validation",
                      "--max_eval_samples", "6", "--metrics", "bleu", "--num_beams", "1", "--output_dir",
                      tmp_path / "ev1"], capfd, caplog)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "num_beams=1" in again.stdout + again.stderr


def test_model_card_usage_passes_the_decoding_explicitly(lora_run):
    card = (lora_run / "README.md").read_text()
    assert 'inputs = processor(images=image, text="a picture of ", return_tensors="pt")' in card
    assert "ids = model.generate(**inputs, num_beams=2, max_length=12, min_length=4)" in card
    assert "https://github.com/)" not in card
