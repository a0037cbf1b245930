"""Reliability round 2 (issue 13): secrets, train/eval leakage, bad values and inputs, runs that must not be lost.

Each test fails without its fix; the README's "Reliability and security" section lists what is checked.
"""

import dataclasses
import glob
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from transformers import get_scheduler

from blip_recipes.config import DataArguments, RecipeError
from blip_recipes.data import DataError, load_caption_splits
from blip_recipes.data.sources import load_raw_splits
from blip_recipes.evaluation import Captioner
from blip_recipes.recipe_parser import parse_recipe
from tests.conftest import QUICK, REPO, hub_cache_with, read_json, read_jsonl, run_cli, run_main, signal_at
from tests.fake_hub import FakeHub

TOKEN = "hf_SENTINELround2TOKEN0123456789abc"


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return str(path)


# --- security -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style",
    [
        "{model_name_or_path: 'builtin:tiny-blip', dataset_name: 'builtin:shapes', hub_token: TOKEN, "
        "learning_rate: 2.0e-3}\n",
        "model_name_or_path: builtin:tiny-blip\ndataset_name: builtin:shapes\nhub_token: >-\n  TOKEN\n"
        "learning_rate: 2.0e-3\n",
        "model_name_or_path: builtin:tiny-blip\ndataset_name: builtin:shapes\nhub_token: |\n  TOKEN\n"
        "learning_rate: 2.0e-3\n",
    ],
    ids=["flow", "folded-block", "literal-block"],
)
def test_a_token_in_any_yaml_style_reaches_no_file_log_or_event(tmp_path, style, capfd, caplog):
    """In this process (test_security.py checks a token given on the command line and in HF_TOKEN in a process of
    its own): what the YAML style changes is the value parsed."""
    recipe = write(tmp_path, style.replace("TOKEN", TOKEN))
    output_dir = tmp_path / "run"
    result = run_main(["train", recipe, "--output_dir", output_dir, "--max_steps", "2", *QUICK, "--report_to",
                       "tensorboard", "--do_eval", "true", "--max_eval_samples", "4", "--eval_metrics", "bleu",
                       "--save_strategy", "steps", "--save_steps", "2", "--log_level", "debug"], capfd,
                      caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    files = [path for path in glob.glob(f"{output_dir}/**/*", recursive=True) if os.path.isfile(path)]
    assert any("tfevents" in path for path in files) and os.path.isfile(output_dir / "README.md")
    for path in files:
        with open(path, "rb") as handle:
            assert TOKEN.encode() not in handle.read(), path
    card = (output_dir / "README.md").read_text()
    assert "learning_rate: 0.002" in card and "hub_token" not in card  # built from parsed values


def test_a_token_copied_into_another_key_by_an_alias_is_refused(tmp_path):
    recipe = write(tmp_path, f"hub_token: &secret {TOKEN}\nrun_name: *secret\n")
    with pytest.raises(RecipeError, match="key 'run_name' holds the value of a token key"):
        parse_recipe([recipe])


# --- values checked before anything loads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--learning_rate", "nan"], "learning_rate must be a positive number, got nan"),
        (["--learning_rate", "inf"], "learning_rate must be a positive number, got inf"),
        (["--learning_rate", "0"], "learning_rate must be a positive number, got 0.0"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be between 1 and 65536, got 0"),
        (["--per_device_eval_batch_size", "10000000"], "per_device_eval_batch_size must be between 1 and 65536"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be at least 1, got 0"),
        (["--num_train_epochs", "0"], r"num_train_epochs must be positive \(or set max_steps\), got 0.0"),
        (["--label_smoothing_factor", "1.5"], r"label_smoothing_factor must be in \[0, 1\), got 1.5"),
        (["--generation_num_beams", "0"], "generation_num_beams must be at least 1, got 0"),
        (["--max_train_samples", "-5"], r"max_train_samples must be at least 1 \(or null for all\), got -5"),
        (["--max_eval_samples", "-1"], "max_eval_samples must be at least 1"),
        (["--pad_to_multiple_of", "0"], "pad_to_multiple_of must be at least 1, got 0"),
        (["--training_mode", "lora", "--lora_alpha", "0"], "lora_alpha must be positive, got 0"),
        (["--report_to", "wandb"], r"report_to names wandb, which is not installed here \(pip install wandb\)"),
        (["--report_to", "tensorboard,wandb"], r"report_to names wandb, which is not installed"),  # a comma list
        (["--max_image_pixels", "0"], "max_image_pixels must be positive"),
        (["--preprocessing_num_workers", "-1"], r"preprocessing_num_workers must be at least 1 \(or null"),
        # torch's optimizer would reject these only when training starts, with a traceback
        (["--weight_decay", "-0.1"], "weight_decay must be 0 or more, got -0.1"),
        (["--adam_beta1", "1"], r"adam_beta1 must be in \[0, 1\), got 1.0"),
        (["--adam_beta2", "-0.5"], r"adam_beta2 must be in \[0, 1\), got -0.5"),
        (["--adam_epsilon", "-1e-8"], "adam_epsilon must be 0 or more"),
        (["--dataloader_num_workers", "-1"], "dataloader_num_workers must be 0 .* or more, got -1"),
        (
            ["--dataloader_num_workers", "0", "--dataloader_persistent_workers", "true"],
            "dataloader_persistent_workers: true needs dataloader_num_workers above 0",
        ),  # fmt: skip
        (["--torch_compile_mode", "fastest"], "torch_compile_mode must be one of default, .*reduce-overhead.*, got"),
        (["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "0"], "dataloader_prefetch_factor must be"),
        (
            ["--dataloader_num_workers", "2", "--dataloader_multiprocessing_context", "forking"],
            "dataloader_multiprocessing_context must be one of .*fork.*, got 'forking'",
        ),  # fmt: skip
        (["--ddp_timeout", "0"], "ddp_timeout must be a positive number of seconds, got 0"),
        (
            ["--warmup_steps", "12.5"],
            "warmup_steps must be a fraction of the training steps below 1 or a whole number",
        ),
        (
            ["--torch_compile", "true", "--torch_compile_backend", "inductr"],
            "torch_compile_backend must be one of .*inductor.*, got 'inductr'",
        ),  # fmt: skip
        # the Trainer would silently do something else: no clipping, no logging, no training, every checkpoint kept
        (["--max_grad_norm", "nan"], r"max_grad_norm must be 0 \(no clipping\) or more, got nan"),
        (["--max_grad_norm", "-1"], "max_grad_norm must be 0"),
        (["--logging_steps", "-3"], "logging_steps must be positive, got -3"),
        (["--eval_steps", "0"], "eval_steps must be positive, got 0"),
        (["--save_steps", "-2"], "save_steps must be positive, got -2"),
        (["--max_steps", "0"], "max_steps must be a positive number of optimizer steps, or -1 .*, got 0"),
        (["--max_steps", "-5"], "max_steps must be a positive number"),
        (["--save_total_limit", "0"], r"save_total_limit must be at least 1 \(null keeps every checkpoint"),
        (["--seed", "-1"], r"seed must be in \[0, 2\*\*32\), got -1"),
        (["--data_seed", str(2**32)], "data_seed must be in"),
        (["--caption_grid_size", "-1"], r"caption_grid_size must be 0 \(no grid\) or more, got -1"),
        # what accelerate would silently not do (see the test below)
        (["--fp16", "true"], "fp16 needs a GPU: on the CPU accelerate turns it off and trains in fp32"),
        # Trainer options that would do something else with BLIP, or fail only once training starts
        (
            ["--train_sampling_strategy", "group_by_length"],
            "train_sampling_strategy group_by_length: .*decoding every image before step 1",
        ),  # fmt: skip
        (["--predict_with_generate", "false"], "predict_with_generate: false asks for a loss-only evaluation"),
        (["--prediction_loss_only", "true"], "prediction_loss_only: true asks for a loss-only evaluation"),
        (["--use_liger_kernel", "true"], "use_liger_kernel: Liger has no kernels for BLIP"),
        (["--auto_find_batch_size", "true"], "auto_find_batch_size: on an out-of-memory error the Trainer halves"),
        (["--optim", "adamw_bnb_8bit"], "optim adamw_bnb_8bit: You need to install `bitsandbytes`"),
        (["--optim", "grokadamw"], "optim grokadamw: Please install grokadamw"),  # a ValueError upstream
        (
            ["--training_objective", "scst", "--label_smoothing_factor", "0.1"],
            "label_smoothing_factor applies to cross_entropy; scst's loss .* would ignore it",
        ),  # fmt: skip
        (
            ["--training_objective", "scst", "--include_num_input_tokens_seen", "true"],
            "include_num_input_tokens_seen counts the caption tokens a cross_entropy step",
        ),  # fmt: skip
        # a stream's whole run is one epoch to the Trainer: epoch strategies would act once, at the end
        (
            ["--streaming", "true", "--max_steps", "100", "--eval_dataset_name", "builtin:shapes"],
            "eval_strategy, save_strategy: epoch with streaming: true means once, at the end of max_steps",
        ),  # fmt: skip
        # evaluation metrics are better higher; the Trainer's defaults assume a loss
        (
            ["--metric_for_best_model", "cider", "--greater_is_better", "false"],
            "greater_is_better: false, but metric_for_best_model cider is better higher",
        ),  # fmt: skip
        (
            ["--lr_scheduler_type", "reduce_lr_on_plateau"],
            "lr_scheduler_type reduce_lr_on_plateau needs metric_for_best_model",
        ),  # fmt: skip
        (["--load_best_model_at_end", "true"], "load_best_model_at_end needs metric_for_best_model"),
        # optim_args: the Trainer parses them at step 0, and each optimizer drops the keys it does not read
        (["--optim_args", "betas=0.9"], "optim_args 'betas=0.9': optim adamw_torch.* takes no betas from optim_args"),
        (["--optim", "sgd", "--optim_args", "momentum"], "optim_args 'momentum': expected key=value pairs"),
        (["--optim", "sgd", "--optim_args", "momentum=high"], "ValueError: could not convert string to float: 'high'"),
        # the scheduler factory would raise after the model and data load, or mid-run once warmup ends; or ignore
        (
            ["--lr_scheduler_kwargs", '{"num_cycle": 2}'],
            "lr_scheduler_kwargs {'num_cycle': 2}: TypeError: .*unexpected keyword argument 'num_cycle'",
        ),  # fmt: skip
        (
            ["--lr_scheduler_type", "cosine_with_restarts", "--lr_scheduler_kwargs", '{"num_cycles": "two"}'],
            "lr_scheduler_kwargs {'num_cycles': 'two'}: ValueError: could not convert string to float: 'two'",
        ),  # fmt: skip
        (
            ["--lr_scheduler_type", "constant", "--lr_scheduler_kwargs", '{"num_cycles": 2}'],
            "lr_scheduler_type constant takes none \\(the Trainer would ignore them\\)",
        ),  # fmt: skip
        (
            ["--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs", "{lr_end: 1.0}"],
            r"ValueError: lr_end \(1.0\) must be smaller than initial lr \(0.002\)",
        ),  # fmt: skip
        (["--early_stopping_patience", "0"], "early_stopping_patience must be at least 1 or null, got 0"),
        (["--early_stopping_threshold", "-0.1"], "early_stopping_threshold must be a finite number >= 0, got -0.1"),
        # the Trainer only warns, then ends (saves, publishes) `patience` evaluations past the best model
        (["--early_stopping_patience", "3"], "early_stopping_patience needs load_best_model_at_end: true"),
        (["--early_stopping_threshold", "0.1"], "early_stopping_threshold only applies with early_stopping_patience"),
        # a cut that would cut nothing: no test split
        (["--max_test_samples", "100"], "max_test_samples only applies with test_split"),
        (["--test_split", "validation", "--max_test_samples", "0"], "max_test_samples must be at least 1"),
        (
            [
                "--lr_scheduler_type",
                "reduce_lr_on_plateau",
                "--metric_for_best_model",
                "cider",
                "--lr_scheduler_kwargs",
                '{"mode": "min", "factor": 0.5}',
            ],
            "lr_scheduler_kwargs mode 'min': .*mode must be max",
        ),  # fmt: skip
        # the Hub would refuse these names only at the push, after training
        (["--hub_model_id", "me/my model"], "hub_model_id: Repo id must use alphanumeric chars.*'me/my model'"),
        (["--hub_model_id", "me/blip/v2"], "hub_model_id: Repo id must be in the form 'repo_name' or 'namespace/"),
        (
            ["--push_to_hub", "true", "--hub_model_id", "me/blip", "--hub_revision", "0123456789" * 4],
            "hub_revision 0123456789.* is a commit id; pushes go to a branch",
        ),  # fmt: skip
        (
            [
                "--training_mode",
                "lora",
                "--merge_lora",
                "true",
                "--push_merged",
                "true",
                "--hub_model_id",
                f"me/{'b' * 90}",
            ],
            f"hub_model_id: .*maximum length is 96: 'me/{'b' * 90}-merged'",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(arguments, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), *arguments])


UNUSED_TRAINER_VALUES = {
    "generation_config": "/models/generation_config.json",  # the Trainer would fail at load
    "bf16_full_eval": "true",
    "fp16_full_eval": "true",
    "eval_accumulation_steps": "4",
    "eval_do_concat_batches": "false",
    "eval_use_gather_object": "true",
    "include_for_metrics": "inputs,loss",
    "batch_eval_metrics": "true",
    "label_names": "labels",
    "length_column_name": "caption_length",
    "sortish_sampler": "true",
    "enable_jit_checkpoint": "true",  # its SIGTERM handler would replace the one that saves and exits 143
    "do_predict": "true",  # the test split is test_split
    "save_on_each_node": "true",  # the other machines' checkpoints would hold no weights (save_pretrained's rank 0)
}


@pytest.mark.parametrize("key", sorted(UNUSED_TRAINER_VALUES))
def test_trainer_keys_this_project_replaces_are_refused(key):
    with pytest.raises(RecipeError, match=f"{key} is not used here: .*; leave it out"):
        parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), f"--{key}", UNUSED_TRAINER_VALUES[key]])


def test_every_replaced_trainer_key_exists_and_is_documented_as_unused():
    from blip_recipes.config import UNUSED_TRAINER_KEYS, CaptionTrainingArguments
    from blip_recipes.recipe_parser import recipe_keys

    assert set(UNUSED_TRAINER_VALUES) == set(UNUSED_TRAINER_KEYS)
    keys = recipe_keys()
    for key in UNUSED_TRAINER_KEYS:
        assert key in {item.name for item in dataclasses.fields(CaptionTrainingArguments)}, key
        assert keys[key].help.startswith("Not used here (refused)"), key
    # their defaults pass: a resolved recipe.yaml writes every key
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml")])
    assert all(recipe.resolved()[key] == getattr(recipe.training, key) for key in UNUSED_TRAINER_KEYS)


def test_accelerate_turns_fp16_off_on_the_cpu():
    """Why fp16 on the CPU is refused: accelerate neither autocasts nor scales, so the run would be fp32."""
    code = ("from accelerate import Accelerator; accelerator = Accelerator(cpu=True, mixed_precision='fp16'); "
            "print(accelerator.native_amp, accelerator.scaler)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.split() == ["False", "None"], result.stderr[-2000:]  # in its own process: no shared state


def test_a_plateau_schedule_cuts_the_rate_when_the_caption_metric_stops_rising():
    """torch's ReduceLROnPlateau defaults to mode min, which would cut the rate each time CIDEr improved."""
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--lr_scheduler_type",
                           "reduce_lr_on_plateau", "--metric_for_best_model", "cider", "--lr_scheduler_kwargs",
                           '{"patience": 0, "factor": 0.5}'])  # fmt: skip
    training = recipe.training
    assert training.lr_scheduler_kwargs == {"mode": "max", "patience": 0, "factor": 0.5}
    assert recipe.resolved()["lr_scheduler_kwargs"] == training.lr_scheduler_kwargs  # recipe.yaml says so
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(training.lr_scheduler_type, optimizer,
                              scheduler_specific_kwargs=training.lr_scheduler_kwargs)  # fmt: skip
    rates = []
    for cider in (0.1, 0.5, 0.9, 0.9, 0.95):
        scheduler.step(cider)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5]  # cut once, when it did not improve


