"""Runs in an output_dir that are not lost or mislabelled: one run per output_dir (a lock), checkpoints that survive
pre-emption (SIGTERM -> finish the step, save, exit 143; resume skips partial checkpoints), a resume that refuses a
recipe it could not honour, and a clear message when the disk fills up."""

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time

import torch
from transformers import TrainerCallback

from .distributed import broadcast_from_main, gather_from_all

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


def share_as_umask_allows(folder: str) -> None:
    """Give the safetensors files in `folder` the permissions any other new file gets there (0o666 less the umask).

    safetensors >= 0.8 writes through a temporary file that is always created 0600 and then renamed into place
    (safetensors#782): a model saved by one user, or by root while building a container image, could not be read by
    another user or by `serve` in that container, while the config.json beside it could. A file system that refuses
    chmod keeps the files as they are, with a warning.
    """
    if os.name != "posix":
        return
    mode = 0o666 & ~current_umask()
    try:
        for entry in os.scandir(folder):
            if entry.name.endswith(".safetensors") and entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, mode)
    except OSError as error:
        logger.warning("could not make the weights in %s readable as the umask allows (%s)", folder, error)


def current_umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    return umask


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
    """resume_from_checkpoint: a path, or true/latest for the newest complete checkpoint in output_dir (hub: the
    same, once the Hub's last-checkpoint/ is in output_dir: train.fetch_for_resume)."""
    if value is None or str(value).strip().lower() in ("", "false", "no", "none"):
        return None
    if str(value).strip().lower() in ("true", "yes", "latest", "hub"):
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(f"resume_from_checkpoint: true, but {output_dir} has no complete checkpoint-N directory")
    else:
        path = value
        if not is_complete_checkpoint(path):
            raise ValueError(
                f"resume_from_checkpoint: {path} is not a complete checkpoint (no trainer_state.json/weights)"
            )
    if not holds_optimizer_state(path):
        # The Trainer would resume anyway, with fresh Adam moments and the schedule from its start (warmup again).
        raise ValueError(
            f"resume_from_checkpoint: {path} holds weights but no optimizer state (a run's final output, or a "
            f"checkpoint saved with save_only_model: true), so a resume would not continue that run. Train on from "
            f"its weights in a new run instead: --model_name_or_path {path}"
        )
    return path


def holds_optimizer_state(checkpoint: str) -> bool:
    """optimizer.pt (one process, DDP), optimizer.bin or optimizer_0/ (FSDP), global_stepN/ (DeepSpeed)."""
    return any(name.startswith(("optimizer", "global_step")) for name in os.listdir(checkpoint))


def resume_hint(training_args) -> str:
    """How to continue a run from its last checkpoint, in the messages of a run that stopped."""
    if training_args.save_only_model:
        return ("train on from its weights in a new run (--model_name_or_path CHECKPOINT): save_only_model: true "
                "keeps no optimizer state to resume from")  # fmt: skip
    return "continue with --resume_from_checkpoint true"


# Everything a run (and `evaluate`/`score` on its files) writes into output_dir, but its lock: what
# --overwrite_output_dir clears before the new run trains. Left in place, an earlier LoRA run's adapter_config.json
# beside a new full model makes every loader load the old adapter, and its checkpoint-N is what a later
# --resume_from_checkpoint true picks.
RUN_FILES = frozenset({
    "README.md", "model_card.json", "recipe.yaml", "trainer_state.json", "training_args.json", "training_args.bin",
    "all_results.json", "train_results.json", "eval_results.json", "test_results.json",
    "eval_predictions.jsonl", "test_predictions.jsonl",
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_config.json", "adapter_model.safetensors",
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "added_tokens.json",
})  # fmt: skip
RUN_FOLDERS = frozenset({"evaluations", "merged"})
_RUN_PATTERN = re.compile(r"^(model-\d+-of-\d+\.safetensors|(eval|test)_predictions\.(scored\.jsonl|metrics\.json))$")


