"""Recipe schema and the rules between its keys: three dataclasses and `validate_recipe`.

A recipe's keys are the fields of `ModelArguments`, `DataArguments` and `CaptionTrainingArguments` (which is
`Seq2SeqTrainingArguments` plus the few settings BLIP captioning needs). Choice fields are `Literal`s from
choices.py, checked generically by the parser (recipe_parser.py), which also turns YAML and `--key value` into
these dataclasses. Rules that involve more than one key live in `validate_recipe`.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import yaml
from transformers import Seq2SeqTrainingArguments

from .choices import (
    GENERATION_DEFAULTS,
    AttnImplementation,
    CaptionPreprocessing,
    HubStrategy,
    ImageAugmentation,
    ScstBaseline,
    ScstSampling,
    TorchDtype,
    TrainingMode,
    TrainingObjective,
)
from .metrics import DEFAULT_METRICS, METRIC_FAMILIES, metric_keys
from .transforms import MAX_IMAGE_PIXELS

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora")


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the message names the file and key."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="builtin:tiny-blip",
        metadata={
            "help": "Required: the model to fine-tune. Hub id, local directory, or builtin:tiny-blip (a small random "
            "BLIP made offline)."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit."})
    training_mode: TrainingMode = field(
        default="full",
        metadata={
            "help": "What trains: full (everything) | frozen_vision (not the vision encoder) | lora (adapters)."
        },
    )
    torch_dtype: TorchDtype = field(
        default="float32", metadata={"help": "dtype the weights are loaded in: float32 | bfloat16 | float16."}
    )
    attn_implementation: AttnImplementation = field(
        default="sdpa", metadata={"help": "eager (transformers' BLIP) | sdpa (fused scaled_dot_product_attention)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        # BLIP's text decoder names its self- and cross-attention projections query/key/value; add "qkv" (and
        # "projection") to adapt the vision encoder's attention too.
        default_factory=lambda: ["query", "key", "value"],
        metadata={"help": "Module name suffixes that get LoRA adapters."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Also write the LoRA weights merged into the base model to output_dir/merged."},
    )
    cache_vision_features: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen vision encoder once per training image before training and train the text "
            "decoder on the stored features (frozen_vision or text-only LoRA, no image_augmentation)."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="builtin:shapes",
        metadata={
            "help": "Required. Hub id, a Hub repo's files in a folder, imagefolder directory (metadata.jsonl/csv), "
            "save_to_disk directory, JSON/JSONL file of image paths, COCO Karpathy or COCO captions-format file, or "
            "builtin:shapes."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration (also of a Hub repo's files in a local folder)."}
    )
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on; default: 'validation' (or 'val') when the dataset has it, else a held-out "
            "part."
        },
    )
    test_split: str | None = field(
        default=None,
        metadata={"help": "Split scored once after training (e.g. Karpathy 'test'), as test_results.json."},
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "Percent of training images held out for evaluation when there is no eval split (refused when "
            "there is one)."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the image (or its path)."})
    caption_column: str = field(default="text", metadata={"help": "Column holding one caption or a list of captions."})
    image_id_column: str | None = field(
        default=None,
        metadata={"help": "Column identifying an image; rows sharing it are one image with many captions."},
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Directory that relative image paths are resolved against."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training images."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N evaluation images (results name the split as a part)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N test_split images (results name the split as a part)."}
    )
    max_caption_length: int = field(
        default=40, metadata={"help": "Max decoder tokens per training caption, [DEC] + prompt + caption + [SEP]."}
    )
    prompt: str = field(
        default=GENERATION_DEFAULTS.prompt, metadata={"help": "Text every caption starts with, e.g. 'a picture of '."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad caption batches to a multiple of N tokens (8 suits tensor cores)."}
    )
    caption_preprocessing: CaptionPreprocessing = field(
        default="none", metadata={"help": "none | blip (LAVIS blip_caption: lowercase, strip punctuation, 50 words)."}
    )
    image_augmentation: ImageAugmentation = field(
        default="none", metadata={"help": "none | blip (random resized crop 0.5-1, flip, RandAugment(2, 5))."}
    )
    image_cache: bool = field(
        default=False,
        metadata={
            "help": "Decode and resize each image once into a uint8 memory-mapped file under BLIP_RECIPES_CACHE; "
            "epochs and evaluations then read pixels, not JPEGs (training only without image_augmentation)."
        },
    )
    validate_images: bool = field(default=True, metadata={"help": "Decode every image once before training."})
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Drop unreadable images and empty captions instead of failing."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Threads for image validation."})
    max_image_pixels: int = field(
        default=MAX_IMAGE_PIXELS,
        metadata={"help": "Images with more pixels (width x height) are bad samples: refused before decoding."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training split (WebDataset .tar shards: a directory, glob, {000..099} list or "
            "file; or any source datasets can stream) instead of loading it; needs max_steps and, to evaluate, "
            "eval_dataset_name."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset (any map-style source) whose eval_split/test_split is scored instead of "
            "dataset_name's (a file's one split is scored whole); needed with streaming."
        },
    )
    extra_eval_datasets: list[str | dict] | None = field(
        default=None,
        metadata={
            "help": "More datasets scored at every evaluation beside the evaluation split, each under its own name "
            "(eval_NAME_cider): SOURCE, or a mapping of dataset_name, name and its own eval_split, "
            "dataset_config_name, dataset_revision, image_root, image_column, caption_column, image_id_column."
        },
    )
    extra_train_datasets: list[str | dict] | None = field(
        default=None,
        metadata={
            "help": "More datasets (any map-style source) whose train split is trained on with dataset_name's: "
            "SOURCE, SOURCE*K (K times per epoch), or a mapping of dataset_name, repeat and its own train_split, "
            "dataset_config_name, dataset_revision, image_root, image_column, caption_column, image_id_column "
            "(columns default to the recipe's; image_root does not). Evaluation stays dataset_name's (or "
            "eval_dataset_name's)."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "With streaming: samples in the shuffle buffer (references, not images)."}
    )
    max_bad_samples_fraction: float = field(
        default=0.01,
        metadata={"help": "With streaming: bad samples are skipped and counted; past this fraction the run stops."},
    )


@dataclass
class CaptionTrainingArguments(Seq2SeqTrainingArguments):
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "true (or latest): the newest complete checkpoint-N in output_dir; a checkpoint folder's path; "
            "hub: first download hub_model_id's last-checkpoint/ (pushed by hub_strategy: checkpoint), then as true."
        },
    )
    generation_min_length: int = field(
        default=GENERATION_DEFAULTS.min_length, metadata={"help": "Min decoder length, [DEC] + prompt included."}
    )
    generation_max_length: int | None = field(
        default=GENERATION_DEFAULTS.max_length,
        metadata={"help": "Max decoder length, [DEC] + prompt included (LAVIS semantics)."},
    )
    generation_num_beams: int | None = field(
        default=GENERATION_DEFAULTS.num_beams, metadata={"help": "Beams for evaluation captions."}
    )
    eval_metrics: list[str] = field(
        default_factory=lambda: list(DEFAULT_METRICS),
        metadata={"help": f"Subset of {', '.join(METRIC_FAMILIES)}."},
    )
    caption_grid_size: int = field(
        default=6, metadata={"help": "Images in each evaluation's caption grid PNG (0: no grid)."}
    )
    push_merged: bool = field(
        default=False, metadata={"help": "LoRA + push_to_hub: also push the merged model to <hub_model_id>-merged."}
    )
    hub_strategy: HubStrategy = field(
        default="every_save",
        metadata={
            "help": "With push_to_hub: push the model at the end (end) or after every save (every_save); checkpoint: "
            "as every_save, and each checkpoint whole (optimizer state included) into the repo's last-checkpoint/, "
            "from which --resume_from_checkpoint hub continues the run on a machine that lacks it."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier run in output_dir: what it wrote (model or adapter, checkpoints, evaluations, "
            "results, card) is removed when the new run is about to train; other files stay."
        },
    )
    training_objective: TrainingObjective = field(
        default="cross_entropy",
        metadata={
            "help": "cross_entropy (next-token loss on the references) | scst (self-critical training: optimise "
            "CIDEr-D of sampled captions; start from a model that already captions)."
        },
    )
    scst_num_samples: int = field(default=5, metadata={"help": "scst: captions sampled per image and step."})
    scst_baseline: ScstBaseline = field(
        default="greedy",
        metadata={"help": "scst: greedy (the greedy caption's reward) | mean (mean reward of the other samples)."},
    )
    scst_sampling: ScstSampling = field(
        default="multinomial",
        metadata={"help": "scst: multinomial samples | beam (the finished beams of a beam search that wide)."},
    )
    scst_reward_weights: list[float] = field(
        default_factory=lambda: [1.0, 0.0], metadata={"help": "scst: weights of CIDEr-D and BLEU-4 in the reward."}
    )
    group_captions_by_image: bool = field(
        default=False,
        metadata={
            "help": "Put all captions of an image in one batch and encode the image once for them (its encoder pass "
            "and cross-attention keys/values serve every caption). Changes the batches: an image's captions share "
            "its batch and its augmentation. Needs several captions per image to pay."
        },
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an exponential moving average of the trainable weights (e.g. 0.999), evaluated and saved "
            "in their place; null: off."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop training after this many evaluations in a row that do not improve metric_for_best_model "
            "(needs load_best_model_at_end: the run ends with its best checkpoint); null: never stop early."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={
            "help": "How much metric_for_best_model must rise above its best so far to count as an improvement "
            "(early_stopping_patience)."
        },
    )
    hub_revision: str | None = field(
        default=None,
        metadata={"help": "Branch every push goes to (checkpoints, final, merged), created when missing; null: main."},
    )
    predict_with_generate: bool = field(default=True, metadata={"help": "Evaluation always generates captions."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator needs every field."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers, e.g. tensorboard."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's search for parameters without gradients. Off: in every training mode each trainable "
            "parameter gets a gradient every step, and the search costs a graph traversal per step."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace a NaN/inf step loss in the logged mean (the Trainer's default). Off: such a loss "
            "shows in the log, and no step waits for the GPU to check it (the check stalls the pipeline)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if choice_name(self.lr_scheduler_type) in METRIC_SCHEDULERS:
            # Every caption metric is better higher, but torch's ReduceLROnPlateau (and GreedyLR) default to mode
            # "min": they would cut the learning rate each time CIDEr improved. An explicit "min" is refused.
            self.lr_scheduler_kwargs = {"mode": "max", **(self.lr_scheduler_kwargs or {})}


STRATEGY_KEYS = ("eval_strategy", "save_strategy", "logging_strategy")
MACHINE_KEYS = ("use_cpu", "ddp_backend")  # machine.machine_defaults' keys
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")  # step on an evaluation metric (metric_for_best_model)


MAX_DATASET_REPEATS = 1000
# The DataArguments keys of one dataset that an extra_train_datasets / extra_eval_datasets entry may set for its own.
DATASET_KEYS = ("dataset_name", "dataset_config_name", "dataset_revision", "image_root", "image_column",
                "caption_column", "image_id_column")  # fmt: skip
NULLABLE_DATASET_KEYS = ("dataset_config_name", "dataset_revision", "image_root", "image_id_column")
EVALUATION_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


@dataclass
class ExtraDataset:
    """One entry of extra_train_datasets or extra_eval_datasets: its dataset's own keys (`settings`, DataArguments
    names); for training, how many times per epoch its images are trained on; for evaluation, the name its metrics
    go by (eval_NAME_cider)."""

    dataset_name: str
    repeat: int = 1
    settings: dict = field(default_factory=dict)
    name: str | None = None


def _dataset_entries(entries, key: str, own_keys: tuple[str, ...]) -> list[ExtraDataset]:
    """Entries of `key` -> [ExtraDataset]: `SOURCE`, `SOURCE*K` (training: K times per epoch; an existing path is a
    source as written, even with a `*`), or a mapping of `own_keys`. ValueError naming the entry when it cannot be
    read."""
    counted = "repeat" in own_keys
    parsed = []
    for entry in entries or []:
        where = f"{key}: {entry!r}"
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - set(own_keys))
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; an entry takes "
                                 f"{', '.join(own_keys)}")  # fmt: skip
            settings = {name: value for name, value in entry.items() if name not in ("repeat", "name")}
            for name, value in settings.items():
                nullable = name in NULLABLE_DATASET_KEYS
                if not (isinstance(value, str) and value.strip()) and not (value is None and nullable):
                    raise ValueError(f"{where}: {name} must be text{' or null' if nullable else ''}, got {value!r}")
            repeat, label = entry.get("repeat", 1), entry.get("name")
            if not settings.get("dataset_name"):
                raise ValueError(f"{where}: names no dataset (dataset_name)")
        elif isinstance(entry, str):
            settings, repeat, label = {"dataset_name": entry.strip()}, 1, None
            if counted and "*" in entry and not os.path.exists(entry):
                source, _, times = entry.rpartition("*")
                settings["dataset_name"] = source.strip()
                repeat = int(times) if times.strip().isdigit() else None
            if not settings["dataset_name"]:
                raise ValueError(f"{where} names no dataset")
        else:
            shapes = "SOURCE or SOURCE*K" if counted else "SOURCE"
            raise ValueError(f"{where}: an entry is a dataset ({shapes}) or a mapping with dataset_name")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_DATASET_REPEATS:
            raise ValueError(f"{where}: the times per epoch (SOURCE*K, or repeat) must be a whole number from 1 to "
                             f"{MAX_DATASET_REPEATS}")  # fmt: skip
        if label is not None and not (isinstance(label, str) and EVALUATION_NAME.match(label)):
            raise ValueError(f"{where}: name {label!r} must be lowercase letters, digits and _ (it names metrics: "
                             "eval_NAME_cider)")  # fmt: skip
        parsed.append(ExtraDataset(settings.pop("dataset_name"), repeat, settings, label))
    return parsed


def extra_training_datasets(data: DataArguments) -> list[ExtraDataset]:
    """extra_train_datasets -> [ExtraDataset]: `SOURCE` (once per epoch), `SOURCE*K` (K times), or a mapping of
    dataset_name, repeat and that dataset's own train_split, dataset_config_name, dataset_revision, image_root and
    column names. A dataset's split trained on twice is refused (SOURCE*K says it)."""
    mixture = _dataset_entries(
        data.extra_train_datasets, "extra_train_datasets", (*DATASET_KEYS, "train_split", "repeat")
    )
    seen = {_dataset_key(data.dataset_name, data.dataset_config_name, data.train_split)}
    for extra, entry in zip(mixture, data.extra_train_datasets or []):
        key = _dataset_key(extra.dataset_name, extra.settings.get("dataset_config_name"),
                           extra.settings.get("train_split", data.train_split))  # fmt: skip
        if key in seen:
            raise ValueError(
                f"extra_train_datasets: {entry!r}: its {key[2]!r} split is already trained on (dataset_name or an "
                "entry before); to train on a dataset more often, give it once with a number of times (SOURCE*K, or "
                "repeat)"
            )
        seen.add(key)
    return mixture


