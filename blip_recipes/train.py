"""Fine-tune BLIP for image captioning from a YAML recipe.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m blip_recipes.train \\
        recipes/football/lora.yaml --learning_rate 1e-4 --num_train_epochs 20

`blip-recipes train RECIPE.yaml [--key value ...]` is the same entry point. One run, end to end:
recipe (recipe_parser.py -> config.py) -> builders.py: data (data/), model + training_mode (model.py, adapt.py),
collator, CaptionTrainer (trainer.py) -> trainer.train() -> save, evaluate (evaluation.py, metrics.py) -> hub.py.
"""

import json
import logging
import os
import shutil
import signal
import socket
import sys
import time

import torch
import transformers
from transformers import set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from .adapt import AdaptationError, detach_vision_features
from .builders import build_trainer
from .checkpoints import (
    PREEMPTED_EXIT_CODE,
    RECIPE_FILE,
    WRITE_FAILED_EXIT_CODE,
    PreemptionCallback,
    RecipeSnapshotCallback,
    RunLockError,
    StreamPositionCallback,
    checkpoint_step,
    is_write_failure,
    latest_complete_checkpoint,
    load_stream_position,
    lock_output_dir,
    overwrite_would_remove,
    previous_run_files,
    processes_not_sharing_output_dir,
    remove_earlier_run,
    resolve_resume,
    resume_conflicts,
    resume_disagreement,
    resume_geometry_problem,
    resume_hint,
    unshared_output_dir_problem,
)
from .cli import quiet_upstream_noise
from .config import RecipeError, scores_captions
from .data import DataError
from .distributed import gather_from_all
from .ema import EMA_FILE
from .hub import HubCheckpointError, HubPushCallback, fetch_last_checkpoint, metric_results, publish_run, push_blocker
from .metrics import METRIC_KEYS, MetricsError, check_metric_requirements, start_metrics
from .model import (
    ModelError,
    adapter_base,
    check_continued_adapter,
    check_lora_targets,
    check_model_source,
    save_merged,
)
from .recipe_parser import parse_recipe, recipe_argument_parser
from .trainer import EarlyStopping, EvaluationInterrupted, TrainingStoppedInEvaluation
from .vision_features import VisionFeaturesError

logger = logging.getLogger("blip_recipes")
PUSH_FAILED_EXIT_CODE = 3  # trained and saved, but not published
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C
PROG = "blip-recipes train"
LOAD_ERRORS = (
    RecipeError,
    DataError,
    MetricsError,
    VisionFeaturesError,
    AdaptationError,
    ModelError,
    ValueError,
    HubCheckpointError,
)
DESCRIPTION = "Fine-tune BLIP for image captioning from a YAML recipe; every recipe key below can be overridden."


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(level)
    try:
        import datasets

        datasets.utils.logging.set_verbosity(level)
    except ImportError:  # only loading a dataset needs it; callers that pass their own splits may lack it
        pass
    # Our own progress lines (parameter counts, data sizes, metrics) on the main process even at "passive" level.
    ours = logging.INFO if training_args.should_log and training_args.log_level == "passive" else level
    logging.getLogger("blip_recipes").setLevel(ours)
    quiet_upstream_noise()  # also here: `accelerate launch -m blip_recipes.train` does not pass through cli.main


