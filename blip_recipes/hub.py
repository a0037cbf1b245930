"""Publishing: a model card with a model-index of the final metrics, and an allow-listed upload to the Hub.

Only files a user of the model needs are uploaded (weights, configs, processor, card, results, recipe); checkpoint
folders, tracker logs, evaluation dumps, caches and dotfiles such as .env never are, whatever else sits in the folder.
The one exception is asked for by name: `hub_strategy: checkpoint` also uploads each checkpoint whole (optimizer state
included) into the repo's last-checkpoint/, which `--resume_from_checkpoint hub` downloads to continue the run on a
machine that lacks it.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import string
import tempfile
import threading
from importlib import resources

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects
from transformers import TrainerCallback

from . import __version__
from .builtin import is_builtin
from .checkpoints import checkpoint_step, is_complete_checkpoint
from .config import extra_evaluation_datasets, extra_training_datasets
from .metrics import METRIC_DISPLAY_NAMES
from .model import adapter_base, hub_offline

logger = logging.getLogger(__name__)

PUSHED_FILES = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "README.md",
    "eval_results.json",
    "test_results.json",
    "recipe.yaml",
]
CARD_INPUTS = "model_card.json"  # what README.md was made from (not pushed)
# Anything in a subfolder (checkpoints, tracker runs, evaluations, merged/), dotfiles, pickles.
NEVER_PUSHED = ["*/*", ".*", "*.pt", "*.pth", "*.bin", "*.pkl"]
# hub_strategy: checkpoint -- the repo folder holding the newest pushed checkpoint whole, as the Trainer names it.
LAST_CHECKPOINT = "last-checkpoint"


class PushError(RuntimeError):
    """The upload did not happen; the local output is complete and can be pushed later. `reason`: why, alone."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class HubCheckpointError(RuntimeError):
    """resume_from_checkpoint: hub could not fetch the repo's last-checkpoint/ (said before anything loads)."""


def metric_results(results: dict, prefix: str) -> dict:
    """{"cider": 1.2, ...} from {"eval_cider": 1.2, "eval_runtime": ...}."""
    return {
        key.removeprefix(f"{prefix}_"): value
        for key, value in results.items()
        if key.removeprefix(f"{prefix}_") in METRIC_DISPLAY_NAMES
    }


def hub_model_id(name: str) -> str | None:
    """`name` when it is a Hub model id; None for a builtin or a local folder. A folder this project wrote names
    its own Hub base (CARD_INPUTS), which is then the lineage the card gives."""
    if is_builtin(name):
        return None
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, CARD_INPUTS), encoding="utf-8") as handle:
                inputs = json.load(handle)
        except (OSError, ValueError):
            return None
        base = inputs.get("base_model_id") if isinstance(inputs, dict) else None
        return base if isinstance(base, str) and repo_id_problem(base) is None else None
    return name if repo_id_problem(name) is None else None


def hub_dataset_id(name: str) -> str | None:
    """`name` when it is a Hub dataset id; None for local data (a file, folder, glob of shards) or a builtin."""
    from .data.sources import can_only_be_a_path

    if is_builtin(name) or os.path.exists(os.path.expanduser(name)) or can_only_be_a_path(name):
        return None
    return name


