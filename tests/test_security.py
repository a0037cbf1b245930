"""Nothing a run writes or prints can leak a token or execute code when loaded."""

import configparser
import glob
import os
import re

import pytest
import torch

from blip_recipes.config import RecipeError
from blip_recipes.recipe_parser import parse_recipe
from tests.conftest import QUICK, REPO, run_cli, run_main

SENTINEL_CLI = "hf_SENTINELcliTOKEN0123456789abcdef"
SENTINEL_ENV = "hf_SENTINELenvTOKEN0123456789abcdef"


def test_hub_token_never_reaches_logs_or_files(tmp_path):
    output_dir = tmp_path / "run"
    result = run_cli(
        ["train", "recipes/shapes/full.yaml", "--output_dir", str(output_dir), "--max_steps", "3", *QUICK,
         "--save_strategy", "steps", "--save_steps", "2", "--do_eval", "true", "--max_eval_samples", "6",
         "--eval_metrics", "bleu,cider",
         "--hub_token", SENTINEL_CLI, "--log_level", "debug"],
        env={"HF_TOKEN": SENTINEL_ENV},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for text in (result.stdout, result.stderr):
        assert SENTINEL_CLI not in text and SENTINEL_ENV not in text
    files = [path for path in glob.glob(f"{output_dir}/**/*", recursive=True) if os.path.isfile(path)]
    assert any(path.endswith("trainer_state.json") for path in files) and any("recipe.yaml" in p for p in files)
    for path in files:
        with open(path, "rb") as handle:
            content = handle.read()
        assert SENTINEL_CLI.encode() not in content and SENTINEL_ENV.encode() not in content, path


def test_only_safetensors_weights_and_data_only_state(tmp_path, capfd, caplog):
    output_dir = tmp_path / "run"
    result = run_main(["train", "recipes/shapes/lora.yaml", "--output_dir", output_dir, "--max_steps", "2", *QUICK,
                       "--save_strategy", "steps", "--save_steps", "2", "--merge_lora", "true"], capfd,
                      caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in glob.glob(f"{output_dir}/**/*", recursive=True) if os.path.isfile(p)]
    weights = [p for p in files if re.search(r"(model|adapter_model)\.", os.path.basename(p))]
    assert weights and all(p.endswith((".safetensors", ".json")) for p in weights), weights
    assert os.path.isfile(output_dir / "merged" / "model.safetensors")
    assert not [p for p in files if p.endswith((".bin", ".pkl", ".pickle"))]
    # Resume state (optimizer, scheduler, RNG) is torch.save'd data that loads with weights_only=True, the RNG
    # file with numpy's array types allowlisted (as the Trainer loads it): no code can run.
    from transformers.trainer_pt_utils import safe_globals

    state = [p for p in files if p.endswith((".pt", ".pth"))]
    assert {os.path.basename(p) for p in state} == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    for path in state:
        with safe_globals():
            torch.load(path, weights_only=True)


def test_package_never_unpickles():
    sources = glob.glob(os.path.join(REPO, "blip_recipes", "**", "*.py"), recursive=True)
    for path in sources:
        text = open(path).read()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "pickle.load" not in text and "yaml.load(" not in text and "unsafe_load" not in text, path


def test_recipes_never_trust_remote_code(tmp_path):
    for path in glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True):
        assert "trust_remote_code" not in open(path).read(), path
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trust_remote_code: true\n")
    with pytest.raises(RecipeError, match="unknown key 'trust_remote_code'"):
        parse_recipe([str(recipe)])


def test_dependency_floors_exclude_unsafe_checkpoint_loading():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    requirements = {re.split(r"[<>=!~\[ ]", line.strip())[0]: line.strip()
                    for line in config["options"]["install_requires"].splitlines() if line.strip()}  # fmt: skip
    assert requirements["torch"] == "torch>=2.6"  # weights_only=True by default, CVE-2025-32434
    assert requirements["transformers"].startswith("transformers>=5.0,<")  # floor, and the newest version tested
    assert requirements["accelerate"].startswith("accelerate>=")


def test_installed_transformers_is_within_the_tested_bounds():
    import transformers
    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    line = next(line for line in config["options"]["install_requires"].splitlines() if "transformers" in line)
    requirement = Requirement(line.strip())
    assert any(spec.operator == "<" for spec in requirement.specifier)  # an upper bound: upgrades are tested first
    assert requirement.specifier.contains(transformers.__version__), transformers.__version__
