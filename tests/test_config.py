import glob
import os

import pytest
import yaml

from blip_recipes.config import RecipeError
from blip_recipes.recipe_parser import parse_recipe
from tests.conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True))


def test_there_are_recipes_for_every_mode():
    names = {os.path.relpath(path, os.path.join(REPO, "recipes")) for path in RECIPES}
    for family in ("shapes", "football"):
        for mode in ("full", "frozen_vision", "lora"):
            assert f"{family}/{mode}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_recipe_parses_with_an_override(path, tmp_path):
    recipe = parse_recipe([path, "--learning_rate", "3e-4", "--output_dir", str(tmp_path)])
    assert recipe.training.learning_rate == pytest.approx(3e-4)
    assert recipe.training.output_dir == str(tmp_path)
    assert recipe.model.training_mode in ("full", "frozen_vision", "lora")
    assert recipe.training.predict_with_generate and not recipe.training.remove_unused_columns
    # The stock Trainer's per-step isnan(loss) makes every step wait for the GPU (issue 4): off unless asked for.
    assert recipe.training.logging_nan_inf_filter is False


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_the_recipe_a_run_records_is_a_recipe_for_the_same_run(path, tmp_path):
    """OUTPUT_DIR/recipe.yaml (also pushed to the Hub) held every key, another training mode's LoRA keys and
    another objective's scst_* keys included, which a recipe may not set: rerunning it was refused."""
    recipe = parse_recipe([path, "--output_dir", str(tmp_path)])
    recipe.write_resolved(str(tmp_path / "recipe.yaml"))
    assert parse_recipe([str(tmp_path / "recipe.yaml")]).resolved() == recipe.resolved()


def test_the_record_leaves_the_machines_choices_to_the_machine_that_reruns_it(tmp_path):
    """use_cpu (no GPU here) and ddp_backend gloo (several CPU processes) are this machine's, not the recipe's: in
    recipe.yaml the record of a CPU run trained on the CPU of a GPU machine, and a 2-process run's record failed in
    one process ("Default process group has not been initialized"; end to end: test_streaming's evaluate)."""
    full = os.path.join(REPO, "recipes", "shapes", "full.yaml")
    recipe = parse_recipe([full, "--output_dir", str(tmp_path)], machine={"use_cpu": True})
    assert recipe.training.use_cpu is True
    recipe.write_resolved(str(tmp_path / "recipe.yaml"))
    recorded = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert "use_cpu" not in recorded and "ddp_backend" not in recorded
    assert parse_recipe([str(tmp_path / "recipe.yaml")], machine={}).training.use_cpu is False  # a GPU machine
    asked = parse_recipe([full, "--output_dir", str(tmp_path), "--use_cpu", "true"], machine={})
    assert asked.resolved()["use_cpu"] is True  # what the recipe itself says stays


def test_a_streaming_runs_record_reruns_too(tmp_path):
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "lora.yaml"), "--output_dir", str(tmp_path),
                           "--streaming", "true", "--dataset_name", str(tmp_path / "shards"), "--max_steps", "5",
                           "--eval_dataset_name", "builtin:shapes", "--cache_vision_features", "false",
                           "--eval_strategy", "steps", "--save_strategy", "steps"])  # fmt: skip
    recipe.write_resolved(str(tmp_path / "recipe.yaml"))
    assert parse_recipe([str(tmp_path / "recipe.yaml")]).resolved() == recipe.resolved()


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_yaml_key_names_key_and_closest(tmp_path):
    path = write(tmp_path, "learnig_rate: 1.0e-4\n")
    with pytest.raises(
        RecipeError, match=r"recipe.yaml: unknown key 'learnig_rate' \(did you mean 'learning_rate'\?\)"
    ):
        parse_recipe([path])


def test_unknown_cli_key_names_key_and_closest(tmp_path):
    path = write(tmp_path, "training_mode: full\n")
    with pytest.raises(
        RecipeError, match=r"command line: unknown key '--trainig_mode' \(did you mean '--training_mode'\?\)"
    ):
        parse_recipe([path, "--trainig_mode", "lora"])


def test_values_are_typed_from_yaml_and_cli(tmp_path):
    path = write(
        tmp_path,
        "learning_rate: 1e-4\n"  # PyYAML reads this as a string
        "num_train_epochs: 2\n"
        "eval_strategy: no\n"  # YAML 1.1 reads this as false
        "lora_target_modules: [query, value]\n"
        "training_mode: lora\n"
        "prompt: 'a picture of '\n",
    )
    recipe = parse_recipe(
        [path, "--max_steps", "7", "--bf16", "--lora_target_modules", "query,key,qkv", "--eval_metrics=bleu,cider"]
    )
    training = recipe.training
    assert training.learning_rate == pytest.approx(1e-4) and isinstance(training.learning_rate, float)
    assert training.num_train_epochs == 2.0 and training.max_steps == 7
    assert training.eval_strategy == "no" and training.bf16 is True
    assert recipe.model.lora_target_modules == ["query", "key", "qkv"]
    assert training.eval_metrics == ["bleu", "cider"]
    assert recipe.data.prompt == "a picture of "
    assert "max_steps" in recipe.explicit_keys and "learning_rate" in recipe.explicit_keys