def check_before_loading(recipe) -> str | None:
    """What can fail without loading anything: metric requirements, the model source, output_dir, the checkpoint to
    resume and whether the recipe matches it, an earlier run. Returns the checkpoint to resume from (or None)."""
    training_args = recipe.training
    if scores_captions(recipe):
        check_metric_requirements(training_args.eval_metrics)
    model_args = recipe.model
    if model_args.training_mode != "lora" and model_args.torch_dtype != "float32":
        # The weights that train would be half precision: AdamW's updates smaller than their rounding step vanish
        # (at a learning rate of 1e-5, 85% of the tiny model's weights had not moved after 3 steps in bfloat16).
        raise RecipeError(
            f"torch_dtype {model_args.torch_dtype} makes the weights that train {model_args.torch_dtype}, where most "
            f"of an optimizer step's updates round away; train with float32 weights and bf16: true (mixed "
            f"precision keeps float32 weights), or use training_mode lora (its adapters stay float32)"
        )
    name = model_args.model_name_or_path
    check_model_source(name, model_args.model_revision)
    merges = model_args.training_mode != "lora" and adapter_base(name, model_args.model_revision) is not None
    if merges and is_deepspeed_zero3_enabled():
        raise RecipeError(
            f"model_name_or_path {name} is a LoRA adapter, which training_mode {model_args.training_mode} folds into "
            f"its base before training, but under DeepSpeed ZeRO-3 the base loads already sharded and cannot be "
            f"merged into. Merge it first (blip-recipes merge-lora {name} MERGED_DIR) and train from MERGED_DIR"
        )
    if model_args.training_mode == "lora":
        check_continued_adapter(name, model_args.model_revision, model_args.lora_r, model_args.lora_alpha,
                                model_args.lora_dropout, model_args.lora_target_modules)  # fmt: skip
        check_lora_targets(name, model_args.model_revision, model_args.lora_target_modules)
    blocker = push_blocker(training_args.hub_token) if training_args.push_to_hub else None
    if blocker and training_args.process_index == 0:  # only the main process pushes (its machine's login counts)
        raise RecipeError(
            f"push_to_hub: true, but {blocker}: the run would train and then fail to push. Fix that, or train "
            f"without push_to_hub and push the finished run later (blip-recipes push OUTPUT_DIR --hub_model_id "
            f"{training_args.hub_model_id})"
        )
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume is not None:
        check_resume(recipe, resume)
    replaced = resume is None and training_args.overwrite_output_dir
    if replaced and overwrite_would_remove(training_args.output_dir, os.path.expanduser(name)):
        raise RecipeError(
            f"model_name_or_path {name} is part of the earlier run in output_dir {training_args.output_dir}, which "
            f"--overwrite_output_dir removes before training: train into another output_dir"
        )
    existing = previous_run_files(training_args.output_dir)
    if existing and resume is None and not training_args.overwrite_output_dir:
        raise RecipeError(
            f"output_dir {training_args.output_dir} already holds a run ({', '.join(existing[:4])}); "
            "continue it with --resume_from_checkpoint true, or replace it with --overwrite_output_dir true"
        )
    return resume


def check_resume(recipe, resume: str) -> None:
    """What a run continuing the checkpoint `resume` cannot honour, refused before anything loads: changed recipe
    keys, a checkpoint past max_steps, another batch geometry it cannot continue, a weight average it lacks; and the
    stream position it continues from."""
    training_args = recipe.training
    conflicts = resume_conflicts(recipe.resolved(), resume)
    if conflicts:
        recorded, changed = conflicts
        raise RecipeError(
            f"resume_from_checkpoint {resume}: this recipe changes keys a resumed run cannot honour (the "
            f"checkpoint's optimizer, schedule, data and weights stay as recorded in {recorded}):\n"
            + "\n".join(changed)
            + "\nResume with the recorded values, or start a new run in another output_dir."
        )
    done = checkpoint_step(resume)
    if training_args.max_steps > 0 and done is not None and done > training_args.max_steps:
        # The Trainer would train no step and save the checkpoint's weights again as the run's final model.
        raise RecipeError(
            f"resume_from_checkpoint {resume} is at step {done}, past max_steps {training_args.max_steps}: "
            f"nothing is left to train. Raise max_steps, or score that checkpoint (blip-recipes evaluate --model "
            f"{resume})"
        )
    problem, note = resume_geometry_problem(resume, training_args, recipe.data.streaming,
                                            training_args.group_captions_by_image)  # fmt: skip
    if problem:
        raise RecipeError(problem)
    if note and training_args.process_index == 0:
        logger.warning(note)
    # what CaptionTrainer.train restores beside the Trainer's own state
    if recipe.data.streaming:
        load_stream_position(resume, training_args.process_index)
    if training_args.ema_decay is not None and not os.path.isfile(os.path.join(resume, EMA_FILE)):
        raise RecipeError(f"resume_from_checkpoint {resume}: no {EMA_FILE}, but this recipe sets ema_decay (the "
                          "checkpoint's run had none); resume without ema_decay or start a new run")  # fmt: skip