def _written_by_a_run(output_dir: str, name: str) -> bool:
    path = os.path.join(output_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
        return name in RUN_FOLDERS or bool(_CHECKPOINT.match(name))
    if name == "README.md":  # a model card this tool wrote, not a project's own README (output_dir: .)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "blip-recipes" in handle.read(4096)
    return name in RUN_FILES or bool(_RUN_PATTERN.match(name))


def remove_earlier_run(output_dir: str) -> list[str]:
    """--overwrite_output_dir: remove what an earlier run wrote into output_dir (nothing else there), so none of it
    is taken for the new run's. A folder that holds no run is left alone. Returns the names removed."""
    if not previous_run_files(output_dir):
        return []
    removed = [name for name in sorted(os.listdir(output_dir)) if _written_by_a_run(output_dir, name)]
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def overwrite_would_remove(output_dir: str, path: str) -> bool:
    """Whether remove_earlier_run(output_dir) removes `path` (a model to start from, say) or the folder holding it."""
    if not previous_run_files(output_dir) or not os.path.exists(path):
        return False
    inside = os.path.relpath(os.path.realpath(path), os.path.realpath(output_dir))
    if inside == ".":
        return True
    top = inside.split(os.sep)[0]
    return top != ".." and _written_by_a_run(output_dir, top)


def previous_run_files(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    markers = ("trainer_state.json", "model.safetensors", "adapter_model.safetensors", "eval_results.json")
    return sorted(name for name in os.listdir(output_dir) if name in markers or _CHECKPOINT.match(name))


class PreemptionCallback(TrainerCallback):
    """On SIGTERM: finish the current optimizer step, save a full checkpoint, stop. `main` then exits 143.

    Before training begins (loading and checking the data, building the image cache, loading the model: minutes
    on COCO) there is nothing to save: the run stops at once with 143 rather than keep going past the scheduler's
    grace period into a SIGKILL.

    Under several processes the flag is all-reduced at every step end, so all ranks stop at the same step even if
    the signal reached only some of them (a rank that stopped alone would hang the others in their next collective).
    The flag is a CPU tensor all-reduced over a gloo group (the default group when it is gloo, else one made for
    it): reading it never waits for the GPU, so the check adds no host-device sync to a step.
    """

    def __init__(self):
        self.received = False
        self.stopped_before_training = False
        self.stopped_at_step: int | None = None
        self.group = None
        self.training = False
        self.save_started: float | None = None
        self.warned_slow_save = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        dist = torch.distributed
        if args.world_size > 1 and dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank runs on_train_begin

    def _on_sigterm(self, signum, frame):
        if not self.training:
            logger.warning("SIGTERM before training started: nothing to save, stopping now")
            # SystemExit, not an Exception: no `except Exception` on the way (logging's, the data loaders') keeps it.
            # Raised inside library code it can still turn into another error (inside a lock's release: RuntimeError
            # "release unlocked lock"); the flag lets train.run see it was this.
            self.stopped_before_training = True
            raise SystemExit(PREEMPTED_EXIT_CODE)
        if not self.received:
            grace = launcher_grace_seconds()
            deadline = f" (the launcher kills this process {grace} s after the signal)" if grace is not None else ""
            logger.warning("SIGTERM received: finishing this step, then saving a checkpoint and exiting%s", deadline)
        self.received = True

    def any_rank_received(self, args) -> bool:
        """Whether any process has received SIGTERM; a collective under several processes (every process calls it
        at the same points: step ends, and an evaluation's caption batches in training)."""
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)  # on the CPU, whatever args.device
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            self.received = bool(flag.item())
        return self.received

    def on_step_end(self, args, state, control, **kwargs):
        if self.any_rank_received(args):
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        # The Trainer logs, evaluates, then saves: a save's time runs from the step's end or the evaluation's.
        self.save_started = time.monotonic() if control.should_save else None
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        if self.save_started is not None:
            self.save_started = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        """Under accelerate launch or torchrun, a SIGTERM reaches the processes through the launcher, which kills
        them a grace period later: a checkpoint that takes most of it to write would be cut off (and skipped by the
        resume), so say so at the first such save, while there is time to relaunch with more."""
        started, self.save_started = self.save_started, None
        grace = launcher_grace_seconds()
        if started is None or grace is None or self.warned_slow_save or args.process_index != 0:
            return
        took = time.monotonic() - started
        if took > grace / 2:  # the rest of the step in progress counts too
            self.warned_slow_save = True
            logger.warning(
                "saving checkpoint-%d took %.0f s; accelerate launch and torchrun kill their processes %d s after "
                "passing a SIGTERM on to them, and the rest of the step and this save must fit in it, so a pre-empted "
                "run could be killed while saving (the resume then skips that checkpoint, and the steps since the one "
                "before are lost). Give the launcher more time: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=%d in its environment "
                "(torchrun: --shutdown_timeout), and the scheduler as much (SLURM: KillWait, GraceTime)",
                state.global_step, took, grace, max(60, 10 * math.ceil(took * 3 / 10)),
            )  # fmt: skip

    def restore_signal_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def launcher_grace_seconds() -> int | None:
    """Under torch's elastic launcher (accelerate launch with several processes or machines, torchrun): how long it
    waits after passing a SIGTERM on to its processes before it kills them (torchrun's --shutdown_timeout, which it
    reads from PET_SHUTDOWN_TIMEOUT, else TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30 s; its processes inherit the
    environment). None under no such launcher."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is None:
        return None
    for name in ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        with contextlib.suppress(ValueError):
            if name in os.environ:
                return int(os.environ[name])
    return 30


def process_is_gone(host, pid) -> bool:
    """True only when it can be known: `pid` of this host runs no more. Another host's process cannot be checked
    from here (an output or cache directory shared over NFS), nor a pid that is not a number."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError):  # PermissionError: another user's live process
        return False
    return False


LOCK_FILE = ".blip-recipes.lock"  # a dotfile: never uploaded (hub.NEVER_PUSHED), never mistaken for a run's output


class RunLockError(RuntimeError):
    """output_dir is in use by another run."""


class OutputDirLock:
    """One run per output_dir: a lock file naming its holder (pid, host, start time, command).

    A second run is refused with the holder named. A lock whose process is gone (killed, machine rebooted) is
    stale: on the same host it is taken over with a warning; from another host it is reported with how to clear it.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = False
        self.created_dir = False
        self.record: dict | None = None  # what this lock file says, once held

    def acquire(self) -> None:
        """Take the lock (creating output_dir if needed); RunLockError says why not."""
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise RunLockError(f"output_dir {self.output_dir} is a file, not a directory")
        try:
            self.created_dir = not os.path.isdir(self.output_dir)
            os.makedirs(self.output_dir, exist_ok=True)
            self._create()
        except OSError as error:
            self.release()
            raise RunLockError(f"output_dir {self.output_dir} is not writable ({error.strerror or error})") from None

    def _create(self) -> None:
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._is_stale(holder):
                    raise RunLockError(
                        f"output_dir {self.output_dir} is in use by another run: pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')} ({holder.get('command')}). Wait for "
                        f"it or use another output_dir; if that run is gone, delete {self.path}"
                    ) from None
                logger.warning("removing a stale lock of a run that is gone (%s): %s", holder, self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "run": os.urandom(8).hex()}  # fmt: skip
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            self.held = True
            self.record = record
            return
        raise RunLockError(f"could not lock output_dir {self.output_dir} ({self.path} keeps reappearing)")

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                holder = json.load(handle)
            return holder if isinstance(holder, dict) else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # unreadable: a run killed while writing it

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        return process_is_gone(holder.get("host"), holder.get("pid"))

    def release(self) -> None:
        """Drop the lock; an output_dir this run created and left empty (it failed before writing) goes too."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False
        if self.created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.output_dir)  # only succeeds when empty