def build_model_card(
    repo_id: str,
    base_model: str,
    dataset: str,
    training_mode: str,
    recipe_yaml: str,
    metrics: dict[str, dict],
    generation: dict,
    prompt: str = "",
    base_model_id: str | None = None,
    dataset_id: str | None = None,
    revision: str | None = None,
    eval_dataset: str | None = None,
    eval_dataset_id: str | None = None,
    extra_datasets: tuple[str, ...] = (),
    extra_scored: dict[str, str] | None = None,
) -> ModelCard:
    """metrics: {split name: {"cider": ..., "bleu_4": ...}} -> a card whose model-index carries every number.

    The body is templates/model_card.md; its usage snippet runs on stock transformers (and peft for adapters).
    The metadata names the base model and dataset only by Hub id (`base_model_id`, `dataset_id`; None for local
    ones): the Hub refuses a commit whose card metadata holds a local path ("datasets[0] with value ... is not
    valid"), and a builtin or a path would be a broken link; local data is named by its file or folder name.
    `extra_datasets`: the other datasets trained on (extra_train_datasets), named beside `dataset`. `extra_scored`:
    {name: dataset} of extra_eval_datasets, whose splits' labels in `metrics` are "SPLIT of NAME", with a part's
    "(first N of M images)" after it (records.collect_extra_evaluation): their results are filed under their own
    dataset.
    """
    lora = training_mode == "lora"
    dataset_name = dataset_id or local_dataset_label(dataset)
    # The results are eval_dataset's (eval_dataset_name) when the run scored another dataset than it trained on.
    scored_name = (eval_dataset_id or local_dataset_label(eval_dataset)) if eval_dataset else dataset_name
    extra_ids = [hub_dataset_id(name) for name in extra_datasets]
    trained_on = " + ".join([dataset_name, *(hub_id or local_dataset_label(name)
                                             for name, hub_id in zip(extra_datasets, extra_ids))])  # fmt: skip
    extra_scored = extra_scored or {}
    scored_ids = [hub_dataset_id(source) for source in extra_scored.values()]
    hub_datasets = list(dict.fromkeys(name for name in (dataset_id, *extra_ids, eval_dataset_id, *scored_ids) if name))
    extra_names = {name: hub_id or local_dataset_label(source)
                   for (name, source), hub_id in zip(extra_scored.items(), scored_ids)}  # fmt: skip
    scored_names = [scored_name, *extra_names.values()]
    # {split label: (dataset, split)} for the results: an extra evaluation dataset's split under its own dataset
    filed = {label: (scored_name, label) for label in metrics}
    for label in metrics:
        for name, shown in extra_names.items():
            if part := re.fullmatch(rf"(.+) of {re.escape(name)}( \(.+\))?", label):
                filed[label] = (shown, part.group(1) + (part.group(2) or ""))
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        base_model=base_model_id,
        datasets=hub_datasets or None,
        library_name="peft" if lora else "transformers",
        pipeline_tag="image-to-text",
        license="bsd-3-clause",
        tags=["image-captioning", "blip", "blip-recipes", training_mode] + (["lora"] if lora else []),
        eval_results=_eval_results(filed, metrics) or None,
    )
    table = (
        "\n".join(
            f"| {split} | "
            + " | ".join(f"{values.get(key, float('nan')):.4f}" for key in ("bleu_4", "meteor", "rouge_l", "cider"))
            + " |"
            for split, values in metrics.items()
        )
        or "| (not evaluated in this run: `blip-recipes evaluate --model MODEL` scores it) | | | | |"
    )
    # Pushed to a branch (hub_revision): loaders read main unless told, so the snippet and command name it.
    at = f', revision="{revision}"' if revision else ""
    loading = (
        f'base = BlipForConditionalGeneration.from_pretrained("{base_model}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{at})'
        if lora
        else f'model = BlipForConditionalGeneration.from_pretrained("{repo_id}"{at})'
    )
    text = f', text="{prompt}"' if prompt else ""
    template = resources.files("blip_recipes").joinpath("templates", "model_card.md").read_text(encoding="utf-8")
    content = string.Template(template).substitute(
        metadata=data.to_yaml(), model_name=repo_id.split("/")[-1], base_model_url=_hub_url(base_model),
        dataset=trained_on, scored_dataset="`, `".join(scored_names), version=__version__, training_mode=training_mode,
        num_beams=generation.get("num_beams"),
        max_length=generation.get("max_length"), min_length=generation.get("min_length"),
        prompt_note=f', prompt "{prompt}"' if prompt else "", results_table=table,
        peft_import="from peft import PeftModel" if lora else "", repo_id=repo_id, loading=loading, revision_arg=at,
        revision_flag=f" --revision {revision}" if revision else "",
        inputs_line=f'inputs = processor(images=image{text}, return_tensors="pt")',
        decoding=", ".join(f"{key}={value}" for key, value in generation.items()), recipe_yaml=recipe_yaml.rstrip(),
    )  # fmt: skip
    return ModelCard(content)


def local_dataset_label(dataset: str) -> str:
    """How the card names local data: its file or folder name; a shard pattern with its folder ("cc3m/*.tar", not
    "*.tar")."""
    path = os.path.normpath(dataset)
    name = os.path.basename(path) or dataset
    if any(character in name for character in "*?[{"):
        folder = os.path.basename(os.path.dirname(path))
        return f"{folder}/{name}" if folder else name
    return name