class LastError(logging.Handler):
    """The last error this process reported (logged, or printed through `fail`): record_for_launcher's message."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()

    def fail(self, message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        self.message = message
        return 2


def record_for_launcher(message: str | None) -> None:
    """torch's elastic launcher (`accelerate launch` with several processes, torchrun) ends a failed run with a
    summary whose root cause is read from an error file it names to each process (TORCHELASTIC_ERROR_FILE); without
    one it says "To enable traceback see: ..." and the run's own message is far above the launcher's traceback.
    The message goes there, in the form torch's own @record writes."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not message:
        return
    data = {
        "message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
    }
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
    except OSError:  # the summary then points at torch's documentation, as before
        pass


def main(argv: list[str] | None = None) -> int:
    errors = LastError()
    package_logger = logging.getLogger("blip_recipes")
    package_logger.addHandler(errors)
    try:
        code = _main(sys.argv[1:] if argv is None else argv, errors)
    finally:
        package_logger.removeHandler(errors)
    if code != 0:
        record_for_launcher(errors.message)
    return code


def _main(argv: list[str], errors: LastError) -> int:
    parser = recipe_argument_parser(PROG, DESCRIPTION, usage=f"{PROG} RECIPE.yaml [--key value ...]")
    try:
        recipe = parse_recipe(argv, parser)
    except RecipeError as error:
        return errors.fail(str(error))
    if recipe.path is None:  # never silently train the defaults into ./trainer_output
        parser.print_help(sys.stderr)
        print(file=sys.stderr)
        return errors.fail("train needs a recipe file (e.g. recipes/shapes/full.yaml)")
    unset = [key for key in ("model_name_or_path", "dataset_name") if key not in recipe.explicit_keys]
    if unset:  # their defaults are the offline demo's: a random tiny model, synthetic shapes
        return errors.fail(
            f"{recipe.source}: {' and '.join(unset)} not set; a recipe names the model it fine-tunes (e.g. "
            "Salesforce/blip-image-captioning-base) and its dataset (builtin:tiny-blip and builtin:shapes are the "
            "offline demo's)"
        )
    setup_logging(recipe.training)
    try:
        lock = lock_output_dir(recipe.training)
    except RunLockError as error:
        logger.error("%s", error)
        return 2
    try:
        apart = processes_not_sharing_output_dir(lock, recipe.training)
        problem = unshared_output_dir_problem(apart, recipe.training.output_dir)
        if problem:
            logger.error("%s", problem)
            leave_process_group()
            return 2
        code = run(recipe)
    except KeyboardInterrupt:
        code = interrupted(recipe.training)
    finally:
        lock.release()
    if code in (0, PUSH_FAILED_EXIT_CODE, PREEMPTED_EXIT_CODE):  # endings every process reaches together
        leave_process_group()
    return code


def interrupted(training_args) -> int:
    """Ctrl-C before or during training: a message instead of a traceback, saying where the run can continue from.

    Ctrl-C stops at once, mid-step, and saves nothing (a save can take minutes, and the launcher of a multi-process
    run kills its processes soon after passing Ctrl-C on); SIGTERM is the signal that finishes the step and saves.
    A checkpoint being written when Ctrl-C came is incomplete and never picked by a resume."""
    if training_args.process_index == 0:
        latest = latest_complete_checkpoint(training_args.output_dir)
        if latest:
            logger.warning("interrupted (Ctrl-C): the last complete checkpoint is %s; %s", latest,
                           resume_hint(training_args))  # fmt: skip
        else:
            logger.warning("interrupted (Ctrl-C) before the first checkpoint: nothing to resume from in %s",
                           training_args.output_dir)  # fmt: skip
    return INTERRUPTED_EXIT_CODE