def lock_output_dir(training_args) -> OutputDirLock:
    """The main process locks output_dir; every process learns the outcome, so all stop together when it is taken."""
    lock = OutputDirLock(training_args.output_dir)
    refusal = None
    if training_args.process_index == 0:
        try:
            lock.acquire()
        except RunLockError as error:
            refusal = str(error)
    refusal = broadcast_from_main(refusal, training_args.world_size)
    if refusal:
        raise RunLockError(refusal)
    return lock


def processes_not_sharing_output_dir(lock: OutputDirLock, training_args) -> list[tuple[int, str]]:
    """(process index, host) of each process whose output_dir does not hold the lock the main process took in its
    own: a folder of that machine's (a local disk) rather than one all machines share. Empty when all share it."""
    world_size = training_args.world_size
    if world_size <= 1:
        return []
    record = broadcast_from_main(lock.record, world_size)
    sees = training_args.process_index == 0 or _sees_lock(training_args.output_dir, record)
    seen = gather_from_all((sees, socket.gethostname()), world_size)
    return [(index, host) for index, (sees, host) in enumerate(seen) if not sees]


def _sees_lock(output_dir: str, record: dict, patience: float = 3.0) -> bool:
    """Whether output_dir holds the lock `record`, allowing a shared file system a few seconds to show it (an NFS
    client may remember for a while that the name did not exist; reading the directory makes it look again)."""
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(OSError):
            os.listdir(output_dir)
        if OutputDirLock(output_dir)._holder() == record:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def unshared_output_dir_problem(apart: list[tuple[int, str]], output_dir: str) -> str | None:
    """Why a run whose machines do not share output_dir cannot go on, or None when they share it. The Trainer writes
    checkpoints and the model from the main process only; its save_on_each_node, which would write them on every
    machine, is refused (config.py): transformers writes the weights on the first process alone."""
    if not apart:
        return None
    named = ", ".join(f"process {index} on {host}" for index, host in apart[:3])
    return (
        f"output_dir {output_dir} is not one folder all machines share ({named} does not see the lock the main "
        "process took there): only machine 0 would hold the checkpoints, and a resume would find none on the "
        "others. Put output_dir on a file system every machine mounts"
    )