def _dataset_key(name: str, config: str | None, split: str) -> tuple:
    return (os.path.normpath(name), config, split)


def extra_evaluation_datasets(data: DataArguments) -> list[ExtraDataset]:
    """extra_eval_datasets -> [ExtraDataset], each scored beside the evaluation split under its own name: `SOURCE`
    or a mapping of dataset_name, name and that dataset's own eval_split, dataset_config_name, dataset_revision,
    image_root and column names. The name defaults to the dataset's file or repo name (lowercase, `_` for other
    characters); names must differ."""
    scored = _dataset_entries(data.extra_eval_datasets, "extra_eval_datasets", (*DATASET_KEYS, "eval_split", "name"))
    names: dict[str, str] = {}
    for extra in scored:
        if extra.name is None:
            stem = os.path.basename(os.path.normpath(extra.dataset_name)).split(".")[0]
            extra.name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "dataset"
        if extra.name == "generation":  # eval_generation_runtime is the evaluation split's generation time
            raise ValueError(f"extra_eval_datasets: {extra.dataset_name}: the name 'generation' is taken by the "
                             "evaluation split's eval_generation_runtime; give it another ({dataset_name: ..., "
                             "name: ...})")  # fmt: skip
        if extra.name in names:
            raise ValueError(
                f"extra_eval_datasets: {extra.dataset_name} and {names[extra.name]} are both named {extra.name!r} "
                "(their metrics would mix): give one another name ({dataset_name: ..., name: ...})"
            )
        names[extra.name] = extra.dataset_name
    return scored


