"""early_stopping_patience: the run stops after that many evaluations without improvement, ends with its best
checkpoint, and a resumed run stops where the uninterrupted one did."""

import shutil

from tests.conftest import QUICK, read_json, run_main

# Every evaluation after the first fails to improve by more than the threshold: evaluations at steps 2, 4, 6, and
# the second without improvement (step 6) stops the run, well before max_steps.
ARGS = [
    "train", "recipes/shapes/full.yaml", *QUICK, "--max_steps", "40", "--warmup_steps", "0",
    "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
    "--load_best_model_at_end", "true", "--metric_for_best_model", "cider", "--early_stopping_patience", "2",
    "--early_stopping_threshold", "100", "--max_eval_samples", "8", "--per_device_eval_batch_size", "8",
    "--generation_num_beams", "1", "--caption_grid_size", "0",
]  # fmt: skip


def evaluations(output_dir) -> dict[int, float]:
    history = read_json(output_dir / "trainer_state.json")["log_history"]
    return {entry["step"]: entry["eval_cider"] for entry in history if "eval_cider" in entry}


def test_training_stops_after_patience_evaluations_and_ends_with_the_best_checkpoint(tmp_path, capfd, caplog):
    straight = tmp_path / "straight"
    result = run_main([*ARGS, "--output_dir", straight], capfd, caplog)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    state = read_json(straight / "trainer_state.json")
    assert state["global_step"] == 6
    scores = evaluations(straight)
    assert sorted(scores) == [2, 4, 6]
    best_step = max(scores, key=lambda step: (scores[step], -step))  # the Trainer keeps the first of equal bests
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert "early stopping at step 6: cider has not risen by more than 100.0 above its best, " in log
    assert f"at step {best_step}, in 2 evaluations" in log
    # Loaded from a checkpoint that holds one copy of each tied tensor, without a false alarm about the others.
    assert "missing keys" not in log
    # The final evaluation scores the best checkpoint's weights, not the last step's.
    assert read_json(straight / "eval_results.json")["eval_cider"] == scores[best_step]

    # Interrupted after step 4 (one evaluation without improvement counted): the resumed run stops at step 6 too,
    # not two evaluations after the resume.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    result = run_main([*ARGS, "--output_dir", resumed, "--resume_from_checkpoint", "true"], capfd, caplog)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "missing keys" not in log
    assert read_json(resumed / "trainer_state.json")["global_step"] == 6
    assert evaluations(resumed) == scores

    # Stopped too early: resumed with more patience, the count goes on from the checkpoint's (1 at step 4; 2 at
    # step 6, 3 at step 8: stop).
    patient = tmp_path / "patient"
    shutil.copytree(straight / "checkpoint-4", patient / "checkpoint-4")
    result = run_main([*ARGS, "--output_dir", patient, "--resume_from_checkpoint", "true", "--early_stopping_patience",
                       "3"], capfd, caplog)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert read_json(patient / "trainer_state.json")["global_step"] == 8