def resume_disagreement(resumes: list[tuple[str | None, str]]) -> str | None:
    """[(checkpoint, host) per process] -> why the processes cannot resume together, or None when they agree. Each
    process resolves `resume_from_checkpoint: true` itself: a file system that shows machines different states of
    one folder (a client cache) could make them pick different checkpoints."""
    if len({checkpoint for checkpoint, _ in resumes}) <= 1:
        return None
    listed = "; ".join(f"process {index} on {host}: {checkpoint or 'none'}"
                       for index, (checkpoint, host) in enumerate(resumes))  # fmt: skip
    return (
        f"resume_from_checkpoint: the processes would resume from different checkpoints ({listed}). Name one that "
        "every machine holds complete: --resume_from_checkpoint OUTPUT_DIR/checkpoint-N"
    )


# Keys that decide what a run computes: a resumed run continues the checkpoint's optimizer, scheduler, data order and
# weights, so a different value here would be silently ignored (or crash) and mislabel the run. Everything else
# (logging, saving, evaluation, publishing, workers, max_steps / num_train_epochs) may change on resume.
FIXED_ON_RESUME = frozenset({
    "model_name_or_path", "model_revision", "training_mode", "torch_dtype", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "dataset_name", "dataset_config_name", "dataset_revision", "train_split",
    "validation_split_percentage", "image_column", "caption_column", "image_id_column", "image_root",
    "max_train_samples", "max_caption_length", "prompt", "caption_preprocessing", "image_augmentation",
    "skip_bad_samples", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay", "optim", "optim_args",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "label_smoothing_factor", "seed", "data_seed",
    "bf16", "fp16", "dataloader_drop_last", "train_sampling_strategy", "neftune_noise_alpha", "training_objective",
    "scst_num_samples", "scst_baseline", "scst_sampling", "scst_reward_weights", "streaming", "shuffle_buffer_size",
    "extra_train_datasets",
})  # fmt: skip
# Fixed keys that a resolved recipe leaves out when unset (and recipes from before the key existed lack): absent is
# None, so adding one on resume is a change too.
ABSENT_WHEN_UNSET = frozenset({"extra_train_datasets"})
RECIPE_FILE = "recipe.yaml"


def checkpoint_step(checkpoint: str) -> int | None:
    """The optimizer step a checkpoint was saved at (its trainer_state.json), or None if it cannot be read."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            return int(json.load(handle)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_recipe(checkpoint: str) -> tuple[str, dict] | None:
    """The resolved recipe of the run that wrote `checkpoint`: its own copy, else its run folder's."""
    import yaml

    for path in (os.path.join(checkpoint, RECIPE_FILE), os.path.join(os.path.dirname(checkpoint), RECIPE_FILE)):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return path, yaml.safe_load(handle) or {}
    return None


def resume_conflicts(resolved: dict, checkpoint: str) -> tuple[str, list[str]] | None:
    """(recorded recipe, ['key: old -> new', ...]) for keys in FIXED_ON_RESUME that differ, or None if none do."""
    import yaml

    recorded = recorded_recipe(checkpoint)
    if recorded is None:
        logger.warning("resuming %s: no recorded recipe.yaml to compare this recipe with", checkpoint)
        return None
    path, old = recorded
    new = yaml.safe_load(yaml.safe_dump(resolved))  # the same normal form as the recorded file
    for key in ABSENT_WHEN_UNSET:
        old.setdefault(key, None)
        new.setdefault(key, None)
    fixed = FIXED_ON_RESUME
    if os.path.isfile(os.path.join(checkpoint, PROCESSES_FILE)):  # the batch's size is resume_geometry_problem's
        fixed = fixed - {"per_device_train_batch_size", "gradient_accumulation_steps"}
    changed = [f"  {key}: {old[key]!r} -> {new[key]!r}" for key in sorted(fixed)
               if key in old and key in new and old[key] != new[key]]  # fmt: skip
    return (path, changed) if changed else None