def test_numbers_with_an_exponent_inside_a_mapping_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-7 as text, which reached the polynomial schedule as lr_end and failed there."""
    text = "model_name_or_path: builtin:tiny-blip\ndataset_name: builtin:shapes\nlr_scheduler_type: polynomial\n"
    recipe = parse_recipe([write(tmp_path, text + "lr_scheduler_kwargs: {lr_end: 1e-7, power: 2}\n")])
    assert recipe.training.lr_scheduler_kwargs == {"lr_end": 1e-7, "power": 2}
    given = parse_recipe([write(tmp_path, text), "--lr_scheduler_kwargs", '{"lr_end": 5E-8}'])
    assert given.training.lr_scheduler_kwargs == {"lr_end": 5e-8}
    from blip_recipes.recipe_parser import _exponent_numbers

    assert _exponent_numbers({"a": ["1e5", "1e5x", "e5", "1.5e-3"], "b": "2"}) == {"a": [1e5, "1e5x", "e5", 1.5e-3],
                                                                                   "b": "2"}  # fmt: skip


def test_epochs_may_be_zero_when_max_steps_is_set():
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--num_train_epochs", "0",
                           "--max_steps", "3"])  # fmt: skip
    assert recipe.training.max_steps == 3


def test_a_recipe_must_name_its_model_and_dataset(tmp_path, capfd, caplog):
    """Their defaults are the offline demo's: a recipe that forgot model_name_or_path trained a random tiny BLIP on
    the user's data, saying nothing; one without dataset_name, synthetic shapes."""
    for text, unset in (("dataset_name: data.jsonl\n", "model_name_or_path not set"),
                        ("model_name_or_path: Salesforce/blip-image-captioning-base\n", "dataset_name not set"),
                        ("", "model_name_or_path and dataset_name not set"),
                        ("learning_rate: 1.0e-5\n", "model_name_or_path and dataset_name not set")):  # fmt: skip
        result = run_main(["train", write(tmp_path, text), "--output_dir", tmp_path / "run"], capfd, caplog)
        assert result.returncode == 2 and f"recipe.yaml: {unset}; a recipe names the model" in result.stderr
        assert not os.path.exists(tmp_path / "run")
    result = run_main(["evaluate", "--model", "builtin:tiny-blip", "--output_dir", tmp_path / "ev"], capfd, caplog)
    assert result.returncode == 2 and "evaluate needs --dataset NAME" in result.stderr


