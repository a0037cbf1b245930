"""SIGTERM to a real training process: it finishes the step, writes a complete checkpoint, exits 143; resuming
with --resume_from_checkpoint true then ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import QUICK, REPO, lines_until, read_json, run_main, signal_at

ARGS = ["train", "recipes/shapes/full.yaml", *QUICK, "--max_steps", "40", "--per_device_train_batch_size", "32"]


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, capfd, caplog):
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "blip_recipes.cli", *ARGS, "--output_dir", str(interrupted)],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    lines, losses = lines_until(process, "'loss':", 3)
    assert losses >= 3, "".join(lines)[-3000:]
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=300)
    log = "".join(lines) + rest
    assert process.returncode == 143, log[-3000:]
    assert "SIGTERM received" in log and "pre-empted: checkpoint saved at step" in log
    checkpoints = [name for name in os.listdir(interrupted) if name.startswith("checkpoint-")]
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].split("-")[1])
    assert 3 <= stopped_at < 40
    assert read_json(interrupted / checkpoints[0] / "trainer_state.json")["global_step"] == stopped_at
    assert not os.path.exists(interrupted / "model.safetensors")  # no final save: the run did not finish

    # The rest in this process (conftest.run_main): only the interrupted run needs one of its own.
    resumed = run_main([*ARGS, "--output_dir", interrupted, "--resume_from_checkpoint", "true"], capfd, caplog)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    straight = run_main([*ARGS, "--output_dir", tmp_path / "straight"], capfd, caplog)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    got = load_file(interrupted / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_sigterm_before_training_stops_at_once(tmp_path):
    """While the data is checked (minutes on COCO) there is nothing to save: exit 143 now, not after one step."""
    output_dir = tmp_path / "run"
    code, log = signal_at(
        [*ARGS, "--output_dir", str(output_dir)],
        "checking 480 images of split 'train'",
        signal.SIGTERM,
        env={"BLIP_RECIPES_CACHE": str(tmp_path / "cache")},
    )  # images unchecked
    assert code == 143, log[-3000:]
    assert "SIGTERM before training started: nothing to save, stopping now" in log and "Traceback" not in log
    assert "'loss'" not in log
    assert not os.path.exists(output_dir)  # lock released, and the folder the run made and left empty removed


def test_sigterm_before_training_stops_with_143_whatever_error_it_became(tmp_path, monkeypatch):
    """The handler's SystemExit can land inside library code and come out as another error: inside a thread pool's
    lock release it became RuntimeError("release unlocked lock"), a traceback and exit 1 (seen once in CI-like runs
    of the test above). Here the SIGTERM lands in such code on purpose."""
    from blip_recipes import train
    from blip_recipes.recipe_parser import parse_recipe

    def build_trainer_hit_by_sigterm(recipe, callbacks=()):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except SystemExit:
            raise RuntimeError("release unlocked lock") from None

    monkeypatch.setattr(train, "build_trainer", build_trainer_hit_by_sigterm)
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--output_dir", str(tmp_path)])
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train.run(recipe)
    assert stop.value.code == 143 and signal.getsignal(signal.SIGTERM) is previous


def test_resume_skips_a_checkpoint_killed_while_being_written(tmp_path, capfd, caplog):
    output_dir = tmp_path / "run"
    first = run_main([*ARGS[:-4], "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                      "--save_total_limit", "5", "--output_dir", output_dir], capfd, caplog)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    # A max_steps the checkpoint is past: the Trainer trained nothing and saved checkpoint-4 as the final model.
    past = run_main([*ARGS[:-4], "--max_steps", "3", "--output_dir", output_dir, "--resume_from_checkpoint", "true"],
                    capfd, caplog)  # fmt: skip
    assert (
        past.returncode == 2 and "checkpoint-4 is at step 4, past max_steps 3: nothing is left to train" in past.stderr
    )
    # What SIGKILL during a save leaves behind: weights written, trainer_state.json not yet.
    partial = output_dir / "checkpoint-6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((output_dir / "checkpoint-4" / "model.safetensors").read_bytes())
    resumed = run_main([*ARGS[:-4], "--max_steps", "6", "--output_dir", output_dir, "--resume_from_checkpoint",
                        "true", "--log_level", "info"], capfd, caplog)  # fmt: skip
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-2000:]
    assert "ignoring incomplete checkpoint" in log and "checkpoint-6" in log
    assert "Continuing training from checkpoint" in log or "checkpoint-4" in log
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 6


def test_a_save_longer_than_the_launchers_grace_period_is_said_at_once(tmp_path, capfd, caplog, monkeypatch):
    """accelerate launch and torchrun pass a SIGTERM on to their processes and kill them a grace period later (30 s
    unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise): a checkpoint that takes most of it to write would be cut
    off when the run is pre-empted. Here the launcher's environment, with a grace period every save exceeds."""
    from blip_recipes.checkpoints import launcher_grace_seconds

    assert launcher_grace_seconds() is None  # not under the elastic launcher
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launcher_grace_seconds() == 30
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0")
    result = run_main([*ARGS[:-4], "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                       "--output_dir", tmp_path / "run"], capfd, caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "kill their processes 0 s after" in line]
    assert len(warnings) == 1 and "saving checkpoint-1 took 0 s" in warnings[0], result.stderr[-3000:]
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=60 in its environment" in warnings[0]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    result = run_main([*ARGS[:-4], "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
                       "--output_dir", tmp_path / "again"], capfd, caplog)  # fmt: skip
    assert result.returncode == 0 and "kill their processes" not in result.stderr


def test_sigterm_during_an_evaluation_in_training_saves_the_evaluated_step_at_once(tmp_path, capfd, caplog):
    """An evaluation in training (captioning and scoring: minutes on COCO, more with SPICE) went on to its end after
    a SIGTERM, and the checkpoint came after the next step, past a launcher's or scheduler's grace period. It stops
    at its next caption batch now, writes nothing, and the step it was scoring is saved."""
    from blip_recipes.checkpoints import latest_complete_checkpoint

    output_dir = tmp_path / "run"
    evaluating = ["--eval_strategy", "steps", "--eval_steps", "2", "--generation_num_beams", "3",
                  "--per_device_eval_batch_size", "4", "--eval_metrics", "bleu,cider"]  # fmt: skip
    # The step-2 loss is logged just before the step-2 evaluation begins.
    code, log = signal_at([*ARGS, "--output_dir", str(output_dir), *evaluating], "'loss':", signal.SIGTERM, count=2)
    assert code == 143, log[-3000:]
    assert "SIGTERM during the evaluation at step 2: it is left unfinished (no metrics for it); saving that step's " \
           "checkpoint now" in log  # fmt: skip
    assert "pre-empted: checkpoint saved at step 2 in" in log and "scored 60 captions" not in log
    assert latest_complete_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")
    assert not os.path.exists(output_dir / "evaluations") and "Traceback" not in log
    resumed = run_main([*ARGS, "--max_steps", "3", "--output_dir", output_dir, "--resume_from_checkpoint", "true"],
                       capfd, caplog)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 3