def test_cli_overrides_yaml(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\nper_device_train_batch_size: 4\n")
    recipe = parse_recipe([path, "--per_device_train_batch_size=8"])
    assert recipe.training.per_device_train_batch_size == 8
    assert recipe.training.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: fast\n", r"key 'learning_rate': expected float"),
        ("num_train_epochs: [1]\n", r"key 'num_train_epochs': expected float"),
        ("max_steps: 1.5\n", r"key 'max_steps': expected int"),
        ("bf16: maybe\n", r"key 'bf16': expected bool"),
        ("training_mode: qlora\n", r"training_mode must be one of"),
        ("lora_r: 8\n", r"lora_r only apply to training_mode: lora \(training_mode is 'full'\)"),
        ("push_to_hub: true\n", r"push_to_hub: true needs hub_model_id"),
        (
            "push_to_hub: true\nhub_model_id: me/x\nhub_strategy: checkpoint\nsave_strategy: 'no'\n",
            r"hub_strategy checkpoint pushes checkpoints; save_strategy is no",
        ),
        (
            "push_to_hub: true\nhub_model_id: me/x\nhub_strategy: checkpoint\nsave_only_model: true\n",
            r"save_only_model: true saves without optimizer state; use hub_strategy every_save",
        ),
        ("resume_from_checkpoint: hub\n", r"resume_from_checkpoint: hub needs hub_model_id"),
        ("eval_metrics: [bleu, cidr]\n", r"eval_metrics: unknown \['cidr'\]"),
        ("metric_for_best_model: spice\n", r"metric_for_best_model 'spice' is not computed"),
        ("- a\n- list\n", r"a recipe is a mapping"),
        ("a: [unclosed\n", r"not valid YAML"),
        ("output_dir: !!python/object/apply:os.system [echo hacked]\n", r"rejected YAML tag"),
    ],
)
def test_bad_recipes_fail_with_a_clear_message(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([write(tmp_path, text)])


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        parse_recipe([str(tmp_path / "nope.yaml")])


def test_cli_value_missing(tmp_path):
    with pytest.raises(RecipeError, match="--learning_rate needs a value"):
        parse_recipe([write(tmp_path, ""), "--learning_rate"])


def test_negative_numbers_in_any_notation_are_values_not_options(tmp_path):
    """argparse alone takes -1 and -0.5 as values but reads -1e-8 and -inf as unknown options."""
    path = write(tmp_path, "training_mode: full\n")
    recipe = parse_recipe([path, "--prompt", "-5", "--max_steps", "-1"])
    assert recipe.data.prompt == "-5" and recipe.training.max_steps == -1
    for value in ("-1e-8", "-inf", "-1E+2"):
        with pytest.raises(RecipeError, match=f"adam_epsilon must be 0 or more, got {float(value)}"):
            parse_recipe([path, "--adam_epsilon", value])


def training_or_refusal(tmp_path, arguments, expected):
    """The recipe's training arguments, or None once `expected` (a string) was matched by the RecipeError."""
    path = write(tmp_path, "training_mode: full\n")
    if isinstance(expected, str):
        with pytest.raises(RecipeError, match=expected):
            parse_recipe([path, *arguments])
        return None
    return parse_recipe([path, *arguments]).training


@pytest.mark.parametrize(
    "launched, arguments, expected",
    [
        ("bf16", [], (True, False)),
        ("fp16", ["--bf16", "false", "--use_cpu", "false"], (False, True)),  # on a GPU machine
        ("fp16", [], "fp16 needs a GPU: on the CPU accelerate turns it off and trains in fp32"),  # on this CPU
        ("bf16", ["--fp16", "true"], "the recipe sets fp16: true"),
        ("bf16", ["--bf16", "false"], "mixed_precision bf16 .*, but the recipe sets bf16: false"),
        ("fp16", ["--fp16", "false"], "the recipe sets fp16: false"),
        ("fp8", [], "mixed_precision fp8 .* but the recipe sets neither bf16 nor fp16"),
        ("no", ["--bf16", "true"], (True, False)),
    ],
)
def test_the_launchers_mixed_precision_is_taken_or_refused(tmp_path, monkeypatch, launched, arguments, expected):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)  # what accelerate launch sets
    training = training_or_refusal(tmp_path, arguments, expected)
    if training is None:
        return
    assert (training.bf16, training.fp16) == expected
    assert training.mixed_precision == ("bf16" if training.bf16 else "fp16")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ([], (True, "inductor", "default")),
        (["--torch_compile_mode", "reduce-overhead"], (True, "inductor", "reduce-overhead")),  # the recipe's wins
        (["--torch_compile", "false"], "but the recipe sets torch_compile: false"),
    ],
)
def test_the_launchers_torch_compile_is_taken_or_refused(tmp_path, monkeypatch, arguments, expected):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # what accelerate launch --dynamo_backend sets
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "default")
    training = training_or_refusal(tmp_path, arguments, expected)
    if training is None:
        return
    assert (training.torch_compile, training.torch_compile_backend, training.torch_compile_mode) == expected