def test_duplicate_keys_and_non_utf8_recipes_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"key 'learning_rate' appears twice \(lines 1 and 3\)"):
        parse_recipe([write(tmp_path, "learning_rate: 1.0e-4\nseed: 1\nlearning_rate: 2.0e-4\n")])
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 0xe9 at position 12\)"):
        parse_recipe([write(tmp_path, b"prompt: 'caf\xe9'\n", "latin1.yaml")])


def test_optimizer_and_schedule_values_at_their_limits_are_accepted():
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--weight_decay", "0",
                           "--adam_beta1", "0", "--max_grad_norm", "0", "--max_steps", "-1", "--eval_steps", "0.1",
                           "--save_total_limit", "null", "--seed", "0", "--caption_grid_size", "0",
                           "--torch_compile_mode", "max-autotune"])  # fmt: skip
    assert recipe.training.max_grad_norm == 0 and recipe.training.eval_steps == 0.1
    sgd = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--optim", "sgd", "--optim_args",
                        "momentum=0.9, nesterov=true", "--lr_scheduler_type", "cosine_with_restarts",
                        "--lr_scheduler_kwargs", "{num_cycles: 3}"])  # fmt: skip
    assert sgd.training.optim_args == "momentum=0.9, nesterov=true"


def test_caption_batch_size_must_be_positive(tiny_model_dir, shapes_dir, capfd, caplog):
    result = run_main(["caption", os.path.join(shapes_dir, "validation"), "--model", tiny_model_dir, "--batch_size",
                       "0"], capfd, caplog)  # fmt: skip
    assert result.returncode == 2 and "--batch_size: must be at least 1, got 0" in result.stderr