def _eval_results(filed: dict[str, tuple[str, str]], metrics: dict[str, dict]) -> list:
    return [
        EvalResult(
            task_type="image-to-text",
            task_name="Image Captioning",
            dataset_type=filed[label][0],
            dataset_name=filed[label][0],
            dataset_split=filed[label][1],
            metric_type=name,
            metric_name=METRIC_DISPLAY_NAMES[name],
            metric_value=round(float(value), 4),
        )
        for label, values in metrics.items()
        for name, value in values.items()
    ]


def _hub_url(model: str) -> str:
    return f"https://huggingface.co/{model}" if "/" in model and not os.path.exists(model) else model


def push_folder(
    folder: str,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload fine-tuned BLIP (blip-recipes)",
    with_card: bool = True,
) -> str:
    """Create the repo if needed, and the branch `revision` (None: main) if needed, and upload the allow-listed files
    of `folder` (README.md only `with_card`). Returns the commit URL."""
    if hub_offline():
        raise PushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set. The run is saved in {folder}.")
    api = HfApi(token=token)
    try:
        _prepare_repo(api, repo_id, private, revision)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=revision,
            allow_patterns=PUSHED_FILES,
            ignore_patterns=NEVER_PUSHED + ([] if with_card else ["README.md"]),
            commit_message=commit_message,
        )
    except Exception as error:  # network, auth, server: all leave the local output as it is
        reason = _reason(error, token)
        raise PushError(
            f"push to {repo_id} failed ({reason}). The run is saved in {folder}; "
            f"retry with `blip-recipes push {folder} --hub_model_id {repo_id}`.",
            reason,
        ) from None
    return getattr(commit, "commit_url", str(commit))


def _prepare_repo(api: HfApi, repo_id: str, private: bool | None, revision: str | None) -> None:
    """The repo, created if needed, and the branch `revision` (None: main), created if needed."""
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if on_branch(revision):  # the Hub uploads only to a branch that exists
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)


def push_checkpoint(staged: str, repo_id: str, token: str | None, private: bool | None, revision: str | None,
                    step: int) -> str:  # fmt: skip
    """One commit of what stage_for_push staged: the model files at the top of the repo and, when staged, the whole
    checkpoint as last-checkpoint/, whose files of an earlier checkpoint that this one lacks are deleted in the same
    commit (upload_folder may split a large upload into several commits, and a run killed between them would leave
    last-checkpoint/ part one step, part another). Returns the commit URL."""
    if hub_offline():
        raise PushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set")
    staged_files = sorted(
        os.path.relpath(os.path.join(root, name), staged).replace(os.sep, "/")
        for root, _dirs, names in os.walk(staged)
        for name in names
    )
    operations = [CommitOperationAdd(path, os.path.join(staged, path)) for path in staged_files]
    api = HfApi(token=token)
    try:
        _prepare_repo(api, repo_id, private, revision)
        if os.path.isdir(os.path.join(staged, LAST_CHECKPOINT)):
            stale = [path for path in api.list_repo_files(repo_id, revision=revision, repo_type="model")
                     if path.startswith(LAST_CHECKPOINT + "/") and path not in staged_files]  # fmt: skip
            operations += [CommitOperationDelete(path) for path in stale]
        commit = api.create_commit(repo_id, operations, commit_message=f"Training in progress, step {step}",
                                   revision=revision, repo_type="model")  # fmt: skip
    except Exception as error:  # network, auth, server: training goes on, the checkpoint is on disk
        reason = _reason(error, token)
        raise PushError(f"push to {repo_id} failed ({reason})", reason) from None
    return getattr(commit, "commit_url", str(commit))