def leave_process_group() -> None:
    """All processes finish together and close the process group: a rank that exits while its peers still hold
    gloo connections can abort at exit ("terminate called without an active exception") and leave them hanging."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def check_on_every_process(recipe) -> str | None:
    """check_before_loading on every process; when it fails on one, all stop with its message (a process that
    stopped alone would leave the others waiting for it: gloo fails with "Connection closed by peer", NCCL waits for
    its timeout). Processes see different folders when machines each keep their own output_dir, or a different Hub
    cache. Returns the checkpoint to resume from, the same on every process."""
    training_args = recipe.training
    fetch_for_resume(training_args)
    error, resume = None, None
    try:
        resume = check_before_loading(recipe)
    except LOAD_ERRORS as caught:
        error = caught
    outcomes = gather_from_all((str(error) if error else None, resume, socket.gethostname()), training_args.world_size)
    if error is not None:
        raise error
    for index, (message, _, host) in enumerate(outcomes):
        if message is not None:
            raise RecipeError(f"process {index} on {host}: {message}")
    disagreement = resume_disagreement([(checkpoint, host) for _, checkpoint, host in outcomes])
    if disagreement:
        raise RecipeError(disagreement)
    return resume


def fetch_for_resume(training_args) -> None:
    """resume_from_checkpoint: hub -- the main process downloads the repo's last-checkpoint/ into output_dir (which
    every process shares: train refuses machines that do not), and the others wait for it; `true` then picks the
    newest complete checkpoint there, the Hub's or a newer one the disk kept."""
    if str(training_args.resume_from_checkpoint).strip().lower() != "hub":
        return
    error = None
    if training_args.process_index == 0:
        try:
            fetch_last_checkpoint(training_args.hub_model_id, training_args.hub_revision, training_args.hub_token,
                                  training_args.output_dir)  # fmt: skip
        except (HubCheckpointError, OSError) as caught:
            error = str(caught)
    error = gather_from_all(error, training_args.world_size)[0]
    if error:
        raise HubCheckpointError(error)