# --- clear errors for bad paths and files, no traceback -----------------------------------------------------------


FULL_RECIPE = os.path.join(REPO, "recipes", "shapes", "full.yaml")


def train_error(tmp_path, capfd, caplog, *arguments):
    """`blip-recipes train` in this process (conftest.run_main): it exits 2, and what it said."""
    result = run_main(["train", FULL_RECIPE, "--output_dir", tmp_path / "run", *QUICK, "--max_steps", "1",
                       *arguments], capfd, caplog)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    return log


def train_error_with(env, tmp_path, *arguments):
    """`blip-recipes train` in a new process under `env`, which huggingface_hub reads at import."""
    result = run_cli(["train", "recipes/shapes/full.yaml", "--output_dir", str(tmp_path / "run"), *QUICK,
                      "--max_steps", "1", *arguments], env=env)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in log, log[-3000:]
    return log


def test_unusable_output_dirs_and_model_paths_are_named(tmp_path, capfd, caplog):
    (tmp_path / "a-file").write_text("x")
    assert f"output_dir {tmp_path / 'a-file'} is a file" in train_error(tmp_path, capfd, caplog, "--output_dir",
                                                                        str(tmp_path / "a-file"))  # fmt: skip
    assert "output_dir /proc/blip-recipes-test is not writable" in train_error(
        tmp_path, capfd, caplog, "--output_dir", "/proc/blip-recipes-test"
    )
    missing = str(tmp_path / "no-such-model")
    assert f"model_name_or_path {missing}: no such directory" in train_error(
        tmp_path, capfd, caplog, "--model_name_or_path", missing
    )
    log = train_error(
        tmp_path, capfd, caplog, "--model_name_or_path", "someone/not-cached-blip"
    )  # the tests run offline
    assert "not in the local cache while offline" in log
    # One line, not "file not found" for every row under it.
    log = train_error(tmp_path, capfd, caplog, "--image_root", str(tmp_path / "no-such-images"))
    assert f"image_root {tmp_path / 'no-such-images'}: no such directory" in log and "file not found" not in log


def test_a_model_name_that_is_no_folder_and_not_on_the_hub_fails_at_once(tmp_path):
    """Online, a mistyped local path reads as a Hub id: huggingface_hub retried each file it could not reach for
    ~25 s, and minutes later (4 on this machine) the error was "could not load its processor"."""
    picture = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    unreachable = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    message = "model_name_or_path outputs/no-such-run: no local directory of that name, and asking the Hub for it "
    start = time.monotonic()
    log = train_error_with(unreachable, tmp_path, "--model_name_or_path", "outputs/no-such-run")
    assert message + "failed (" in log and "set HF_HUB_OFFLINE=1" in log
    caption = run_cli(["caption", str(picture), "--model", "outputs/no-such-run"], env=unreachable)
    assert caption.returncode == 2 and message in caption.stderr and "Traceback" not in caption.stderr
    assert time.monotonic() - start < 60
    with FakeHub() as hub:  # reachable, and it has no such repo
        log = train_error_with({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url}, tmp_path, "--model_name_or_path",
                               "outputs/no-such-run")  # fmt: skip
    assert "no local directory of that name, and no Hub model of that name either (a private one needs a login" in log


def test_a_revision_for_a_local_model_is_refused(tiny_model_dir, tmp_path, capfd, caplog):
    """from_pretrained ignores a revision for a local folder (and builtin:tiny-blip is one): `--model_revision v2`
    trained, evaluated and captioned whatever the folder held, as if it were the revision asked for."""
    from blip_recipes.model import ModelError, check_model_source

    said = "a local model has no revisions; the revision 'v2' (model_revision, --revision) names a Hub model's"
    for name in ("builtin:tiny-blip", tiny_model_dir):
        with pytest.raises(ModelError, match=f"^model_name_or_path {re.escape(str(name))}: {re.escape(said)}"):
            check_model_source(str(name), "v2")
        check_model_source(str(name), "main")
        check_model_source(str(name), None)
    picture = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    caption = run_main(["caption", picture, "--model", tiny_model_dir, "--revision", "v2"], capfd, caplog)
    assert caption.returncode == 2 and said in caption.stderr
    train = run_main(["train", "recipes/shapes/full.yaml", "--model_revision", "v2", "--output_dir", tmp_path / "run",
                      *QUICK, "--max_steps", "1"], capfd, caplog)  # fmt: skip
    assert train.returncode == 2 and said in train.stderr and not (tmp_path / "run" / "model.safetensors").exists()


def test_a_dataset_name_that_is_no_file_or_folder_is_named_as_one(tmp_path):
    """A missing path was looked up as a Hub dataset: "Couldn't reach 'data/no-such.jsonl' on the Hub"."""
    for name in ("data/no-such.jsonl", "./data/no-such", str(tmp_path / "no-such")):
        with pytest.raises(DataError, match=f"^{re.escape(name)}: no such file or directory$"):
            load_raw_splits(DataArguments(dataset_name=name))
    with pytest.raises(DataError, match="^data/no-such: no local file or folder of that name; offline "
                       r"\(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE\), and neither"):  # fmt: skip
        load_raw_splits(DataArguments(dataset_name="data/no-such"))  # offline, as the tests run
    with FakeHub() as hub:
        online = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": hub.url}
        log = train_error_with(online, tmp_path, "--dataset_name", "data/no-such")
    assert "data/no-such: no local file or folder of that name, and no Hub dataset of that name either" in log


def test_a_cached_hub_model_is_used_at_once_when_the_hub_cannot_be_reached(tmp_path, tiny_model_dir, shapes_dir):
    """Loaded by id, huggingface_hub retried each file it checked for ~25 s: `caption` took 5.5 minutes. The cached
    snapshot loads as a folder, still named by its Hub id (a LoRA adapter trained on it names that as its base)."""
    env = {**hub_cache_with(tmp_path / "hub", "someone/cached-blip", tiny_model_dir), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # fmt: skip
    image = os.path.join(shapes_dir, "validation", "00000.png")
    code = f"""
import logging, sys
from PIL import Image
from peft import LoraConfig, get_peft_model
from blip_recipes.evaluation import Captioner
from blip_recipes.model import hub_model_problem, load_model
logging.basicConfig()
print(hub_model_problem("someone/not-cached") is None)
print(Captioner("someone/cached-blip").caption([Image.open({image!r}).convert("RGB")]))
adapter = get_peft_model(load_model("someone/cached-blip", lora_trainable=True), LoraConfig(target_modules=["query"]))
print(adapter.peft_config["default"].base_model_name_or_path)
"""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                            cwd=REPO, check=False, timeout=120)  # fmt: skip
    assert time.monotonic() - start < 60, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stderr[-2000:]
    assert lines[0] == "False"  # neither local nor cached, and the Hub cannot say: an error before anything loads
    assert lines[1] == str(Captioner(tiny_model_dir).caption([Image.open(image).convert("RGB")]))
    assert lines[2] == "someone/cached-blip"
    assert "asking the Hub for someone/cached-blip failed" in result.stderr and "loads from the local cache" in (
        result.stderr
    )