PROCESSES_FILE = "processes.json"  # inside a checkpoint: the batch geometry and engine that wrote it


def batch_geometry(training_args) -> dict:
    """What a checkpoint records of how its steps were made: processes, per-device batch, accumulation, DataLoader
    workers (a stream's readers) and the sharding engine (None: one process or DDP)."""
    from .config import sharding_engine

    return {
        "world_size": training_args.world_size,
        "dataloader_num_workers": training_args.dataloader_num_workers,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "engine": sharding_engine(training_args),
    }


class RecipeSnapshotCallback(TrainerCallback):
    """Each checkpoint keeps the recipe that produced it and its batch geometry, so a resume from it is compared
    with the right ones."""

    def on_save(self, args, state, control, **kwargs):
        source = os.path.join(args.output_dir, RECIPE_FILE)
        target = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # should_save: the process that writes checkpoints, as the Trainer decides
        if not (args.should_save and os.path.isdir(target)):
            return
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(target, RECIPE_FILE + ".tmp"))
            os.replace(os.path.join(target, RECIPE_FILE + ".tmp"), os.path.join(target, RECIPE_FILE))
        with open(os.path.join(target, PROCESSES_FILE), "w", encoding="utf-8") as handle:
            json.dump(batch_geometry(args), handle)


def _recorded_geometry(checkpoint: str) -> dict | None:
    """The checkpoint's batch geometry; a checkpoint from before per-device batch and accumulation were recorded
    there takes them from its recipe.yaml. None when it has no record (not checked)."""
    try:
        with open(os.path.join(checkpoint, PROCESSES_FILE), encoding="utf-8") as handle:
            recorded = json.load(handle)
        recorded["world_size"], recorded["dataloader_num_workers"] = (
            int(recorded["world_size"]), int(recorded["dataloader_num_workers"])
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
    missing = [key for key in ("per_device_train_batch_size", "gradient_accumulation_steps") if key not in recorded]
    recipe = recorded_recipe(checkpoint) if missing else None
    for key in missing:
        if recipe is not None and isinstance(recipe[1].get(key), int):
            recorded[key] = recipe[1][key]
    return recorded


def _geometry_text(geometry: dict) -> str:
    processes = geometry["world_size"]
    steps = geometry["gradient_accumulation_steps"]
    return (f"{geometry['per_device_train_batch_size']} per device x {processes} process{'es' * (processes != 1)} x "
            f"{steps} accumulation step{'s' * (steps != 1)}")  # fmt: skip


def resume_geometry_problem(checkpoint: str, training_args, streaming: bool, group_captions_by_image: bool):
    """(why this run cannot continue `checkpoint`, or None; a note to log when it continues it with another batch
    geometry, or None).

    A step's images are the global batch's (per-device batch x processes x accumulation) in the seeded order of the
    epoch, whatever the geometry that makes it, and the loss is normalised by the caption tokens of the whole global
    batch: so a DDP or one-process run continues on another number of processes (or another per-device batch) that
    keeps the global batch, training the same images per step (a job re-queued on fewer GPUs; a smaller GPU with
    more accumulation). With another global batch the Trainer would resume anyway, with a shifted data order and a
    schedule stretched to new step counts. What stays fixed: DeepSpeed and FSDP checkpoints hold each process's
    shard of the optimizer state; a stream's position is each reader's (process x worker: torchdata fails on
    another worker count at the first step); group_captions_by_image lays its epoch out in per-device batches. A
    checkpoint written before this record existed is not checked."""
    recorded = _recorded_geometry(checkpoint)
    if recorded is None:
        return None, None
    now = batch_geometry(training_args)
    workers = recorded["dataloader_num_workers"]
    if streaming and workers != now["dataloader_num_workers"]:
        return (
            f"resume_from_checkpoint {checkpoint}: its stream position is that of {workers} DataLoader worker"
            f"{'s' * (workers != 1)} per process, and this run has {now['dataloader_num_workers']}: each "
            f"reader continues its own shards and cannot be split over other readers. Resume with "
            f"--dataloader_num_workers {workers}"
        ), None
    keys = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
    if not all(key in recorded for key in keys) or all(recorded[key] == now[key] for key in keys):
        if "engine" in recorded and recorded["engine"] != now["engine"]:
            return (
                f"resume_from_checkpoint {checkpoint}: written under {recorded['engine'] or 'DDP (or one process)'}"
                f", and this run uses {now['engine'] or 'DDP (or one process)'}: the optimizer state is saved in "
                f"each engine's own layout. Resume under the engine that wrote it (its accelerate config)"
            ), None
        return None, None
    size = recorded["world_size"] * recorded["per_device_train_batch_size"] * recorded["gradient_accumulation_steps"]
    size_now = now["world_size"] * now["per_device_train_batch_size"] * now["gradient_accumulation_steps"]
    fixed = None
    if streaming:
        fixed = "a streaming run's position is each reader's, at its batch size"
    elif recorded.get("engine") or now["engine"]:
        fixed = (f"{recorded.get('engine') or now['engine']} checkpoints hold each process's shard of the optimizer "
                 "state")  # fmt: skip
    elif group_captions_by_image and recorded["per_device_train_batch_size"] != now["per_device_train_batch_size"]:
        fixed = "group_captions_by_image lays each epoch out in per-device batches (only processes and accumulation "
        fixed += "may trade)"
    if fixed or size != size_now:
        others = now["world_size"] * now["per_device_train_batch_size"]
        hint = (f"--gradient_accumulation_steps {size // others}" if not fixed and size % others == 0
                else "the recorded values")  # fmt: skip
        why = fixed or ("the global batch would go from "
                        f"{size} to {size_now}, and with it the data order and the schedule")  # fmt: skip
        return (
            f"resume_from_checkpoint {checkpoint}: written with {_geometry_text(recorded)} (a global batch of "
            f"{size}), and this run has {_geometry_text(now)}: {why}. Resume with {hint}, or start a new run from "
            f"its weights (--model_name_or_path {checkpoint})"
        ), None
    return None, (
        f"resuming {checkpoint} (written with {_geometry_text(recorded)}) with {_geometry_text(now)}: the same "
        f"global batch of {size}, so each step trains the same images; random draws (dropout, augmentation, SCST "
        "samples) are not those of an uninterrupted run, whose generator states were per process"
    )


STREAM_POSITION_DIR = "stream_position"  # inside a checkpoint: one JSON per process, its readers' positions


def stream_position_file(checkpoint: str, process_index: int) -> str:
    return os.path.join(checkpoint, STREAM_POSITION_DIR, f"process-{process_index}.json")


class StreamPositionCallback(TrainerCallback):
    """Each checkpoint of a streaming run keeps every process's position in its stream (the StatefulDataLoader's
    state: each reader's pass, sample and caption), so a resume continues with the next item, not a re-read."""

    def on_save(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is None or not hasattr(train_dataloader, "state_dict"):
            return
        path = stream_position_file(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                                    args.process_index)  # fmt: skip
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(train_dataloader.state_dict(), handle)
        os.replace(path + ".tmp", path)


def load_stream_position(checkpoint: str, process_index: int) -> dict:
    path = stream_position_file(checkpoint, process_index)
    if not os.path.isfile(path):
        raise ValueError(
            f"resume_from_checkpoint {checkpoint}: no stream position for process {process_index} ({path}); the "
            "checkpoint was written by a run that did not stream, or by fewer processes"
        )
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


WRITE_FAILED_EXIT_CODE = 4
_WRITE_FAILURES = ("No space left", "File too large", "Disk quota", "basic_ios::clear", "PytorchStreamWriter failed",
                   "file write failed")  # fmt: skip


def is_write_failure(error: BaseException) -> bool:
    """A full disk (or quota, or file size limit) while saving, however the writer reports it: OSError with
    ENOSPC/EFBIG/EDQUOT, or torch's C++ stream errors (`basic_ios::clear`, `PytorchStreamWriter failed ...`)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(marker in str(error) for marker in _WRITE_FAILURES):
            return True
        error = error.__cause__ or error.__context__
    return False
