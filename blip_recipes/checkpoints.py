"""Checkpoints that survive pre-emption: SIGTERM -> finish the step, save, exit non-zero; resume skips partials."""

import json
import logging
import os
import re
import signal

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a process they terminated


def is_complete_checkpoint(path: str) -> bool:
    """trainer_state.json is the Trainer's last write into a checkpoint; parseable + weights present = complete."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state) or not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        return False
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return True


def checkpoints_in(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_complete_checkpoint(output_dir: str) -> str | None:
    for path in reversed(checkpoints_in(output_dir)):
        if is_complete_checkpoint(path):
            return path
        logger.warning("ignoring incomplete checkpoint %s (interrupted while being written)", path)
    return None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """resume_from_checkpoint: a path, or true/latest for the newest complete checkpoint in output_dir."""
    if value is None or str(value).strip().lower() in ("", "false", "no", "none"):
        return None
    if str(value).strip().lower() in ("true", "yes", "latest"):
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(f"resume_from_checkpoint: true, but {output_dir} has no complete checkpoint-N directory")
        return path
    if not is_complete_checkpoint(value):
        raise ValueError(
            f"resume_from_checkpoint: {value} is not a complete checkpoint (no trainer_state.json/weights)"
        )
    return value


def previous_run_files(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    markers = ("trainer_state.json", "model.safetensors", "adapter_model.safetensors", "eval_results.json")
    return sorted(name for name in os.listdir(output_dir) if name in markers or _CHECKPOINT.match(name))


class PreemptionCallback(TrainerCallback):
    """On SIGTERM: finish the current optimizer step, save a full checkpoint, stop. `main` then exits 143.

    Under several processes the flag is all-reduced at every step end, so all ranks stop at the same step even if
    the signal reached only some of them (a rank that stopped alone would hang the others in their next collective).
    """

    def __init__(self):
        self.received = False
        self.stopped_at_step: int | None = None
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        if not self.received:
            logger.warning("SIGTERM received: finishing this step, then saving a checkpoint and exiting")
        self.received = True

    def _any_rank_received(self, args) -> bool:
        if args.world_size <= 1 or not torch.distributed.is_initialized():
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            self.received = True
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def restore_signal_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