LONG_PROMPT = " ".join(["a"] * 30)  # 30 tokens: with [DEC], more than generation_max_length 20 holds


def test_a_prompt_or_length_the_text_decoder_cannot_hold_is_refused_before_training(tmp_path, capfd, caplog):
    # Before the data loads: the missing dataset would be the error otherwise.
    log = train_error(
        tmp_path, capfd, caplog, "--prompt", LONG_PROMPT, "--dataset_name", str(tmp_path / "no-such-data")
    )
    assert "generation_max_length 20 leaves no room for a caption after [DEC] and the prompt 'a a" in log
    assert "(30 tokens): lengths count them; set it above 31" in log
    log = train_error(tmp_path, capfd, caplog, "--prompt", "a b c d e f", "--max_caption_length", "8")
    assert ("max_caption_length 8 leaves no caption token to learn after [DEC] and the prompt 'a b c d e f' "
            "(6 tokens); set it to at least 9") in log  # fmt: skip
    log = train_error(tmp_path, capfd, caplog, "--generation_max_length", "100", "--generation_min_length", "70")
    assert "generation_max_length 100 exceeds the text decoder's 64 token positions" in log  # builtin:tiny-blip


def command_error(capfd, caplog, *arguments) -> str:
    """A command run in this process (conftest.run_main) exits 2: what it said."""
    result = run_main(arguments, capfd, caplog)
    assert result.returncode == 2, result.stderr[-3000:]
    return result.stderr


def test_caption_evaluate_and_serve_refuse_settings_they_cannot_run_with(capfd, caplog, tmp_path, tiny_model_dir,
                                                                          shapes_dir):  # fmt: skip
    image = os.path.join(shapes_dir, "validation", "00000.png")
    caption = ("caption", image, "--model", tiny_model_dir)
    assert "--num_beams must be at least 1, got 0" in command_error(capfd, caplog, *caption, "--num_beams", "0")
    assert "--max_length 100 exceeds the text decoder's 64 token positions" in command_error(
        capfd, caplog, *caption, "--max_length", "100"
    )
    assert "--max_length 30 leaves no room for a caption after [DEC] and the --prompt" in command_error(
        capfd, caplog, *caption, "--prompt", LONG_PROMPT
    )
    assert "--max_length (4) must exceed --min_length (5)" in command_error(
        capfd, caplog, *caption, "--max_length", "4"
    )
    assert "argument --device: cuda:4096: this machine has" in command_error(capfd, caplog, *caption, "--device",
                                                                             "cuda:4096")  # fmt: skip
    assert "argument --device: not a device: 'gpu'" in command_error(capfd, caplog, *caption, "--device", "gpu")
    # --output that cannot be written fails before the model loads, not after every image is captioned
    assert f"--output {tmp_path}: is a directory" in command_error(capfd, caplog, *caption, "--output", str(tmp_path))
    assert "--output /proc/captions.jsonl: /proc is not writable" in command_error(
        capfd, caplog, *caption, "--output", "/proc/captions.jsonl"
    )
    evaluate = ("evaluate", "--model", tiny_model_dir, "--dataset", "builtin:shapes", "--split", "validation",
                "--max_eval_samples", "4", "--output_dir", str(tmp_path / "evaluation"))  # fmt: skip
    assert "generation_max_length 100 exceeds the text decoder's 64 token positions" in command_error(
        capfd, caplog, *evaluate, "--max_length", "100"
    )
    assert "no split 'nope' (splits: train, validation); set eval_split (`blip-recipes evaluate`: --split)" in (
        command_error(capfd, caplog, *evaluate, "--split", "nope")
    )
    serve = ("serve", "--model", tiny_model_dir, "--port", "0")  # port 0: any free one, bound before the model loads
    assert "--num_beams must be at least 1, got 0" in command_error(capfd, caplog, *serve, "--num_beams", "0")
    assert "argument --device: cuda:4096: this machine has" in command_error(
        capfd, caplog, *serve, "--device", "cuda:4096"
    )
    assert "argument --port: must be in 0..65535, got 70000" in command_error(capfd, caplog, *serve, "--port", "70000")
    assert "--max_upload_mb: must be above 0, got 0" in command_error(capfd, caplog, *serve, "--max_upload_mb", "0")
    assert "--max_batch_size: must be at least 1, got 0" in command_error(capfd, caplog, *serve, "--max_batch_size",
                                                                          "0")  # fmt: skip
    assert "--max_waiting: must be at least 1, got 0" in command_error(capfd, caplog, *serve, "--max_waiting", "0")
    with socket.socket() as taken:  # a port in use, or a host that is not here: before the model (none here) loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = command_error(capfd, caplog, "serve", "--model", str(tmp_path / "no-such-model"), "--port", str(port))
    assert f"error: cannot listen on 127.0.0.1 port {port} (Address already in use)" in error
    error = command_error(
        capfd, caplog, "serve", "--model", str(tmp_path / "no-such-model"), "--host", "no-such-host.invalid"
    )
    assert "error: cannot listen on no-such-host.invalid port 8000" in error


def test_a_model_without_its_tokenizer_files_is_refused(tmp_path, tiny_model_dir, capfd, caplog):
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json"):
        shutil.copy(os.path.join(tiny_model_dir, name), broken)
    log = train_error(tmp_path, capfd, caplog, "--model_name_or_path", str(broken))
    assert "the tokenizer has 5 tokens but the model's text decoder has 117" in log


def test_json_lines_with_a_bad_line_name_the_file_and_line(tmp_path, shapes_dir):
    from tests.test_data import make_jsonl_dataset

    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=6)
    lines = open(path).read().splitlines()
    lines[3] = lines[3][:-1]  # a truncated row
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:4: not valid JSON"):
        load_caption_splits(DataArguments(dataset_name=path, caption_column="caption"), 0, False)


