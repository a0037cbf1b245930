"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch` with the project's own configs (accelerate_configs/), two
CPU processes: DeepSpeed picks its CPU accelerator and gloo by itself. `make test` installs the `deepspeed` extra; its
first launch compiles a small communication op into TORCH_EXTENSIONS_DIR (torch's cache, shared by every test here).

Each engine trains, evaluates (captions generated under sharding, equal to one process scoring the saved model),
saves the checkpoint a one-process run writes and counts parameters right; under ZeRO-3 it also resumes bit for bit,
and LoRA starts from the adapters a one-process run draws from the same seed (each run once, for the suite's time)."""

import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import QUICK, REPO, read_json, read_jsonl, run_cli, run_main

pytest.importorskip("deepspeed", reason="pip install -e .[deepspeed] (make test installs it)")

STAGES = ["zero2", "zero3"]
PORTS = {"zero2": 29641, "zero3": 29651}


def launch(stage: str, recipe: str, output_dir, *args, port_offset: int = 0):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(REPO, "accelerate_configs", f"deepspeed_{stage}.yaml"), "--num_processes", "2",
                "--main_process_port", str(PORTS[stage] + port_offset), "-m", "blip_recipes.cli"]  # fmt: skip
    result = run_cli(
        ["train", f"recipes/shapes/{recipe}.yaml", "--output_dir", str(output_dir), *QUICK,
         "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "7", "--do_eval", "true",
         "--max_eval_samples", "20",  # two steps of 2 x 7, the last one padded by the sampler
         "--eval_metrics", "bleu,cider",  # no METEOR: its JVM takes ~8 s of CPU (under DDP: test_distributed)
         "--log_level_replica", "info", *args],
        launcher=launcher,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    engine = "DeepSpeed ZeRO-" + stage[-1]
    assert len(re.findall(rf"world_size=2 \(distributed, device cpu(:\d)?, engine {engine}\)", log)) == 2, log[-3000:]
    return log


def logged_steps(output_dir, after: int) -> list[dict]:
    history = read_json(os.path.join(output_dir, "trainer_state.json"))["log_history"]
    return [entry for entry in history if entry.get("step", 0) > after and "loss" in entry]


@pytest.mark.parametrize("stage", STAGES)
def test_full_training_saves_standard_weights_and_resumes_exactly(stage, tmp_path, tiny_model_dir, capfd, caplog):
    straight = tmp_path / "straight"
    log = launch(
        stage,
        "full",
        straight,
        "--max_steps",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--save_total_limit",
        "2",
    )
    # Counted from the full sizes, not ZeRO-3's empty per-process placeholders.
    assert "training_mode=full: 200,245 of 200,245 parameters train (100.00%)" in log

    # The checkpoint a one-process run writes: the same tensor names (stock LayerNorm names, no tied duplicates).
    saved = load_file(straight / "model.safetensors")
    assert set(saved) == set(load_file(os.path.join(tiny_model_dir, "model.safetensors")))
    from transformers import BlipForConditionalGeneration

    _, info = BlipForConditionalGeneration.from_pretrained(straight, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # The captions generated under sharding are the captions one process generates from the saved model.
    single = run_main(["evaluate", "--model", straight, "--dataset", "builtin:shapes", "--split", "validation",
                       "--max_eval_samples", "20", "--batch_size", "7", "--output_dir", tmp_path / "single"],
                      capfd, caplog)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    distributed = read_jsonl(straight / "eval_predictions.jsonl")
    assert len(distributed) == 20
    assert [row["prediction"] for row in read_jsonl(tmp_path / "single" / "predictions.jsonl")] == [
        row["prediction"] for row in distributed
    ]
    assert read_json(tmp_path / "single" / "eval_results.json")["validation_cider"] == pytest.approx(
        read_json(straight / "eval_results.json")["eval_cider"], abs=1e-12
    )

    # Interrupted after step 2 and resumed: the same weights bit for bit, the same losses. ZeRO-3 only, to keep the
    # suite's time: the Trainer resumes both stages through the same DeepSpeed load_checkpoint, and ZeRO-3's
    # checkpoint (sharded parameters as well as optimizer state) is the harder of the two.
    if stage == "zero2":
        return
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    launch(stage, "full", resumed, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
           "--do_eval", "false", "--resume_from_checkpoint", "true", port_offset=1)  # fmt: skip
    again = load_file(resumed / "model.safetensors")
    assert set(again) == set(saved)
    assert all(torch.equal(again[name], saved[name]) for name in saved)
    assert logged_steps(resumed, after=2) == logged_steps(straight, after=2) and len(logged_steps(straight, 2)) == 2


@pytest.fixture(scope="module")
def one_process_lora(tmp_path_factory, builtin_cache):
    """The LoRA recipe in one process with the same global batch (2 x 8) and seed: its adapters after 3 steps."""
    from blip_recipes.builders import build_trainer
    from blip_recipes.recipe_parser import parse_recipe

    output_dir = tmp_path_factory.mktemp("lora-one-process")
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "lora.yaml"), "--output_dir", str(output_dir),
                           *LORA_ARGS, *QUICK, "--per_device_train_batch_size", "16"])  # fmt: skip
    from transformers import set_seed

    set_seed(recipe.training.seed)
    trainer = build_trainer(recipe)
    trainer.train()
    return {name: tensor.detach().clone() for name, tensor in trainer.model.named_parameters() if tensor.requires_grad}