def choice_name(choice) -> str:
    """An lr_scheduler_type or optim as written in a recipe (TrainingArguments turns them into enums)."""
    return getattr(choice, "value", choice)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CaptionTrainingArguments)


@dataclass
class Recipe:
    model: ModelArguments
    data: DataArguments
    training: CaptionTrainingArguments
    path: str | None
    values: dict = field(default_factory=dict)  # every key the file or command line set, with its typed value
    overrides: dict = field(default_factory=dict)  # the command line's part of `values`

    @property
    def explicit_keys(self) -> frozenset:
        return frozenset(self.values)

    @property
    def source(self) -> str:
        return self.path or "command line"

    def resolved(self) -> dict:
        """Every key's effective value, secrets left out, and keys that do not apply to this run (another training
        mode's or objective's, which check_combinations refuses when set), so the record is a recipe that runs."""
        known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}
        values = {**dataclasses.asdict(self.model), **dataclasses.asdict(self.data), **self.training.to_dict()}
        idle = set(LORA_KEYS) if self.model.training_mode != "lora" else set()
        if self.training.training_objective != "scst":
            idle |= {key for key in values if key.startswith("scst_")}
        if self.data.eval_dataset_name is None:
            idle.add("eval_dataset_name")
        idle |= {key for key in ("extra_train_datasets", "extra_eval_datasets") if getattr(self.data, key) is None}
        if self.training.early_stopping_patience is None:
            idle.add("early_stopping_threshold")
        # What this machine chose (machine.py: use_cpu without a GPU, gloo for several CPU processes) is not the
        # recipe's: replayed on a GPU machine use_cpu would train on the CPU, and ddp_backend in one process fails.
        idle |= {key for key in MACHINE_KEYS if key not in self.explicit_keys}
        return {
            key: value for key, value in values.items() if key in known and key not in idle and not is_secret_key(key)
        }

    def write_resolved(self, path: str) -> None:
        """resolved(), for the record (recipe.yaml in output_dir)."""
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.resolved(), handle, sort_keys=True, allow_unicode=True)

    def as_yaml(self) -> str:
        """The keys the recipe file and command line set, as YAML built from their parsed values (never by
        filtering the file's text), secrets left out: what the model card shows."""
        public = {key: value for key, value in self.values.items() if not is_secret_key(key)}
        return yaml.safe_dump(public, sort_keys=False, allow_unicode=True)