def test_data_files_that_are_not_utf8_or_not_csv_name_the_file_and_line(tmp_path, shapes_dir):
    """datasets raised a bare UnicodeDecodeError for a Latin-1 row (no file, no line), and for a CSV row with more
    fields than the header "An error occurred while generating the dataset"."""
    from tests.test_data import make_jsonl_dataset

    def refused(path, **arguments) -> str:
        with pytest.raises(DataError) as raised:
            load_caption_splits(DataArguments(dataset_name=str(path), caption_column="caption", **arguments), 0, False)
        return str(raised.value)

    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=6)
    lines = open(path, encoding="utf-8").read().splitlines()
    row = json.loads(lines[2])
    row["caption"][0] = "café " + row["caption"][0]
    lines[2] = json.dumps(row, ensure_ascii=False)
    with open(path, "wb") as handle:
        handle.write(("\n".join(lines) + "\n").encode("latin-1"))  # valid JSON, in Latin-1
    assert re.search(
        r"data.jsonl:3: not UTF-8 text \(invalid continuation byte at byte \d+ of the line\)", refused(path)
    )

    rows = [("image", "caption")] + [
        (f"images/{name}", "a caption") for name in sorted(os.listdir(tmp_path / "images"))
    ]
    table = "\n".join(",".join(row) for row in rows) + "\n"
    (tmp_path / "latin1.csv").write_bytes(table.replace("a caption", "caf\u00e9", 1).encode("latin-1"))
    assert "latin1.csv:2: not UTF-8 text" in refused(tmp_path / "latin1.csv")
    ragged = table.splitlines()
    ragged[3] += ",one field too many"
    (tmp_path / "ragged.csv").write_text("\n".join(ragged) + "\n")
    assert re.search(r"ragged.csv: could not load the dataset \(ParserError: .*Expected 2 fields in line 4, saw 3\)$",
                     refused(tmp_path / "ragged.csv"))  # fmt: skip
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    shutil.copy(os.path.join(shapes_dir, "train", "00000.png"), folder)
    (folder / "metadata.csv").write_bytes("file_name,text\n00000.png,caf\u00e9\n".encode("latin-1"))
    assert "metadata.csv:2: not UTF-8 text" in refused(folder)


def test_imagefolder_file_names_outside_the_folder_are_refused(tmp_path, shapes_dir):
    folder = tmp_path / "folder"
    shutil.copytree(os.path.join(shapes_dir, "validation"), folder)
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    rows[2]["file_name"] = "../../../etc/hostname"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"metadata.jsonl:3: file_name '../../../etc/hostname' points outside"):
        load_caption_splits(DataArguments(dataset_name=str(folder)), 0, False)


# --- data integrity -----------------------------------------------------------------------------------------------


def duplicated_imagefolder(tmp_path, shapes_dir, images=20):
    """An imagefolder where every image is listed on three rows, one caption each (as Hub datasets often are)."""
    folder = tmp_path / "dup"
    folder.mkdir()
    rows = [json.loads(line) for line in open(os.path.join(shapes_dir, "train", "metadata.jsonl"))][:images]
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in rows:
            shutil.copy(os.path.join(shapes_dir, "train", row["file_name"]), folder)
            for caption in row["text"]:
                handle.write(json.dumps({"file_name": row["file_name"], "text": caption}) + "\n")
    return folder


def test_imagefolder_rows_of_one_image_are_one_image_and_never_on_both_sides(tmp_path, shapes_dir):
    folder = duplicated_imagefolder(tmp_path, shapes_dir)
    data = load_caption_splits(DataArguments(dataset_name=str(folder), validation_split_percentage=25), 0, True)
    train, evaluation = data.train, data.evaluation
    assert len(train.records) + len(evaluation.records) == 20 and len(evaluation.records) == 5
    assert all(len(record.captions) == 3 for record in train.records + evaluation.records)
    assert not {r.image_id for r in train.records} & {r.image_id for r in evaluation.records}
    assert evaluation.records[0].image_id.endswith(".png")  # named by file, not "train-5"


def test_stored_images_are_grouped_by_content(tmp_path, shapes_dir):
    """A save_to_disk dataset whose Image values carry bytes (as Hub parquet does): the same bytes, one image."""
    import datasets

    folder = duplicated_imagefolder(tmp_path, shapes_dir, images=8)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    embedded = datasets.Dataset.from_dict(
        {"image": [{"bytes": open(item["path"], "rb").read(), "path": None}
                   for item in loaded.cast_column("image", datasets.Image(decode=False))["image"]],
         "text": loaded["text"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )  # fmt: skip
    embedded.save_to_disk(str(tmp_path / "saved"))
    data = load_caption_splits(DataArguments(dataset_name=str(tmp_path / "saved"), validation_split_percentage=25),
                               0, True)  # fmt: skip
    assert len(data.train.records) + len(data.evaluation.records) == 8
    assert all(len(record.captions) == 3 for record in data.train.records)


def test_rows_sharing_an_image_id_but_naming_different_files_are_an_error(tmp_path, shapes_dir):
    from tests.test_data import make_jsonl_dataset

    path = make_jsonl_dataset(tmp_path, shapes_dir, rows=4)
    rows = [json.loads(line) for line in open(path)]
    for number, row in enumerate(rows):
        row["image_id"] = number // 2  # rows 0/1 and 2/3 share an id but are different files
    open(path, "w").write("".join(json.dumps(row) + "\n" for row in rows))
    args = DataArguments(dataset_name=path, caption_column="caption", image_id_column="image_id")
    with pytest.raises(DataError, match=r"2 row\(s\) share an image_id with a different image:\n  image_id '0': "
                                        r"row 0 is images/00000.png, row 1 is images/00001.png"):  # fmt: skip
        load_caption_splits(args, 0, False)


# --- runs that must not be lost or mislabelled --------------------------------------------------------------------


def test_a_second_run_into_a_locked_output_dir_is_refused_and_a_stale_lock_is_recovered(tmp_path, capfd, caplog):
    import socket

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    lock = output_dir / ".blip-recipes.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "then",
                                    "command": "blip-recipes train other.yaml"}))  # fmt: skip
        log = train_error(tmp_path, capfd, caplog, "--overwrite_output_dir", "true")
        assert f"is in use by another run: pid {holder.pid}" in log and "blip-recipes train other.yaml" in log
    finally:
        holder.kill()
        holder.wait()
    result = run_main(["train", FULL_RECIPE, "--output_dir", output_dir, *QUICK, "--max_steps", "1",
                       "--overwrite_output_dir", "true"], capfd, caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removing a stale lock" in result.stdout + result.stderr and not lock.exists()


def test_overwrite_output_dir_replaces_the_earlier_run_and_nothing_else(tmp_path, capfd, caplog):
    """An earlier LoRA run's adapter left beside a new full model made every loader load the old adapter, and its
    checkpoint-360 was what a later --resume_from_checkpoint true picked. Nothing goes before the new run starts."""
    output_dir = tmp_path / "run"
    earlier = ["adapter_config.json", "adapter_model.safetensors", "eval_results.json", "eval_predictions.jsonl",
               "eval_predictions.scored.jsonl", "README.md", "trainer_state.json"]  # fmt: skip
    for folder in ("checkpoint-360", "evaluations/eval-step-360", "merged", "data", "checkpoints-old"):
        (output_dir / folder).mkdir(parents=True)
    for name in [*earlier, "checkpoint-360/config.json", "notes.txt", "data/a.jsonl"]:
        (output_dir / name).write_text("---\ntags: [blip-recipes]\n---\n" if name == "README.md" else "{}")
    log = train_error(
        tmp_path, capfd, caplog, "--overwrite_output_dir", "true", "--dataset_name", str(tmp_path / "missing.jsonl")
    )
    assert "missing.jsonl" in log and all((output_dir / name).exists() for name in earlier)
    log = train_error(tmp_path, capfd, caplog, "--overwrite_output_dir", "true", "--model_name_or_path",
                      str(output_dir / "checkpoint-360"))  # fmt: skip
    assert f"checkpoint-360 is part of the earlier run in output_dir {output_dir}, which --overwrite_output" in log
    assert all((output_dir / name).exists() for name in earlier)
    result = run_main(["train", FULL_RECIPE, "--output_dir", output_dir, *QUICK, "--max_steps", "1",
                       "--overwrite_output_dir", "true"], capfd, caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "overwrite_output_dir: removed the earlier run's README.md, adapter_config.json" in result.stderr
    left = sorted(os.listdir(output_dir))
    assert {"notes.txt", "data", "checkpoints-old", "model.safetensors"} <= set(left), left
    gone = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-360",
        "merged",
        "evaluations",
        "eval_results.json",
        "eval_predictions.jsonl",
        "eval_predictions.scored.jsonl",
    }  # this run evaluates not
    assert not gone & set(left), left


def test_an_earlier_run_that_cannot_be_removed_stops_the_run_with_a_message(tmp_path, monkeypatch, caplog):
    from blip_recipes import train

    def refuse(output_dir):
        raise PermissionError(13, "Permission denied", os.path.join(output_dir, "checkpoint-360"))

    monkeypatch.setattr(train, "remove_earlier_run", refuse)
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--output_dir", str(tmp_path),
                           *QUICK, "--max_steps", "1", "--overwrite_output_dir", "true"])  # fmt: skip
    assert train.run(recipe) == 2
    assert f"output_dir {tmp_path}: [Errno 13] Permission denied: '{tmp_path}/checkpoint-360'" in caplog.text
    assert not os.path.exists(tmp_path / "recipe.yaml")