# No LoRA dropout (one process and two draw different masks); no vision-feature store (DeepSpeed shards the encoder).
LORA_ARGS = ["--max_steps", "3", "--lora_dropout", "0", "--cache_vision_features", "false"]


def test_lora_matches_one_process_under_zero3(tmp_path, one_process_lora):
    """ZeRO-3 (the frozen base sharded, the adapters trained); ZeRO-2 shards only optimizer state and gradients, the
    same for LoRA's few trainable tensors as for the full model's (test_full_training_...[zero2])."""
    output_dir = tmp_path / "lora"
    log = launch("zero3", "lora", output_dir, *LORA_ARGS, port_offset=2)
    assert "training_mode=lora: 47,104 of 247,349 parameters train (19.04%)" in log
    adapters = load_file(output_dir / "adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)
    # peft saves adapter names without the adapter label ("lora_A.weight" for "lora_A.default.weight").
    expected = {name.replace(".default", ""): tensor for name, tensor in one_process_lora.items()}
    assert set(adapters) == set(expected)
    # Same initial adapters and the same three updates; only the order of floating-point sums differs.
    for name, tensor in adapters.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
    assert len(read_jsonl(output_dir / "eval_predictions.jsonl")) == 20


def test_a_lora_adapter_to_merge_is_refused_under_zero3_before_anything_loads(tmp_path, tiny_model_dir):
    """full/frozen_vision fold an adapter into its base, which ZeRO-3 has loaded sharded: the merge died on every
    rank ("The size of tensor a (0) must match the size of tensor b (64)"). LoRA training it further works."""
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration

    adapter = tmp_path / "adapter"
    base = BlipForConditionalGeneration.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"])).save_pretrained(adapter)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(REPO, "accelerate_configs", "deepspeed_zero3.yaml"), "--num_processes", "2",
                "--main_process_port", str(PORTS["zero3"] + 4), "-m", "blip_recipes.cli"]  # fmt: skip
    result = run_cli(["train", "recipes/shapes/full.yaml", "--model_name_or_path", str(adapter), "--output_dir",
                      str(tmp_path / "run"), *QUICK, "--max_steps", "1"], launcher=launcher)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "must match the size" not in log, log[-3000:]
    said = f"model_name_or_path {adapter} is a LoRA adapter, which training_mode full folds into"
    assert log.count(f"ERROR blip_recipes: {said}") == 2  # each process, and the launcher's summary names it too
    assert f"traceback : {said}" in log[log.index("Root Cause (first observed failure)") :]
