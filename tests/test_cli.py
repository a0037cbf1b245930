"""One CLI style: every command is an argparse parser with --help; train lists every recipe key; errors exit 2."""

import os

import pytest

from blip_recipes.cli import COMMANDS, main
from blip_recipes.recipe_parser import recipe_keys


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: blip-recipes {command}")
    assert {
        "train": "--learning_rate",
        "evaluate": "--model",
        "score": "--metrics",
        "caption": "--num_beams",
        "serve": "--max_upload_mb",
        "push": "--hub_model_id",
        "merge-lora": "adapter_dir",
    }[command] in text


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in COMMANDS)


def test_train_help_lists_every_recipe_key_with_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help text
    for name in recipe_keys():
        assert f"--{name}" in text, name
    for name in ("training_mode", "cache_vision_features", "image_augmentation", "generation_num_beams",
                 "resume_from_checkpoint"):  # fmt: skip
        assert " ".join(recipe_keys()[name].help.split())[:40] in text, name
    assert "{full,frozen_vision,lora}" in text


def test_train_without_a_recipe_prints_help_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    assert main(["train", "--learning_rate", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "usage: blip-recipes train RECIPE.yaml" in err and "train needs a recipe file" in err
    assert os.listdir(tmp_path) == []


def test_unknown_command_and_bad_metrics_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tarin"])
    assert exit_info.value.code == 2 and "invalid choice: 'tarin'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "predictions.jsonl", "--metrics", "bleu,cidr"])
    assert exit_info.value.code == 2 and "--metrics: unknown ['cidr']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "outputs/run", "--hub_model_id", "me/my model"])
    assert exit_info.value.code == 2 and "argument --hub_model_id: Repo id must use" in capsys.readouterr().err


def test_evaluate_needs_a_model(capsys):
    assert main(["evaluate", "--dataset", "builtin:shapes"]) == 2
    assert "evaluate needs --model" in capsys.readouterr().err


def test_evaluate_never_writes_into_a_model_folder(capsys, tmp_path, tiny_model_dir):
    import shutil

    run = tmp_path / "run"  # a finished run: its eval_results.json is what its model card reports
    shutil.copytree(tiny_model_dir, run)
    (run / "eval_results.json").write_text('{"eval_cider": 1.0}')
    assert main(["evaluate", "--model", str(run), "--dataset", "builtin:shapes", "--output_dir", str(run)]) == 2
    assert f"--output_dir {run} holds a model (config.json, model.safetensors)" in capsys.readouterr().err
    assert (run / "eval_results.json").read_text() == '{"eval_cider": 1.0}'


def test_ctrl_c_in_any_command_exits_130_without_a_traceback(capsys, monkeypatch):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "caption", (interrupted, COMMANDS["caption"][1]))
    assert main(["caption", "photo.jpg", "--model", "m"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C): blip-recipes caption stopped"


def test_a_dataloader_workers_hang_up_prints_no_traceback():
    """multiprocessing's resource_sharer thread hands DataLoader workers' tensors over and reports its errors through
    sys.excepthook: a worker that Ctrl-C ended mid-handover printed a ConnectionResetError traceback (seen in a
    suite run) beside the run's own Ctrl-C message. Those are dropped; every other error still reaches the hook."""
    import os
    import sys

    from blip_recipes.cli import _without_worker_hangups

    seen = []
    hook = _without_worker_hangups(lambda kind, error, trace: seen.append(kind))
    sharer = {}
    source = "def serve(error):\n    raise error\n"
    exec(compile(source, os.path.join("lib", "multiprocessing", "resource_sharer.py"), "exec"), sharer)
    for error, place in ((ConnectionResetError(104, "Connection reset by peer"), sharer), (EOFError(), sharer),
                         (ValueError("a real error"), sharer), (ConnectionResetError(), None)):  # fmt: skip
        try:
            if place is None:
                raise error
            place["serve"](error)
        except Exception:
            hook(*sys.exc_info())
    assert seen == [ValueError, ConnectionResetError]  # the last one came from elsewhere


def test_the_preloaded_interpreter_answers_as_a_new_one():
    """run_cli's child of a preloaded interpreter (tests/preload.py) gives the output and exit code of `python -m
    blip_recipes.cli` in a new one, and is used with the suite's environment. The environment a test passes is in
    place before huggingface_hub is imported: every run_cli test against a local Hub (HF_ENDPOINT) depends on it, and
    the signal_at tests (SIGTERM, Ctrl-C to a process group) on its process handling."""
    import subprocess
    import sys

    from tests.conftest import PRELOADED, REPO

    for args in (["caption", "--help"], ["caption"]):
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        new = subprocess.run([sys.executable, "-m", "blip_recipes.cli", *args], cwd=REPO, capture_output=True,
                             text=True, check=False, env=environment)  # fmt: skip
        preloaded = PRELOADED.run(args, REPO, environment, timeout=60)
        assert preloaded is not None and (preloaded.returncode, preloaded.stdout, preloaded.stderr) == (
            new.returncode,
            new.stdout,
            new.stderr,
        ), args
    assert PRELOADED.run(["caption"], REPO, {**environment, "PYTHONPATH": REPO}, timeout=60) is None