def test_overwrite_keeps_a_readme_it_did_not_write_and_a_folder_without_a_run(tmp_path):
    from blip_recipes.checkpoints import remove_earlier_run

    (tmp_path / "README.md").write_text("# my project\n")
    (tmp_path / "config.json").write_text("{}")
    assert remove_earlier_run(str(tmp_path)) == []  # no run here: nothing is anyone's earlier run
    (tmp_path / "trainer_state.json").write_text("{}")
    assert remove_earlier_run(str(tmp_path)) == ["config.json", "trainer_state.json"]
    assert (tmp_path / "README.md").read_text() == "# my project\n"


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    from blip_recipes.cli import main

    output_dir = tmp_path_factory.mktemp("checkpointed")
    assert main(["train", FULL_RECIPE, "--output_dir", str(output_dir), *QUICK, "--max_steps", "2",
                 "--save_strategy", "steps", "--save_steps", "2"]) == 0  # fmt: skip
    return output_dir


def test_resuming_with_a_changed_recipe_is_refused_listing_the_keys(checkpointed_run, capfd, caplog):
    resume = ["--output_dir", str(checkpointed_run), *QUICK, "--max_steps", "4", "--resume_from_checkpoint", "true"]
    before = (checkpointed_run / "recipe.yaml").read_text()
    result = run_main(["train", FULL_RECIPE, *resume, "--learning_rate", "0.5"], capfd, caplog)
    assert result.returncode == 2 and "learning_rate: 0.002 -> 0.5" in result.stderr
    lora_recipe = os.path.join(REPO, "recipes", "shapes", "lora.yaml")
    result = run_main(["train", lora_recipe, *resume], capfd, caplog)
    assert result.returncode == 2 and "training_mode: 'full' -> 'lora'" in result.stdout + result.stderr
    assert (checkpointed_run / "recipe.yaml").read_text() == before  # nothing recorded for runs that did not run


def test_a_full_disk_during_a_save_is_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, checkpointed_run):
    from blip_recipes.checkpoints import latest_complete_checkpoint

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)

    def small_files():  # the optimizer state (1.7 MB) no longer fits, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))

    result = subprocess.run(
        [sys.executable, "-m", "blip_recipes.cli", "train", "recipes/shapes/full.yaml", "--output_dir", str(run),
         *QUICK, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--resume_from_checkpoint",
         "true"],
        cwd=REPO, capture_output=True, text=True, preexec_fn=small_files, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 4, log[-3000:]
    assert "the disk is full" in log and "Traceback" not in log and "basic_ios" not in log.split("disk is full")[0]
    assert f"The last complete checkpoint is {run / 'checkpoint-2'}" in log
    assert latest_complete_checkpoint(str(run)) == str(run / "checkpoint-2")


def test_sigterm_during_the_final_evaluation_exits_143_with_the_model_saved(tmp_path, capfd, caplog):
    output_dir = tmp_path / "run"
    code, log = signal_at(["train", "recipes/shapes/full.yaml", "--output_dir", str(output_dir), *QUICK,
                           "--max_steps", "2", "--do_eval", "true", "--eval_metrics", "bleu"], "final evaluation:",
                          signal.SIGTERM)  # fmt: skip
    assert code == 143, log[-3000:]
    assert "SIGTERM during the final evaluation" in log
    finishing = f"blip-recipes evaluate {output_dir}/recipe.yaml --model {output_dir} --output_dir " \
                f"{output_dir}/evaluations/final"  # fmt: skip
    assert finishing in log  # the resolved recipe: the run's overrides included
    assert os.path.isfile(output_dir / "model.safetensors") and not os.path.exists(output_dir / "eval_results.json")
    finish = run_main([*finishing.split()[1:], "--max_eval_samples", "6", "--eval_metrics", "bleu"], capfd, caplog)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert "validation_bleu_4" in read_json(output_dir / "evaluations" / "final" / "eval_results.json")


def test_dataloader_drop_last_drops_training_batches_only(tmp_path, capfd, caplog):
    """The Trainer builds its evaluation loaders with dataloader_drop_last too: 60 images at 16 per batch lost 12."""
    output_dir = tmp_path / "run"
    train = ["train", FULL_RECIPE, *QUICK, "--dataloader_drop_last", "true"]
    result = run_main([*train, "--output_dir", output_dir, "--max_steps", "2", "--do_eval", "true",
                       "--per_device_eval_batch_size", "16"], capfd, caplog)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(read_jsonl(output_dir / "eval_predictions.jsonl")) == 60
    # A training set smaller than one batch would be dropped whole: 0 steps, the untouched model saved as trained.
    result = run_main([*train, "--output_dir", tmp_path / "empty", "--max_steps", "2",
                       "--per_device_train_batch_size", "2000"], capfd, caplog)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "dataloader_drop_last: true drops every training batch: 1440 training rows, fewer than one batch of 2000"
        in result.stderr
    )
    assert not os.path.exists(tmp_path / "empty" / "model.safetensors")