def fetch_last_checkpoint(repo_id: str, revision: str | None, token: str | None, output_dir: str) -> str:
    """resume_from_checkpoint: hub -- the repo's last-checkpoint/ (hub_strategy: checkpoint), downloaded into
    output_dir/checkpoint-N (N its step, read from its trainer_state.json first) unless output_dir holds that
    checkpoint complete already. Returns the local checkpoint. Downloaded beside it and renamed into place whole, so
    a download cut off leaves nothing a resume could pick."""
    from huggingface_hub import hf_hub_download, snapshot_download

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if hub_offline():
        raise HubCheckpointError(f"resume_from_checkpoint: hub, but HF_HUB_OFFLINE is set: {where} cannot be read")

    def failed(what: str, error: Exception) -> HubCheckpointError:
        reason = _reason(error, token).splitlines()[0]  # huggingface_hub's errors go on with URLs and advice
        return HubCheckpointError(f"resume_from_checkpoint: hub, but {what} failed ({reason}); nothing in "
                                  f"{output_dir} changed")  # fmt: skip

    try:
        listed = HfApi(token=token).list_repo_files(repo_id, revision=revision, repo_type="model")
    except Exception as error:  # no such repo or branch, no access, no network
        raise failed(f"listing {where}", error) from None
    if f"{LAST_CHECKPOINT}/trainer_state.json" not in listed:
        raise HubCheckpointError(
            f"resume_from_checkpoint: hub, but {where} has no {LAST_CHECKPOINT}/ (a run with push_to_hub and "
            f"hub_strategy: checkpoint uploads one at each save)"
        )
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hub-fetch-", dir=output_dir)
    download = dict(repo_id=repo_id, revision=revision, repo_type="model", token=token, local_dir=staging)
    try:
        try:
            step = checkpoint_step(os.path.dirname(hf_hub_download(filename=f"{LAST_CHECKPOINT}/trainer_state.json",
                                                                   **download)))  # fmt: skip
        except Exception as error:
            raise failed(f"downloading {where}'s {LAST_CHECKPOINT}/trainer_state.json", error) from None
        if step is None:
            raise HubCheckpointError(f"resume_from_checkpoint: hub, but {where}'s {LAST_CHECKPOINT}/"
                                     "trainer_state.json names no global_step")  # fmt: skip
        target = os.path.join(output_dir, f"checkpoint-{step}")
        if is_complete_checkpoint(target):
            logger.info("%s's %s/ is step %d, which %s holds already", where, LAST_CHECKPOINT, step, target)
            return target
        try:
            snapshot_download(allow_patterns=[f"{LAST_CHECKPOINT}/*"], **download)
        except Exception as error:
            raise failed(f"downloading {where}'s {LAST_CHECKPOINT}/", error) from None
        fetched = os.path.join(staging, LAST_CHECKPOINT)
        if not is_complete_checkpoint(fetched):
            raise HubCheckpointError(f"resume_from_checkpoint: hub, but {where}'s {LAST_CHECKPOINT}/ holds no "
                                     "weights")  # fmt: skip
        if os.path.exists(target):  # cut off while being written: never picked by a resume, replaced by the Hub's
            shutil.rmtree(target)
        os.rename(fetched, target)
        logger.info("fetched %s's %s/ (step %d) into %s", where, LAST_CHECKPOINT, step, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def on_branch(revision: str | None) -> bool:
    """Whether pushes go to a branch other than main (hub_revision, `push --revision`)."""
    return revision not in (None, "", "main")


def revision_problem(revision: str | None) -> str | None:
    """Why pushes cannot go to `revision` (None when they can): a push lands on a branch, created when missing;
    a commit id cannot be pushed to."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"{revision} is a commit id; pushes go to a branch (created when missing), e.g. main or experiment-1"
    return None


def repo_id_problem(repo_id: str) -> str | None:
    """Why the Hub would refuse `repo_id` as a repository name (None when it would not), asked before training."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return str(error).replace(" Use `repo_type` argument if needed.", "")
    return None


def push_blocker(token: str | None) -> str | None:
    """Why a push could never work, known without a network call (None when it might): checked before training,
    so hours of training do not end in a push that was impossible from the start."""
    from huggingface_hub import get_token

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not (token or get_token()):
        return "there is no Hub token (set HF_TOKEN, run `hf auth login`, or pass hub_token)"
    return None


STAGING_DIR = ".hub-push"  # in output_dir: checkpoints' files on their way up (a dotfolder: never pushed itself)


class HubPushCallback(TrainerCallback):
    """hub_strategy: every_save -- after each checkpoint, push its model files (never its optimizer state), in the
    background: training goes on while they upload (a synchronous push stopped training for the whole upload, minutes
    for BLIP-large on a slow link). hub_strategy: checkpoint (`whole`) -- the same, and in the same commit the whole
    checkpoint into last-checkpoint/, replacing the one before: what a resume needs on a machine whose disk is gone.

    The files are hard-linked (copied where a link cannot be made) into output_dir/.hub-push/checkpoint-N first, so a
    checkpoint that save_total_limit removes meanwhile is still pushed whole. A checkpoint saved while an earlier one
    still uploads is not pushed (the next one, or the end, carries newer weights), as the Trainer does;
    `hub_always_push: true` pushes every checkpoint, one after another. `wait()` (before the final push) lets the
    last one finish, so commits keep their order. A failed push is logged and training goes on; the final push at
    the end decides the exit code. The checkpoint's README.md is not pushed: it is peft's template for an adapter,
    whose metadata names the base model by path when it is local, which makes the Hub refuse the whole commit; the
    run's card comes at the end.
    """

    def __init__(self, repo_id: str, token: str | None, private: bool | None, revision: str | None = None,
                 always_push: bool = False, whole: bool = False):  # fmt: skip
        self.repo_id, self.token, self.private, self.revision = repo_id, token, private, revision
        self.always_push, self.whole = always_push, whole
        self.uploads: list[tuple[int, threading.Thread]] = []
        self.pushed_step: int | None = None  # the newest checkpoint whose push finished

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # left by a run that was killed while uploading
            shutil.rmtree(os.path.join(args.output_dir, STAGING_DIR), ignore_errors=True)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step = state.global_step
        running = self._running()
        if running and not self.always_push:
            logger.info("checkpoint-%d is not pushed: checkpoint-%d is still uploading (hub_always_push: true pushes "
                        "every checkpoint)", step, running[-1][0])  # fmt: skip
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{step}")
        if not os.path.isdir(checkpoint):
            return
        staged = stage_for_push(checkpoint, os.path.join(args.output_dir, STAGING_DIR, f"checkpoint-{step}"),
                                whole=self.whole)  # fmt: skip
        before = running[-1][1] if running else None
        upload = threading.Thread(target=self._push, args=(staged, step, before), name=f"hub-push-{step}",
                                  daemon=True)  # fmt: skip
        upload.start()
        self.uploads.append((step, upload))

    def _push(self, staged: str, step: int, before: threading.Thread | None) -> None:
        if before is not None:
            before.join()
        try:
            push_checkpoint(staged, self.repo_id, self.token, self.private, self.revision, step)
            self.pushed_step = step
            logger.info("pushed checkpoint-%d to %s%s", step, self.repo_id,
                        f" (whole, as {LAST_CHECKPOINT}/)" if self.whole else "")  # fmt: skip
        except PushError as error:  # a checkpoint is no run to push by hand: the end pushes the final model
            logger.warning("push of checkpoint-%d to %s failed (%s); training goes on, and the model is pushed at "
                           "the end", step, self.repo_id, error.reason)  # fmt: skip
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            with contextlib.suppress(OSError):  # the staging folder goes with its last checkpoint
                os.rmdir(os.path.dirname(staged))

    def _running(self) -> list[tuple[int, threading.Thread]]:
        return [(step, upload) for step, upload in self.uploads if upload.is_alive()]

    def wait(self) -> None:
        """Let the checkpoint pushes still uploading finish (before the final push, which must come after them)."""
        for step, upload in self._running():
            logger.info("waiting for the push of checkpoint-%d to finish", step)
            upload.join()

    def still_uploading(self) -> list[int]:
        return [step for step, _ in self._running()]


def stage_for_push(checkpoint: str, staged: str, whole: bool = False) -> str:
    """The files of `checkpoint` a push uploads (chosen by the filter upload_folder applies in push_folder), and
    with `whole` every file of it under last-checkpoint/ (but dotfiles and peft's README.md), hard-linked (else
    copied) into `staged`."""
    os.makedirs(staged, exist_ok=True)
    files = [name for name in os.listdir(checkpoint) if os.path.isfile(os.path.join(checkpoint, name))]
    chosen = [(name, name) for name in filter_repo_objects(files, allow_patterns=PUSHED_FILES,
                                                           ignore_patterns=[*NEVER_PUSHED, "README.md"])]  # fmt: skip
    if whole:
        for root, folders, names in os.walk(checkpoint):
            folders[:] = [folder for folder in folders if not folder.startswith(".")]
            for name in names:
                path = os.path.relpath(os.path.join(root, name), checkpoint)
                if not name.startswith(".") and path != "README.md":
                    chosen.append((path, os.path.join(LAST_CHECKPOINT, path)))
    for source, target in chosen:
        os.makedirs(os.path.dirname(os.path.join(staged, target)), exist_ok=True)
        try:
            os.link(os.path.join(checkpoint, source), os.path.join(staged, target))
        except OSError:  # another file system, or one without hard links
            shutil.copy2(os.path.join(checkpoint, source), os.path.join(staged, target))
    return staged


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def _reason(error: Exception, token: str | None) -> str:
    """Why a Hub call failed, as messages give it: the error's kind and text, the token blanked out."""
    return f"{type(error).__name__}: {_redact(str(error), token)}"


def write_model_card(folder: str, repo_id: str, **inputs) -> None:
    """README.md, and beside it what it was made from (CARD_INPUTS, never pushed), so that `push` to another repo
    id can write the card again for that id: its usage snippet and model-index name the repo it is in."""
    build_model_card(repo_id, **inputs).save(os.path.join(folder, "README.md"))
    with open(os.path.join(folder, CARD_INPUTS), "w", encoding="utf-8") as handle:
        json.dump({"repo_id": repo_id, **inputs}, handle, indent=1)


def retarget_model_card(folder: str, repo_id: str, revision: str | None = None) -> bool:
    """Write `folder`'s card again for `repo_id` (and the branch `revision`); False when the folder has no card
    inputs (a run made before they were saved: its card names the repo id it was trained for)."""
    path = os.path.join(folder, CARD_INPUTS)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        inputs = json.load(handle)
    # Inputs saved before the card kept Hub ids apart wrote metadata the Hub refuses (a local path): decided here.
    older = "base_model_id" not in inputs or "dataset_id" not in inputs
    revision = revision if on_branch(revision) else None
    if inputs.pop("repo_id") != repo_id or inputs.get("revision") != revision or older:
        inputs.setdefault("base_model_id", hub_model_id(inputs["base_model"]))
        inputs.setdefault("dataset_id", hub_dataset_id(inputs["dataset"]))
        write_model_card(folder, repo_id, **{**inputs, "revision": revision})
    return True


def publish_run(recipe, card_metrics: dict) -> bool:
    """Write the run's model card(s); push when the recipe asks. Everything is saved before any network call.

    Returns False when a requested push failed (the error is logged; the local output is complete).
    """
    model_args, training_args = recipe.model, recipe.training
    output_dir = training_args.output_dir
    repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
    generation = {
        "num_beams": training_args.generation_num_beams,
        "max_length": training_args.generation_max_length,
        "min_length": training_args.generation_min_length,
    }
    # A LoRA run that trained an adapter further saved it for the adapter's own base, which is what loads it.
    base_model = model_args.model_name_or_path
    if model_args.training_mode == "lora":
        base_model = adapter_base(base_model, model_args.model_revision) or base_model
    dataset, scored = recipe.data.dataset_name, recipe.data.eval_dataset_name
    branch = (
        training_args.hub_revision if training_args.push_to_hub and on_branch(training_args.hub_revision) else None
    )
    card = dict(
        base_model=base_model, dataset=dataset, recipe_yaml=recipe.as_yaml(), metrics=card_metrics,
        generation=generation, prompt=recipe.data.prompt, base_model_id=hub_model_id(base_model),
        dataset_id=hub_dataset_id(dataset),
        revision=branch,
        eval_dataset=scored, eval_dataset_id=hub_dataset_id(scored) if scored else None,
        extra_datasets=tuple(extra.dataset_name for extra in extra_training_datasets(recipe.data)),
        extra_scored={extra.name: extra.dataset_name for extra in extra_evaluation_datasets(recipe.data)},
    )  # fmt: skip
    write_model_card(output_dir, repo_id, training_mode=model_args.training_mode, **card)
    merged_dir = os.path.join(output_dir, "merged")
    if model_args.merge_lora:
        write_model_card(merged_dir, f"{repo_id}-merged", training_mode="lora-merged", **card)
    if not training_args.push_to_hub:
        return True
    try:
        url = push_folder(output_dir, repo_id, training_args.hub_token, training_args.hub_private_repo,
                          training_args.hub_revision)  # fmt: skip
        logger.info("pushed %s: %s", repo_id, url)
        if training_args.push_merged:
            url = push_folder(merged_dir, f"{repo_id}-merged", training_args.hub_token, training_args.hub_private_repo,
                              training_args.hub_revision)  # fmt: skip
            logger.info("pushed %s-merged: %s", repo_id, url)
    except PushError as error:
        logger.error("%s", error)
        return False
    return True