def run(recipe) -> int:
    """Build, train, save, evaluate, publish; the exit code says how it ended."""
    model_args, training_args = recipe.model, recipe.training
    preemption = PreemptionCallback()
    callbacks = [preemption, RecipeSnapshotCallback()]
    if recipe.data.streaming:
        callbacks.append(StreamPositionCallback())
    if training_args.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(training_args.early_stopping_patience, training_args.early_stopping_threshold))
    hub_pushes = None
    if training_args.push_to_hub and training_args.hub_strategy in ("every_save", "checkpoint"):
        hub_pushes = HubPushCallback(training_args.hub_model_id, training_args.hub_token,
                                     training_args.hub_private_repo, training_args.hub_revision,
                                     always_push=training_args.hub_always_push,
                                     whole=training_args.hub_strategy == "checkpoint")  # fmt: skip
        callbacks.append(hub_pushes)
    try:
        resume = check_on_every_process(recipe)
        if scores_captions(recipe) and training_args.process_index == 0:  # the one process that scores
            start_metrics(training_args.eval_metrics)
        set_seed(training_args.seed)
        trainer = build_trainer(recipe, callbacks=callbacks)
    except BaseException as error:
        preemption.restore_signal_handler()
        if preemption.stopped_before_training:  # its SystemExit, or what it became where it landed
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
        if not isinstance(error, LOAD_ERRORS):
            raise
        logger.error("%s", error)
        return 2
    problem = None
    if trainer.is_world_process_zero():
        try:
            # Only now, with everything loaded: a run that fails to start loses nothing of the earlier one.
            if resume is None and training_args.overwrite_output_dir:
                removed = remove_earlier_run(training_args.output_dir)
                if removed:
                    logger.warning("overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed),
                                   training_args.output_dir)  # fmt: skip
            recipe.write_resolved(os.path.join(training_args.output_dir, RECIPE_FILE))
        except OSError as error:
            problem = f"output_dir {training_args.output_dir}: {error}"
    problem = next(filter(None, gather_from_all(problem, training_args.world_size)), None)  # all stop, or none
    if problem:
        preemption.restore_signal_handler()
        logger.error("%s", problem)
        return 2
    try:
        # An evaluation in training stops on SIGTERM at its next caption batch, as the step end does (all processes)
        trainer.stop_requested = lambda: preemption.any_rank_received(trainer.args)
        try:
            train_result = trainer.train(resume_from_checkpoint=resume)
        except TrainingStoppedInEvaluation as stop:  # its step's checkpoint is saved, when it has one
            preemption.stopped_at_step, train_result = stop.step, None
        except DataError as error:  # a stream past max_bad_samples_fraction (raised in a DataLoader worker)
            logger.error("%s", str(error).strip().splitlines()[-1].removeprefix("blip_recipes.data.sources."))
            return 2
        finally:
            preemption.restore_signal_handler()
            trainer.stop_requested = lambda: False
        detach_vision_features(trainer.model)  # evaluation runs the encoder on pixels; free the store
        if preemption.received and preemption.stopped_at_step == 0:  # in the evaluation before the first step
            logger.warning("pre-empted before the first training step: nothing to save")
            return PREEMPTED_EXIT_CODE
        if preemption.received:
            logger.warning("pre-empted: checkpoint saved at step %s in %s; %s", preemption.stopped_at_step,
                           training_args.output_dir, resume_hint(training_args))  # fmt: skip
            abandoned = hub_pushes.still_uploading() if hub_pushes is not None else []
            if abandoned:  # no waiting past the scheduler's grace period
                logger.warning("the push of checkpoint-%s to the Hub is abandoned (the checkpoint is saved)",
                               ", checkpoint-".join(map(str, abandoned)))  # fmt: skip
            if hub_pushes is not None and hub_pushes.whole and hub_pushes.pushed_step is not None:
                logger.warning("%s's last-checkpoint/ holds step %d (--resume_from_checkpoint hub continues from it "
                               "elsewhere)", training_args.hub_model_id, hub_pushes.pushed_step)  # fmt: skip
            elif hub_pushes is not None and hub_pushes.whole:  # the Hub holds what an earlier attempt pushed, if any
                logger.warning("no checkpoint of this run reached %s's last-checkpoint/", training_args.hub_model_id)
            return PREEMPTED_EXIT_CODE
        save_outputs(trainer, model_args.merge_lora, train_result.metrics)
    except (OSError, RuntimeError) as error:
        if not is_write_failure(error):
            raise
        latest = latest_complete_checkpoint(training_args.output_dir)
        logger.error("could not write to %s: the disk is full (%s). The last complete checkpoint is %s; free space, "
                     "then %s", training_args.output_dir, str(error).splitlines()[0][:200], latest or "none",
                     resume_hint(training_args))  # fmt: skip
        return WRITE_FAILED_EXIT_CODE
    card_metrics = evaluate_after_training(trainer, recipe)
    if isinstance(card_metrics, int):
        return card_metrics
    if not trainer.is_world_process_zero():
        return 0
    ciders = [(entry["step"], entry["eval_cider"]) for entry in trainer.state.log_history if "eval_cider" in entry]
    if len(ciders) > 1 and ciders[0][0] == 0:
        logger.info("eval CIDEr %.4f before training -> %.4f after", ciders[0][1], ciders[-1][1])
    if hub_pushes is not None:
        hub_pushes.wait()  # the final push comes after the checkpoints'
    return PUSH_FAILED_EXIT_CODE if not publish_run(recipe, card_metrics) else 0


