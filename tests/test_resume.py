"""Resuming equals never stopping: same weights (bit for bit), same log history, same data order."""

import os
import shutil

import pytest
import torch

from blip_recipes.builders import build_trainer
from blip_recipes.checkpoints import latest_complete_checkpoint, resolve_resume
from blip_recipes.data import CaptionTrainDataset
from blip_recipes.model import unwrap_blip
from blip_recipes.recipe_parser import parse_recipe
from tests.conftest import QUICK, REPO


def run(mode, output_dir, steps, resume=None, extra=(), seen=None, monkeypatch=None):
    recipe = parse_recipe(
        [os.path.join(REPO, "recipes", "shapes", f"{mode}.yaml"), "--output_dir", str(output_dir),
         "--max_steps", str(steps), *QUICK, "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "5",
         "--per_device_train_batch_size", "8", "--warmup_steps", "2", *extra]
    )  # fmt: skip
    if seen is not None:
        original = CaptionTrainDataset.__getitem__

        def recording(self, index):
            seen.append(index)
            return original(self, index)

        monkeypatch.setattr(CaptionTrainDataset, "__getitem__", recording)
    trainer = build_trainer(recipe)
    trainer.train(resume_from_checkpoint=resume)
    if seen is not None:
        monkeypatch.undo()
    weights = {n: p.detach().clone() for n, p in unwrap_blip(trainer.model).named_parameters() if p.requires_grad}
    history = [{k: v for k, v in entry.items() if k not in ("train_runtime", "train_samples_per_second",
               "train_steps_per_second", "total_flos")} for entry in trainer.state.log_history]  # fmt: skip
    return weights, history


CASES = [("full", ()), ("frozen_vision", ()), ("lora", ()), ("full", ("--gradient_accumulation_steps", "2"))]


@pytest.mark.parametrize("mode, extra", CASES, ids=["full", "frozen_vision", "lora", "full-grad-accum"])
def test_resume_mid_epoch_is_exact(tmp_path, mode, extra, monkeypatch):
    seen_straight, seen_resumed = [], []
    straight, straight_history = run(mode, tmp_path / "straight", 7, extra=extra, seen=seen_straight,
                                     monkeypatch=monkeypatch)  # fmt: skip
    # An interrupted run: the same recipe whose checkpoint-3 (mid-epoch: an epoch is 180 batches) survived.
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "interrupted" / "checkpoint-3")
    checkpoint = resolve_resume("true", str(tmp_path / "interrupted"))
    assert checkpoint.endswith("checkpoint-3")
    resumed, resumed_history = run(mode, tmp_path / "interrupted", 7, resume=checkpoint, extra=extra,
                                   seen=seen_resumed, monkeypatch=monkeypatch)  # fmt: skip
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name

    # Every per-step log after the checkpoint is identical. (The closing summary's train_loss is, by the Trainer's
    # definition, the mean over the steps of the current session, so it differs after a resume by design.)
    def steps_after_checkpoint(history):
        return [entry for entry in history if entry.get("step", 0) > 3 and "train_loss" not in entry]

    assert steps_after_checkpoint(straight_history) == steps_after_checkpoint(resumed_history)
    assert len(steps_after_checkpoint(straight_history)) == 4
    batch = 8 * (2 if extra else 1)
    assert seen_resumed == seen_straight[3 * batch :]  # the same samples, in the same order, after step 3


def test_incomplete_checkpoints_are_never_latest(tmp_path):
    complete = tmp_path / "checkpoint-4"
    complete.mkdir()
    (complete / "model.safetensors").write_bytes(b"weights")
    (complete / "trainer_state.json").write_text('{"global_step": 4}')
    (complete / "optimizer.pt").write_bytes(b"state")
    killed_while_saving = tmp_path / "checkpoint-8"
    killed_while_saving.mkdir()
    (killed_while_saving / "model.safetensors").write_bytes(b"half")
    truncated_state = tmp_path / "checkpoint-6"
    truncated_state.mkdir()
    (truncated_state / "model.safetensors").write_bytes(b"weights")
    (truncated_state / "trainer_state.json").write_text('{"global_st')
    assert latest_complete_checkpoint(str(tmp_path)) == str(complete)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(killed_while_saving), str(tmp_path))
    with pytest.raises(ValueError, match="has no complete checkpoint"):
        resolve_resume("true", str(tmp_path / "empty"))
    assert resolve_resume("true", str(tmp_path)) == str(complete)


@pytest.mark.parametrize("state", [None, "optimizer.pt", "optimizer_0", "global_step4"])
def test_a_resume_needs_the_optimizer_state(tmp_path, state):
    """A run's final output, or a checkpoint saved with save_only_model: true, holds the weights only; the Trainer
    resumed from it anyway, with fresh Adam moments and the schedule from its start (warmup again)."""
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    if state == "optimizer.pt":  # one process or DDP
        (checkpoint / state).write_bytes(b"state")
    elif state:  # FSDP's sharded optimizer, DeepSpeed's global_stepN
        (checkpoint / state).mkdir()
    for value in ("true", str(checkpoint)):
        if state:
            assert resolve_resume(value, str(tmp_path)) == str(checkpoint)
            continue
        with pytest.raises(ValueError, match=f"{checkpoint} holds weights but no optimizer state .* new run instead: "
                           f"--model_name_or_path {checkpoint}$"):  # fmt: skip
            resolve_resume(value, str(tmp_path))