@pytest.mark.parametrize("when", ["training", "final-evaluation"])
def test_ctrl_c_ends_with_where_to_continue_and_no_traceback(tmp_path, when):
    """Ctrl-C as a terminal sends it: to the whole process group (DataLoader workers included)."""
    from blip_recipes.checkpoints import LOCK_FILE, latest_complete_checkpoint

    output_dir = tmp_path / "run"
    steps = ["--max_steps", "400", "--save_strategy", "steps", "--save_steps", "2", "--dataloader_num_workers", "2"]
    marker, count = "'loss'", 5
    if when == "final-evaluation":
        steps, marker, count = (
            ["--max_steps", "2", "--do_eval", "true", "--eval_metrics", "bleu"],
            "final evaluation:",
            1,
        )
    code, log = signal_at(["train", "recipes/shapes/full.yaml", "--output_dir", str(output_dir), *QUICK, *steps],
                          marker, signal.SIGINT, count=count, process_group=True)  # fmt: skip
    assert code == 130 and "Traceback" not in log, log[-3000:]
    assert not os.path.exists(output_dir / LOCK_FILE)
    if when == "training":  # steps 2 and 4 were saved before the 5th step's loss was logged
        latest = latest_complete_checkpoint(str(output_dir))
        assert latest in (str(output_dir / "checkpoint-4"), str(output_dir / "checkpoint-6")), os.listdir(output_dir)
        assert f"interrupted (Ctrl-C): the last complete checkpoint is {latest}; continue with" in log
    else:
        assert "Ctrl-C during the final evaluation" in log and f"blip-recipes evaluate {output_dir}/recipe.yaml" in log
        assert os.path.isfile(output_dir / "model.safetensors")
        assert not os.path.exists(output_dir / "eval_results.json")


# --- pixel caps and 16-bit memory ---------------------------------------------------------------------------------


def test_training_validation_refuses_images_over_max_image_pixels(shapes_dir):
    args = DataArguments(dataset_name=shapes_dir, max_image_pixels=100 * 100, skip_bad_samples=False)
    with pytest.raises(DataError, match=r"decompression bomb refused: too many pixels \(128x128 = 16,384, limit"):
        load_caption_splits(args, 0, True)


def test_caption_refuses_images_over_max_image_pixels(tiny_model_dir, shapes_dir, capfd, caplog):
    image = os.path.join(shapes_dir, "validation", "00000.png")
    result = run_main(["caption", image, "--model", tiny_model_dir, "--max_image_pixels", "10000"], capfd, caplog)
    assert result.returncode == 1 and "too many pixels (128x128 = 16,384, limit 10,000)" in result.stderr


def test_16_bit_images_convert_in_memory_proportional_to_the_image():
    import tracemalloc

    import numpy as np
    from PIL import Image

    from blip_recipes.transforms import to_rgb

    side = 1500
    image = Image.fromarray(np.full((side, side), 65535, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    tracemalloc.start()
    rgb = to_rgb(image)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rgb.getpixel((7, 7)) == (255, 255, 255)
    assert peak < 10 * side * side, peak  # bytes per pixel; the float64 detour took over 24


# --- engines: what a launch asks for is what runs -----------------------------------------------------------------


def test_fsdp_on_the_cpu_is_refused_not_silently_run_as_ddp(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.raises(RecipeError, match="FSDP needs GPUs: on the CPU accelerate drops the FSDP plugin"):
        parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--output_dir", str(tmp_path)])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(REPO, "accelerate_configs", "fsdp.yaml"), "--num_processes", "2",
                "--main_process_port", "29627", "-m", "blip_recipes.cli"]  # fmt: skip
    result = run_cli(["train", "recipes/shapes/full.yaml", "--output_dir", str(tmp_path / "run"), *QUICK,
                      "--max_steps", "2"], launcher=launcher)  # fmt: skip
    assert result.returncode != 0 and "FSDP needs GPUs" in result.stdout + result.stderr
    assert not os.path.exists(tmp_path / "run" / "model.safetensors")


def test_the_preemption_flag_never_touches_the_training_device(monkeypatch):
    """The flag is all-reduced as a CPU tensor (over gloo): on a GPU run, reading it never waits for the GPU."""
    import torch
    import torch.distributed as dist

    from blip_recipes.checkpoints import PreemptionCallback

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        callback = PreemptionCallback()
        callback.restore_signal_handler()
        devices = []
        real_all_reduce = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: devices.append(tensor.device)
                            or real_all_reduce(tensor, *a, **k))  # fmt: skip

        class Args:
            world_size = 2  # as on a multi-GPU run
            device = torch.device("meta")  # stands for the GPU: any tensor put there could not be read back

        assert callback.any_rank_received(Args()) is False
        callback.received = True
        assert callback.any_rank_received(Args()) is True
        assert devices == [torch.device("cpu"), torch.device("cpu")]
    finally:
        dist.destroy_process_group()


def test_an_evaluation_at_the_final_step_is_not_repeated(tmp_path, capfd, caplog):
    result = run_main(["train", FULL_RECIPE, "--output_dir", tmp_path / "run", *QUICK, "--max_train_samples", "32",
                       "--num_train_epochs", "1", "--eval_strategy", "epoch", "--eval_metrics", "bleu,cider",
                       "--log_level", "info"], capfd, caplog)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert len(re.findall(r"scored 60 captions", log)) == 1 and "was scored at this step already" in log
    results = read_json(tmp_path / "run" / "eval_results.json")
    history = read_json(tmp_path / "run" / "trainer_state.json")["log_history"]
    assert results["eval_cider"] == next(entry["eval_cider"] for entry in history if "eval_cider" in entry)
    assert os.path.isfile(tmp_path / "run" / "eval_predictions.jsonl")