def evaluate_after_training(trainer, recipe) -> dict | int:
    """final_evaluation's metrics; stopped by SIGTERM or Ctrl-C (the model is saved by then), the exit code, with how
    to finish the evaluation later.

    The signal only sets a flag that the evaluation polls between caption batches and before scoring: raising from
    a signal handler could land anywhere (inside a logging call, which swallows it)."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    trainer.stop_requested = lambda: bool(received)
    try:
        return final_evaluation(trainer)
    except (EvaluationInterrupted, KeyboardInterrupt) as stop:
        output_dir = recipe.training.output_dir
        if trainer.is_world_process_zero():
            logger.warning(
                "%s during the final evaluation: the trained model is saved in %s. Finish the evaluation with: "
                "blip-recipes evaluate %s --model %s --output_dir %s",
                # the resolved recipe: the run's command-line overrides (dataset, splits, decoding) included
                "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM", output_dir,
                os.path.join(output_dir, RECIPE_FILE), output_dir,
                os.path.join(output_dir, "evaluations", "final"),
            )  # fmt: skip
        return INTERRUPTED_EXIT_CODE if isinstance(stop, KeyboardInterrupt) else PREEMPTED_EXIT_CODE
    finally:
        signal.signal(signal.SIGTERM, previous)
        trainer.stop_requested = lambda: False


def save_outputs(trainer, merge: bool, train_metrics: dict) -> None:
    """The trained model (with processor and decoding settings; the weight average with ema_decay), training metrics
    and state; the merged model too when asked (LoRA)."""
    with trainer.ema_weights():
        trainer.save_model()
        if merge and trainer.is_world_process_zero():
            merged_dir = os.path.join(trainer.args.output_dir, "merged")
            save_merged(trainer.model, trainer.processing_class, merged_dir)
            logger.info("merged LoRA model written to %s", merged_dir)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()


def final_evaluation(trainer) -> dict[str, dict]:
    """Score the final model on the eval and test splits; returns {split label: metrics} for the model card.

    An evaluation the Trainer already ran at the final step (eval_strategy epoch or steps) is reused, not repeated.
    """
    card_metrics = {}
    scored = [("eval", trainer.eval_dataset), ("test", trainer.test_dataset)]
    scored += [(f"eval_{name}", dataset) for name, dataset in trainer.extra_eval_datasets.items()]
    for prefix, dataset in scored:
        if dataset is None:
            continue
        metrics = _evaluation_at_final_step(trainer, prefix)
        if metrics is None:
            logger.info("final evaluation: %s split, %d images", dataset.split.label, len(dataset))
            metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
        else:
            logger.info("final evaluation: the %s split was scored at this step already; its results are kept",
                        dataset.split.label)  # fmt: skip
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        card_metrics[dataset.split.label] = metric_results(metrics, prefix)
        if trainer.is_world_process_zero():
            shutil.copyfile(
                os.path.join(trainer.evaluation_dir(prefix), "predictions.jsonl"),
                os.path.join(trainer.args.output_dir, f"{prefix}_predictions.jsonl"),
            )
    return card_metrics


def _evaluation_at_final_step(trainer, prefix: str) -> dict | None:
    """The metrics of an evaluation of this split at the final step, when the model evaluated is the final one."""
    if trainer.args.load_best_model_at_end:  # the final model may be an earlier checkpoint's
        return None
    step = trainer.state.global_step
    scored = {f"{prefix}_{name}" for name in METRIC_KEYS}
    entries = [entry for entry in trainer.state.log_history if entry.get("step") == step and scored & set(entry)]
    if not entries or not os.path.isfile(os.path.join(trainer.evaluation_dir(prefix), "predictions.jsonl")):
        return None
    return {key: value for key, value in entries[-1].items() if key.startswith(f"{prefix}_") or key == "epoch"}


if __name__ == "__main__":
    sys.exit(main())