def test_processes_that_would_resume_from_different_checkpoints_are_stopped():
    from blip_recipes.checkpoints import resume_disagreement

    assert resume_disagreement([("run/checkpoint-4", "a"), ("run/checkpoint-4", "b")]) is None
    assert resume_disagreement([(None, "a"), (None, "b")]) is None
    problem = resume_disagreement([("run/checkpoint-4", "a"), ("run/checkpoint-2", "b"), ("run/checkpoint-4", "b")])
    assert "process 0 on a: run/checkpoint-4; process 1 on b: run/checkpoint-2; process 2 on b" in problem
    assert "Name one that every machine holds complete" in problem


def test_a_resume_keeps_the_global_batch_and_what_holds_per_process_state(tmp_path, monkeypatch):
    """Another geometry of the same global batch continues a DDP or one-process checkpoint (the same images per
    step: tests/test_distributed.py trains it); what a checkpoint holds per process or per batch stays fixed."""
    import json
    from types import SimpleNamespace

    from blip_recipes.checkpoints import resume_geometry_problem

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()

    def record(engine=None, workers=0, **batch):
        geometry = {"world_size": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, **batch}
        (checkpoint / "processes.json").write_text(json.dumps({"dataloader_num_workers": workers, "engine": engine,
                                                               **geometry}))  # fmt: skip

    def resume(world_size, batch, steps, streaming=False, grouped=False, workers=0, deepspeed=None):
        args = SimpleNamespace(world_size=world_size, per_device_train_batch_size=batch, deepspeed=deepspeed,
                               gradient_accumulation_steps=steps, dataloader_num_workers=workers, fsdp="")  # fmt: skip
        return resume_geometry_problem(str(checkpoint), args, streaming, grouped)

    record()
    assert resume(4, 8, 1) == (None, None)
    problem, note = resume(2, 8, 2)  # re-queued on half the GPUs
    assert (
        problem is None
        and "with 8 per device x 2 processes x 2 accumulation steps: the same global batch of 32" in note
    )
    assert resume(1, 16, 2)[0] is None and resume(4, 4, 2)[0] is None  # and a smaller per-device batch
    problem, _ = resume(2, 8, 1)
    assert (
        "(a global batch of 32), and this run has 8 per device x 2 processes x 1 accumulation step: the global "
        "batch would go from 32 to 16"
        in problem
        and "Resume with --gradient_accumulation_steps 2," in problem
    )
    assert "Resume with the recorded values" in resume(3, 8, 1)[0]  # no whole number of accumulation steps
    # group_captions_by_image lays its epoch out in per-device batches: processes and accumulation may trade
    assert resume(2, 8, 2, grouped=True)[0] is None
    assert "group_captions_by_image lays each epoch out in per-device batches" in resume(4, 4, 2, grouped=True)[0]
    # a stream's position is each reader's
    assert "a streaming run's position is each reader's" in resume(2, 8, 2, streaming=True)[0]
    record(workers=2)
    assert "Resume with --dataloader_num_workers 2" in resume(4, 8, 1, streaming=True, workers=1)[0]
    # DeepSpeed (and FSDP) shard the optimizer state by process, in their own layout
    record(engine="DeepSpeed")
    assert resume(4, 8, 1, deepspeed="ds.json") == (None, None)
    assert "DeepSpeed checkpoints hold each process's shard" in resume(2, 8, 2, deepspeed="ds.json")[0]
    assert "written under DeepSpeed, and this run uses DDP (or one process)" in resume(4, 8, 1)[0]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as accelerate launch --config_file deepspeed_*.yaml
    assert resume(4, 8, 1) == (None, None)


def test_a_resume_with_another_per_device_batch_of_the_same_global_batch_trains_the_same_images(tmp_path, monkeypatch):
    """8 per device x 2 accumulation steps, resumed at step 3 with 16 x 1 (a smaller GPU the other way round): the
    same samples in the same order, the same losses and weights but for the order of float sums."""
    seen_straight, seen_resumed = [], []
    straight, straight_history = run("full", tmp_path / "straight", 5, extra=("--gradient_accumulation_steps", "2"),
                                     seen=seen_straight, monkeypatch=monkeypatch)  # fmt: skip
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, resumed_history = run("full", tmp_path / "resumed", 5, resume=str(tmp_path / "resumed" / "checkpoint-3"),
                                   extra=("--per_device_train_batch_size", "16"), seen=seen_resumed,
                                   monkeypatch=monkeypatch)  # fmt: skip
    # (each loader reads one batch ahead, of its own size, past the last step)
    assert seen_resumed[: 2 * 16] == seen_straight[3 * 16 : 5 * 16] and len(seen_straight) == 5 * 16 + 8

    def losses(history):
        return [entry["loss"] for entry in history if entry.get("step", 0) > 3 and "loss" in entry]

    assert len(losses(straight_history)) == 2 and losses(resumed_history) == pytest.approx(losses(straight_history),
                                                                                            rel=1e-5)  # fmt: skip
    assert all(torch.allclose(straight[name], resumed[name], atol=1e-6) for name in straight)