def is_secret_key(key: str) -> bool:
    """hub_token and any other *token* key (TrainingArguments redacts the same ones)."""
    return "token" in key


def check_secrets_stay_in_their_keys(recipe: Recipe) -> None:
    """A token's value given under another key too (a YAML alias, a copy) would be written wherever that key is
    (run names, tracker logs, the model card): refuse it."""
    secrets = [str(value) for key, value in recipe.values.items() if is_secret_key(key) and value]
    for key, value in recipe.values.items():
        if is_secret_key(key):
            continue
        text = yaml.safe_dump(value)
        leaked = [secret for secret in secrets if len(secret) >= 8 and secret in text]
        if leaked:
            raise RecipeError(
                f"{recipe.source}: key '{key}' holds the value of a token key; a token may only be given as "
                "hub_token (or in HF_TOKEN), never copied into another key"
            )


MAX_BATCH_SIZE = 65_536  # per device; larger is a typo (no GPU holds 65k BLIP images), not a setting


def validate_recipe(recipe: Recipe) -> None:
    """Values and combinations that cannot work fail here, before any model or data is loaded.

    Single-key choices (training_mode, torch_dtype, ...) are already checked against their Literal by the parser.
    """
    check_values(recipe)
    check_combinations(recipe)
    check_secrets_stay_in_their_keys(recipe)


def _checker(recipe: Recipe):
    """check(condition, message): a RecipeError naming the recipe when the condition fails."""

    def check(condition: bool, message: str) -> None:
        if not condition:
            raise RecipeError(f"{recipe.source}: {message}")

    return check


def check_values(recipe: Recipe) -> None:
    """One key at a time: numbers in their range, trackers installed."""
    model, data, training = recipe.model, recipe.data, recipe.training
    check = _checker(recipe)

    rate = training.learning_rate
    check(math.isfinite(rate) and rate > 0, f"learning_rate must be a positive number, got {rate}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        size = getattr(training, key)
        check(1 <= size <= MAX_BATCH_SIZE, f"{key} must be between 1 and {MAX_BATCH_SIZE}, got {size}")
    steps = training.gradient_accumulation_steps
    check(steps >= 1, f"gradient_accumulation_steps must be at least 1, got {steps}")
    # The Trainer reads max_steps <= 0 as "train num_train_epochs" except 0 itself, which trains no step at all.
    check(
        training.max_steps == -1 or training.max_steps > 0,
        f"max_steps must be a positive number of optimizer steps, or -1 to train num_train_epochs, got "
        f"{training.max_steps}",
    )
    check(
        training.max_steps > 0 or (math.isfinite(training.num_train_epochs) and training.num_train_epochs > 0),
        f"num_train_epochs must be positive (or set max_steps), got {training.num_train_epochs}",
    )
    check_optimizer_values(training, check)
    for key in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(training, key)  # below 1: a fraction of the run's steps
        check(value is None or (math.isfinite(value) and value > 0), f"{key} must be positive, got {value}")
    limit = training.save_total_limit
    check(
        limit is None or limit >= 1,
        f"save_total_limit must be at least 1 (null keeps every checkpoint; save_strategy no saves none), got {limit}",
    )
    for key in ("seed", "data_seed"):
        value = getattr(training, key)
        check(value is None or 0 <= value < 2**32, f"{key} must be in [0, 2**32), got {value}")
    workers = training.dataloader_num_workers
    check(workers >= 0, f"dataloader_num_workers must be 0 (load in the training process) or more, got {workers}")
    check(
        workers > 0 or not training.dataloader_persistent_workers,  # torch's DataLoader refuses it at step 0
        "dataloader_persistent_workers: true needs dataloader_num_workers above 0 (with 0 there are no workers to "
        "keep); set dataloader_persistent_workers: false",
    )
    check(training.caption_grid_size >= 0, f"caption_grid_size must be 0 (no grid) or more, got "
          f"{training.caption_grid_size}")  # fmt: skip
    if training.torch_compile_mode is not None:
        modes = torch_compile_modes()
        check(
            training.torch_compile_mode in modes,
            f"torch_compile_mode must be one of {', '.join(modes)} (or null), got {training.torch_compile_mode!r}",
        )
    # torch's DataLoader and process group would refuse these only at step 0 (after the data and model load)
    prefetch = training.dataloader_prefetch_factor
    check(
        prefetch is None or prefetch >= 1, f"dataloader_prefetch_factor must be at least 1 (or null), got {prefetch}"
    )
    context = training.dataloader_multiprocessing_context
    if context is not None:
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
        check(context in methods, f"dataloader_multiprocessing_context must be one of {', '.join(methods)} (or "
              f"null), got {context!r}")  # fmt: skip
    check(training.ddp_timeout > 0, f"ddp_timeout must be a positive number of seconds, got {training.ddp_timeout}")
    warmup = training.warmup_steps
    check(
        warmup < 1 or float(warmup).is_integer(),
        f"warmup_steps must be a fraction of the training steps below 1 or a whole number of steps, got {warmup} "
        "(the Trainer would warm up for int() of it)",
    )
    if training.torch_compile and training.torch_compile_backend is not None:
        # torch.compile would fail at the first forward pass, after the data and model load
        backends = torch_compile_backends()
        check(
            training.torch_compile_backend in backends,
            f"torch_compile_backend must be one of {', '.join(backends)} (or null), got "
            f"{training.torch_compile_backend!r}",
        )
    smoothing = training.label_smoothing_factor
    check(0 <= smoothing < 1, f"label_smoothing_factor must be in [0, 1), got {smoothing}")
    beams = training.generation_num_beams
    check(beams is None or beams >= 1, f"generation_num_beams must be at least 1, got {beams}")
    check(training.generation_min_length >= 0, "generation_min_length must not be negative")
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        value = getattr(data, key)
        check(value is None or value >= 1, f"{key} must be at least 1 (or null for all), got {value}")
    multiple = data.pad_to_multiple_of
    check(multiple is None or multiple >= 1, f"pad_to_multiple_of must be at least 1, got {multiple}")
    check(model.lora_r > 0, f"lora_r must be positive, got {model.lora_r}")
    check(model.lora_alpha > 0, f"lora_alpha must be positive, got {model.lora_alpha}")
    check(0 <= model.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {model.lora_dropout}")
    check(bool(model.lora_target_modules), "lora_target_modules must name at least one module")
    check(0 <= data.validation_split_percentage < 100, "validation_split_percentage must be in [0, 100)")
    check(data.max_caption_length >= 4, f"max_caption_length must be at least 4 tokens, got {data.max_caption_length}")
    threads = data.preprocessing_num_workers
    check(threads is None or threads >= 1, f"preprocessing_num_workers must be at least 1 (or null: up to 8 threads), "
          f"got {threads}")  # fmt: skip
    check(data.max_image_pixels >= 1, f"max_image_pixels must be positive, got {data.max_image_pixels}")
    check(training.scst_num_samples >= 1, f"scst_num_samples must be at least 1, got {training.scst_num_samples}")
    weights = training.scst_reward_weights
    check(
        len(weights) == 2 and all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0,
        f"scst_reward_weights must be two non-negative weights (CIDEr-D, BLEU-4), not both 0, got {weights}",
    )
    decay = training.ema_decay
    check(decay is None or 0 < decay < 1, f"ema_decay must be in (0, 1) or null, got {decay}")
    patience = training.early_stopping_patience
    check(patience is None or patience >= 1, f"early_stopping_patience must be at least 1 or null, got {patience}")
    threshold = training.early_stopping_threshold
    check(
        math.isfinite(threshold) and threshold >= 0,
        f"early_stopping_threshold must be a finite number >= 0, got {threshold}",
    )
    check(data.shuffle_buffer_size >= 1, f"shuffle_buffer_size must be at least 1, got {data.shuffle_buffer_size}")
    fraction = data.max_bad_samples_fraction
    check(0 <= fraction < 1, f"max_bad_samples_fraction must be in [0, 1), got {fraction}")
    missing = missing_trackers(training.report_to)
    names = " ".join(missing)
    check(not missing, f"report_to names {names}, which is not installed here (pip install {names})")


def check_optimizer_values(training: CaptionTrainingArguments, check) -> None:
    """What torch's optimizers and clipping would reject only once training starts (or silently ignore: a NaN or
    negative max_grad_norm turns clipping off), with the key named."""
    decay = training.weight_decay
    check(math.isfinite(decay) and decay >= 0, f"weight_decay must be 0 or more, got {decay}")
    for key in ("adam_beta1", "adam_beta2"):
        beta = getattr(training, key)
        check(0 <= beta < 1, f"{key} must be in [0, 1), got {beta}")
    epsilon = training.adam_epsilon
    check(math.isfinite(epsilon) and epsilon >= 0, f"adam_epsilon must be 0 or more, got {epsilon}")
    norm = training.max_grad_norm
    check(
        norm is not None and math.isfinite(norm) and norm >= 0,
        f"max_grad_norm must be 0 (no clipping) or more, got {norm}",
    )


def torch_compile_modes() -> list[str]:
    """The modes this torch's torch.compile accepts (its own list; imported only when a recipe names one)."""
    from torch._inductor import list_mode_options

    return list(list_mode_options())


def torch_compile_backends() -> list[str]:
    """The backends this torch's torch.compile knows, its debugging and test ones included."""
    from torch._dynamo import list_backends

    return [name for name in list_backends(exclude_tags=()) if "TESTING" not in name]


def missing_trackers(report_to) -> list[str]:
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    wanted = [name for name in names if name not in ("none", "all")]
    available = set(get_available_reporting_integrations())
    return [name for name in wanted if name not in available]


def check_combinations(recipe: Recipe) -> None:
    """Keys that cannot go together."""
    model, data, training = recipe.model, recipe.data, recipe.training
    check = _checker(recipe)

    if model.training_mode != "lora":
        stray = sorted(recipe.explicit_keys.intersection(LORA_KEYS))
        check(
            not stray,
            f"{', '.join(stray)} only apply to training_mode: lora (training_mode is {model.training_mode!r})",
        )
    unknown_metrics = [name for name in training.eval_metrics if name not in METRIC_FAMILIES]
    check(not unknown_metrics, f"eval_metrics: unknown {unknown_metrics}; choose from {METRIC_FAMILIES}")
    check(bool(training.eval_metrics), "eval_metrics must name at least one metric")
    if training.metric_for_best_model is not None:
        scored = metric_keys(training.eval_metrics)
        # Not set, it is the Trainer's default for load_best_model_at_end and metric schedulers: "loss".
        user = (
            "load_best_model_at_end"
            if training.load_best_model_at_end
            else f"lr_scheduler_type {choice_name(training.lr_scheduler_type)}"
        )
        check(
            "metric_for_best_model" in recipe.explicit_keys,
            f"{user} needs metric_for_best_model (e.g. cider); evaluation reports caption metrics, no loss",
        )
        try:  # an extra evaluation dataset's metric may be the one: its name first (nocaps_cider)
            extra_names = [extra.name for extra in extra_evaluation_datasets(data)]
        except ValueError:
            extra_names = []  # refused below with the entry named
        computed = {*scored, *(f"{name}_{key}" for name in extra_names for key in scored)}
        check(
            training.metric_for_best_model.removeprefix("eval_") in computed,
            f"metric_for_best_model {training.metric_for_best_model!r} is not computed; "
            f"eval_metrics give {sorted(scored)}"
            + (f" (and {', '.join(f'{name}_...' for name in extra_names)})" if extra_names else ""),
        )
    check_evaluation_is_generation(recipe, check)
    check_trainer_options(recipe, check)
    check(
        not training.push_to_hub or bool(training.hub_model_id),
        "push_to_hub: true needs hub_model_id (e.g. user/blip-football)",
    )
    check(
        not training.push_merged or (model.training_mode == "lora" and model.merge_lora),
        "push_merged needs training_mode: lora and merge_lora: true",
    )
    if training.hub_model_id:  # the Hub would refuse it only at the push, after training
        from .hub import repo_id_problem

        merged = [f"{training.hub_model_id}-merged"] if training.push_merged else []
        for repo_id in [training.hub_model_id, *merged]:
            problem = repo_id_problem(repo_id)
            check(problem is None, f"hub_model_id: {problem}")
    if training.push_to_hub:
        from .hub import revision_problem

        problem = revision_problem(training.hub_revision)
        check(problem is None, f"hub_revision {problem}")
    if training.push_to_hub and training.hub_strategy == "checkpoint":
        check(training.save_strategy != "no", "hub_strategy checkpoint pushes checkpoints; save_strategy is no")
        check(
            not training.save_only_model,
            "hub_strategy checkpoint pushes checkpoints to resume from, which save_only_model: true saves without "
            "optimizer state; use hub_strategy every_save to push their weights",
        )
    if str(training.resume_from_checkpoint).strip().lower() == "hub":
        check(
            bool(training.hub_model_id),
            "resume_from_checkpoint: hub needs hub_model_id (the repo a run with hub_strategy: checkpoint pushed to)",
        )
    check(
        training.generation_max_length is None or training.generation_max_length > training.generation_min_length,
        "generation_max_length must exceed generation_min_length",
    )
    check_launcher_precision(recipe, check)
    check_launcher_compile(recipe, check)
    check_launcher_processes(check)
    check(not (training.bf16 and training.fp16), "bf16 and fp16 are exclusive")
    check(
        not (training.fp16 and training.use_cpu),
        "fp16 needs a GPU: on the CPU accelerate turns it off and trains in fp32; use bf16: true for "
        "mixed precision on the CPU, or neither",
    )
    if model.cache_vision_features:
        check(
            model.training_mode != "full",
            "cache_vision_features needs a vision encoder that does not train (training_mode frozen_vision or lora)",
        )
        check(
            data.image_augmentation == "none",
            f"cache_vision_features computes each image's features once: image_augmentation must be none, got "
            f"{data.image_augmentation!r}",
        )
        check(
            not _sharded(training),
            "cache_vision_features runs on one device or under DDP, not with FSDP or DeepSpeed (they shard the "
            "encoder it runs before training)",
        )
    scst_keys = sorted(key for key in recipe.explicit_keys if key.startswith("scst_"))
    check(
        training.training_objective == "scst" or not scst_keys,
        f"{', '.join(scst_keys)} only apply to training_objective: scst",
    )
    if training.training_objective == "scst":
        check(not data.streaming, "training_objective scst needs each image's references: a map-style train split")
        check(
            training.scst_baseline != "mean" or training.scst_num_samples >= 2,
            "scst_baseline mean is the mean reward of an image's other samples: scst_num_samples must be at least 2",
        )
        check(
            training.label_smoothing_factor == 0,
            "label_smoothing_factor applies to cross_entropy; scst's loss weighs its samples' log-probabilities by "
            "their rewards and would ignore it",
        )
    check(
        training.ema_decay is None or not training.load_best_model_at_end,
        "ema_decay with load_best_model_at_end: evaluations score the average, but the best checkpoint holds raw "
        "weights; use one of them",
    )
    if training.early_stopping_patience is not None:
        # Without it the run would end, and save and publish, `patience` evaluations past its best model.
        check(
            training.load_best_model_at_end,
            "early_stopping_patience needs load_best_model_at_end: true (and metric_for_best_model, e.g. cider), so "
            "that the run ends with its best checkpoint rather than the one early_stopping_patience evaluations later",
        )
    check(
        training.early_stopping_patience is not None or "early_stopping_threshold" not in recipe.explicit_keys,
        "early_stopping_threshold only applies with early_stopping_patience",
    )
    check(
        recipe.data.test_split is not None or recipe.data.max_test_samples is None,
        "max_test_samples only applies with test_split (max_eval_samples cuts the evaluation split)",
    )
    if training.training_objective == "scst" or training.ema_decay is not None:
        check(
            not _sharded(training),
            "training_objective scst and ema_decay run on one device or under DDP (tested there)",
        )
    if training.group_captions_by_image:
        check(not data.streaming, "group_captions_by_image orders a map-style split's captions by image; not with "
              "streaming")  # fmt: skip
        check(
            training.training_objective == "cross_entropy",
            "group_captions_by_image applies to training_objective cross_entropy (scst already samples per image)",
        )
        check(
            not _sharded(training),
            "group_captions_by_image runs on one device or under DDP (tested there), not with FSDP or DeepSpeed",
        )
    if data.streaming:
        check(training.max_steps > 0, "streaming: true needs max_steps (a stream has no length to count epochs by)")
        # The Trainer counts a stream's whole run (max_steps) as one epoch: "epoch" would mean once, at the end.
        by_epoch = [key for key in STRATEGY_KEYS if choice_name(getattr(training, key)) == "epoch"]
        check(
            not by_epoch,
            f"{', '.join(by_epoch)}: epoch with streaming: true means once, at the end of max_steps (a stream has "
            f"no epochs); use steps with {', '.join(key.replace('strategy', 'steps') for key in by_epoch)}",
        )
        for key in ("image_cache", "max_train_samples"):
            check(not getattr(data, key), f"{key} does not apply to a stream (streaming: true)")
        check(not model.cache_vision_features, "cache_vision_features encodes a map-style split; not with streaming")
        check(
            data.eval_dataset_name is not None or not scores_captions(recipe),
            "streaming: true with evaluation or a test_split needs eval_dataset_name (a map-style dataset with those "
            "splits)",
        )
    if data.extra_eval_datasets is not None:
        try:
            extra_evaluation_datasets(data)
        except ValueError as error:
            check(False, str(error))
        check(
            wants_evaluation(training),
            "extra_eval_datasets are scored at each evaluation, and this run evaluates nowhere: set eval_strategy, "
            "do_eval or eval_on_start",
        )
    if data.extra_train_datasets is not None:
        check(
            not data.streaming,
            "extra_train_datasets mixes map-style datasets; with streaming: true put every dataset's shards in "
            "dataset_name (a glob or a {a,b} list)",
        )
        try:
            extra_training_datasets(data)
        except ValueError as error:
            check(False, str(error))
    if data.eval_dataset_name is not None:
        check(
            data.validation_split_percentage == DataArguments.validation_split_percentage,
            "validation_split_percentage holds out training images for evaluation, and eval_dataset_name names the "
            "dataset evaluated instead: remove one of them",
        )
    check(
        not (training.use_cpu and (training.fsdp or _env_flag("ACCELERATE_USE_FSDP"))),
        "FSDP needs GPUs: on the CPU accelerate drops the FSDP plugin and runs plain data parallelism, which shards "
        "nothing; on a CPU use accelerate_configs/multi_gpu.yaml (DDP over gloo) or DeepSpeed",
    )


def check_evaluation_is_generation(recipe: Recipe, check) -> None:
    """Evaluation generates captions and scores them, higher better: Trainer settings for a loss evaluation would
    be ignored or turned upside down."""
    training = recipe.training
    for key, value in (("predict_with_generate", False), ("prediction_loss_only", True)):
        check(
            getattr(training, key) != value,
            f"{key}: {str(value).lower()} asks for a loss-only evaluation; evaluation here always generates captions "
            f"and scores them (eval_metrics)",
        )
    if training.metric_for_best_model is not None:
        check(
            training.greater_is_better is not False,
            f"greater_is_better: false, but metric_for_best_model {training.metric_for_best_model} is better higher "
            "(every caption metric is); leave greater_is_better out",
        )
    if choice_name(training.lr_scheduler_type) in METRIC_SCHEDULERS:
        mode = (training.lr_scheduler_kwargs or {}).get("mode")
        check(
            mode == "max",
            f"lr_scheduler_kwargs mode {mode!r}: lr_scheduler_type {choice_name(training.lr_scheduler_type)} "
            f"steps on metric_for_best_model, which is better higher; mode must be max (the default here)",
        )


# Trainer keys whose machinery this project replaces: CaptionTrainer.evaluate generates and scores captions instead
# of the Trainer's logit evaluation loop, the collator names the labels, PreemptionCallback answers SIGTERM. Set to
# anything but their defaults they would be ignored (generation_config: fail at load), so they are refused, each
# with what to use instead.
UNUSED_TRAINER_KEYS = {
    "generation_config": "decoding settings are generation_num_beams, generation_max_length and "
    "generation_min_length (saved in the model's generation_config.json)",
    "bf16_full_eval": "evaluation generates in the training precision (bf16 or fp16 autocast)",
    "fp16_full_eval": "evaluation generates in the training precision (bf16 or fp16 autocast)",
    "eval_accumulation_steps": "evaluation gathers generated captions per batch, not logits",
    "eval_do_concat_batches": "evaluation gathers generated captions per batch, not logits",
    "eval_use_gather_object": "evaluation gathers generated captions per batch, not logits",
    "include_for_metrics": "the metrics score generated captions against every reference of the image (eval_metrics)",
    "batch_eval_metrics": "the metrics score the whole split's captions at once (eval_metrics)",
    "label_names": "the collator builds the labels from the captions",
    "length_column_name": "it serves train_sampling_strategy group_by_length, which is refused",
    "sortish_sampler": "transformers no longer implements it (captions are padded per batch already)",
    "enable_jit_checkpoint": "SIGTERM already finishes the step, saves a checkpoint and exits 143; the Trainer's "
    "handler would replace that one",
    "do_predict": "test_split names the split scored after training (eval_split's scoring, on another split)",
    # transformers' save_pretrained writes weights on the first process of the job alone, whatever the Trainer asks:
    # the other machines' checkpoints would hold optimizer state without weights, and never resume.
    "save_on_each_node": "transformers writes the model's weights on the job's first process only, so the other "
    "machines' checkpoints would have none; put output_dir on a file system every machine mounts",
}


def field_default(cls, name: str):
    """The value a dataclass field has when a recipe leaves it out."""
    for entry in dataclasses.fields(cls):
        if entry.name == name:
            return entry.default_factory() if entry.default_factory is not dataclasses.MISSING else entry.default
    raise KeyError(name)


def check_trainer_options(recipe: Recipe, check) -> None:
    """Trainer options that would do something else with BLIP than they say, or fail only once training starts."""
    training = recipe.training
    for key, instead in UNUSED_TRAINER_KEYS.items():
        if hasattr(training, key):  # not every transformers version has every key
            check(
                getattr(training, key) == field_default(type(training), key),
                f"{key} is not used here: {instead}; leave it out",
            )
    # transformers >= 5.2 has train_sampling_strategy; 5.0 and 5.1 have group_by_length.
    sampling = getattr(training, "train_sampling_strategy", "random")
    if getattr(training, "group_by_length", False):
        sampling = "group_by_length"
    check(
        sampling in ("random", "sequential"),
        f"train_sampling_strategy {sampling}: the Trainer would measure every training item's length by loading "
        "it, decoding every image before step 1, and take the length of its pixel values (the same for every "
        "image); captions are padded per batch already. Use random (or group_captions_by_image)",
    )
    check(
        not training.use_liger_kernel,
        "use_liger_kernel: Liger has no kernels for BLIP (the Trainer would train without them); leave it out",
    )
    check(
        not training.auto_find_batch_size,
        "auto_find_batch_size: on an out-of-memory error the Trainer halves the per-device batch and starts training "
        "over at step 0 (the schedule from its start, the weights and optimizer state as the failed attempt left "
        "them) with half the global batch; under several processes only the process that ran out starts over and "
        "the others wait until the timeout. Set per_device_train_batch_size and gradient_accumulation_steps (a "
        "checkpoint resumes with another split of the same global batch)",
    )
    if training.include_num_input_tokens_seen not in ("no", False):
        check(
            training.training_objective == "cross_entropy",
            "include_num_input_tokens_seen counts the caption tokens a cross_entropy step trains on; scst samples "
            "its captions",
        )
        from transformers import Trainer

        check(
            hasattr(Trainer, "_track_num_input_tokens"),  # CaptionTrainer counts caption tokens through it
            "include_num_input_tokens_seen needs transformers >= 5.3 (this one would count BLIP's pixel values as "
            "tokens)",
        )
    problem = optimizer_problem(training)
    check(problem is None, f"optim {choice_name(training.optim)}: {problem}")
    problem = optim_args_problem(training)
    check(problem is None, f"optim_args {training.optim_args!r}: {problem}")
    problem = scheduler_problem(training)
    check(problem is None, f"lr_scheduler_kwargs {training.lr_scheduler_kwargs}: {problem}")


def optimizer_problem(training: CaptionTrainingArguments) -> str | None:
    """What the Trainer's optimizer factory would raise only once training starts, asked now: an optimizer whose
    package is not installed (transformers says so as an ImportError, or for a few as a ValueError that says
    "install"). Settings that need the model (GaLore's target modules) are checked by the Trainer at step 0."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(training)
    except ImportError as error:
        return str(error)
    except ValueError as error:
        if "install" in str(error).lower():
            return str(error)
    return None


def optim_args_problem(training: CaptionTrainingArguments) -> str | None:
    """optim_args ("key=value,key=value") that the Trainer would fail to parse at step 0, or pass on with a value
    its optimizer cannot use, or ignore: each optimizer reads its own few keys and drops the others (adamw_torch
    reads none). An optimizer whose factory needs the model (GaLore, APOLLO, LOMO) is left to the Trainer."""
    from transformers import Trainer

    if not training.optim_args:
        return None
    pairs = training.optim_args.replace(" ", "").split(",")
    malformed = [pair for pair in pairs if pair.count("=") != 1]
    if malformed:
        return f"expected key=value pairs separated by commas, got {', '.join(map(repr, malformed))}"
    given = training.optim_args

    def optimizer_kwargs(optim_args):
        training.optim_args = optim_args
        try:
            return Trainer.get_optimizer_cls_and_kwargs(training)[1]
        finally:
            training.optim_args = given

    try:
        optimizer_kwargs(given)
        plain = optimizer_kwargs(None)
    except (ValueError, TypeError, AttributeError) as error:
        needs_model = "model" in str(error).lower()
        return None if needs_model else f"{type(error).__name__}: {error}"
    except ImportError:
        return None  # optimizer_problem names it
    ignored = [pair.split("=")[0] for pair in pairs if optimizer_kwargs(pair) == plain]
    if ignored:
        return (
            f"optim {choice_name(training.optim)} takes no {', '.join(ignored)} from optim_args (the Trainer would "
            "ignore it; adam_beta1, adam_beta2, adam_epsilon and weight_decay are keys of their own)"
        )
    return None


def scheduler_problem(training: CaptionTrainingArguments) -> str | None:
    """What lr_scheduler_kwargs would do only once training starts, asked now on a one-parameter optimizer: a key
    the schedule does not take (a TypeError after the data and model load), a value it cannot use (an error once
    warmup ends, mid-run: the schedule is evaluated at its start, warmup end, middle and end), or keys the constant
    schedules would ignore."""
    import torch
    from transformers import get_scheduler

    name, kwargs = choice_name(training.lr_scheduler_type), dict(training.lr_scheduler_kwargs or {})
    if not kwargs:
        return None
    if name in ("constant", "constant_with_warmup"):
        return f"lr_scheduler_type {name} takes none (the Trainer would ignore them)"
    total = training.max_steps if training.max_steps > 0 else 1000  # the real count needs the data
    warmup = min(training.get_warmup_steps(total), total)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training.learning_rate)
    try:
        schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                 scheduler_specific_kwargs=kwargs)  # fmt: skip
        for factor in getattr(schedule, "lr_lambdas", []):
            for step in sorted({0, warmup, (warmup + total) // 2, total - 1, total}):
                float(factor(step))
        if name in METRIC_SCHEDULERS:
            schedule.step(0.5)
    except (TypeError, ValueError, KeyError, ArithmeticError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_launcher_precision(recipe: Recipe, check) -> None:
    """`accelerate launch` with mixed_precision bf16/fp16 (a config file, --mixed_precision) trains in it whatever
    the recipe says; a recipe silent on bf16/fp16 takes it (recipe_parser.py), one that says otherwise is refused."""
    from .machine import launcher_precision

    launched = launcher_precision()
    if launched == "no":
        return
    said = {key: getattr(recipe.training, key) for key in ("bf16", "fp16") if key in recipe.explicit_keys}
    agrees = launched in ("bf16", "fp16") and all(value == (key == launched) for key, value in said.items())
    settings = ", ".join(f"{key}: {str(value).lower()}" for key, value in said.items()) or "neither bf16 nor fp16"
    check(
        agrees,
        f"accelerate launch asks for mixed_precision {launched} (its config file or --mixed_precision), but the "
        f"recipe sets {settings}; make them agree (this project trains in bf16, fp16 or fp32, which is "
        "mixed_precision 'no' in the accelerate config)",
    )


def check_launcher_processes(check) -> None:
    """`accelerate launch --num_processes N` without --multi_gpu (on a machine without GPUs, or with --cpu) starts one
    process and drops N: the run trained alone, with a global batch N times smaller than asked for."""
    from .machine import launcher_processes_dropped

    asked = launcher_processes_dropped()
    check(
        asked is None,
        f"accelerate launch was asked for {asked} processes but started one: without --multi_gpu (or a config file "
        "with distributed_type MULTI_GPU/MULTI_CPU) its simple launcher runs a single process here. Add --multi_gpu "
        f"(on a CPU: one gloo job of {asked} processes), or launch without --num_processes",
    )


def check_launcher_compile(recipe: Recipe, check) -> None:
    """`accelerate launch` with a dynamo backend compiles the model even when the recipe says torch_compile: false
    (a recipe silent on it takes the launcher's, recipe_parser.py); an explicit false is refused."""
    from .machine import launcher_compile

    launched = launcher_compile()
    check(
        not launched or recipe.values.get("torch_compile", True),  # the Trainer sets it again when a mode is given
        f"accelerate launch asks for torch.compile (dynamo_backend {launched.get('torch_compile_backend')}, its "
        "config file or --dynamo_backend), but the recipe sets torch_compile: false; make them agree (dynamo_backend "
        "'no' in the accelerate config)",
    )


def sharding_engine(training: CaptionTrainingArguments) -> str | None:
    """The engine that shards the run, DeepSpeed or FSDP, asked for in the recipe or by `accelerate launch` (in its
    environment); None for one process or DDP."""
    if training.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if training.fsdp or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def _sharded(training: CaptionTrainingArguments) -> bool:
    return sharding_engine(training) is not None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def wants_evaluation(training: CaptionTrainingArguments) -> bool:
    return (
        training.eval_strategy != "no" or training.do_eval or training.eval_on_start or training.load_best_model_at_end
    )


def scores_captions(recipe: Recipe) -> bool:
    """Whether the run generates and scores captions: evaluations during training, a final one, or a test split."""
    return wants_evaluation(recipe.training) or recipe.data.test_split is not None
