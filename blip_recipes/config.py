"""Recipe configuration: YAML file + `--key value` overrides -> three typed dataclasses.

A recipe's keys are the fields of `ModelArguments`, `DataArguments` and `CaptionTrainingArguments` (which is
`Seq2SeqTrainingArguments` plus the few settings BLIP captioning needs). Values are coerced to the field's type
with one set of rules for YAML and the command line; an unknown key is an error that names the closest valid one.
"""

import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass, field

import yaml
from transformers import Seq2SeqTrainingArguments

TRAINING_MODES = ("full", "frozen_vision", "lora")
CAPTION_METRICS = ("bleu", "meteor", "rouge_l", "cider", "spice")
DEFAULT_EVAL_METRICS = ("bleu", "meteor", "rouge_l", "cider")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora")


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the message names the file and key."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="builtin:tiny-blip",
        metadata={"help": "Hub id, local directory, or builtin:tiny-blip (a small random BLIP made offline)."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit."})
    training_mode: str = field(default="full", metadata={"help": "full | frozen_vision | lora"})
    torch_dtype: str = field(
        default="float32", metadata={"help": "dtype the weights are loaded in: float32 | bfloat16 | float16."}
    )
    attn_implementation: str = field(
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
            "help": "Hub id, imagefolder directory (metadata.jsonl/csv), save_to_disk directory, JSON/JSONL file "
            "of image paths, COCO Karpathy split file, or builtin:shapes."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on; default: 'validation' when the dataset has it, else a held-out part."
        },
    )
    test_split: str | None = field(
        default=None,
        metadata={"help": "Split scored once after training (e.g. Karpathy 'test'), as test_results.json."},
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Percent of training images held out for evaluation when there is no eval split."},
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
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation images."})
    max_caption_length: int = field(
        default=40, metadata={"help": "Max decoder tokens per training caption, [DEC] + prompt + caption + [SEP]."}
    )
    prompt: str = field(default="", metadata={"help": "Text every caption starts with, e.g. 'a picture of '."})
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad caption batches to a multiple of N tokens (8 suits tensor cores)."}
    )
    caption_preprocessing: str = field(
        default="none", metadata={"help": "none | blip (LAVIS blip_caption: lowercase, strip punctuation, 50 words)."}
    )
    image_augmentation: str = field(
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


@dataclass
class CaptionTrainingArguments(Seq2SeqTrainingArguments):
    generation_min_length: int = field(default=5, metadata={"help": "Min decoder length, [DEC] + prompt included."})
    generation_max_length: int | None = field(
        default=30, metadata={"help": "Max decoder length, [DEC] + prompt included (LAVIS semantics)."}
    )
    generation_num_beams: int | None = field(default=3, metadata={"help": "Beams for evaluation captions."})
    eval_metrics: list[str] = field(
        default_factory=lambda: list(DEFAULT_EVAL_METRICS),
        metadata={"help": "Subset of bleu, meteor, rouge_l, cider, spice."},
    )
    caption_grid_size: int = field(
        default=6, metadata={"help": "Images in each evaluation's caption grid PNG (0: no grid)."}
    )
    push_merged: bool = field(
        default=False, metadata={"help": "LoRA + push_to_hub: also push the merged model to <hub_model_id>-merged."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow a new run to replace an earlier run's files in output_dir."}
    )
    predict_with_generate: bool = field(default=True, metadata={"help": "Evaluation always generates captions."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator needs every field."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers, e.g. tensorboard."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace a NaN/inf step loss in the logged mean (the Trainer's default). Off: such a loss "
            "shows in the log, and no step waits for the GPU to check it (the check stalls the pipeline)."
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CaptionTrainingArguments)


@dataclass
class Recipe:
    model: ModelArguments
    data: DataArguments
    training: CaptionTrainingArguments
    path: str | None
    text: str
    explicit_keys: frozenset
    overrides: dict = field(default_factory=dict)

    def write_resolved(self, path: str) -> None:
        """Every key's effective value (token fields redacted by TrainingArguments.to_dict), for the record."""
        known = set(_field_types())
        values = {**dataclasses.asdict(self.model), **dataclasses.asdict(self.data), **self.training.to_dict()}
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump({k: v for k, v in values.items() if k in known}, handle, sort_keys=True)

    def as_yaml(self) -> str:
        """The recipe as written plus its command-line overrides; secrets (any *token* key) left out."""
        lines = [line for line in self.text.rstrip().splitlines() if "token" not in line.split(":")[0]]
        public = {k: v for k, v in self.overrides.items() if "token" not in k}
        if public:
            lines += ["", "# command-line overrides"] + yaml.safe_dump(public, sort_keys=False).rstrip().splitlines()
        return "\n".join(lines) + "\n"


def _field_types() -> dict[str, tuple[type, typing.Any]]:
    types_by_key = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                types_by_key[f.name] = (cls, hints.get(f.name, f.type))
    return types_by_key


def _union_members(annotation) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _coerce(value, annotation, where: str):
    """Coerce a YAML/CLI value to `annotation`; raise RecipeError naming `where` when it cannot."""
    members = _union_members(annotation)
    if value is None:
        if type(None) in members or annotation is typing.Any:
            return None
        raise RecipeError(f"{where}: null is not allowed here (expected {_type_name(annotation)})")
    for member in members:
        if member is type(None):
            continue
        try:
            return _coerce_one(value, member)
        except (TypeError, ValueError):
            continue
    raise RecipeError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def _coerce_one(value, annotation):
    origin = typing.get_origin(annotation)
    if annotation is typing.Any or annotation is object:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"true", "yes", "on", "1", "false", "no", "off", "0"}:
            return value.strip().lower() in {"true", "yes", "on", "1"}
        raise TypeError("not a boolean")
    if annotation is int:
        if isinstance(value, bool):
            raise TypeError("a boolean is not an integer")
        if isinstance(value, int):
            return value
        number = float(value) if isinstance(value, (str, float)) else None
        if number is not None and number.is_integer():
            return int(number)
        raise TypeError("not an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        raise TypeError("not a number")
    if isinstance(value, bool) and (annotation is str or _is_enum(annotation)):
        # YAML 1.1 reads an unquoted no/off as false: `eval_strategy: no` must still mean "no".
        value = "yes" if value else "no"
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError("not a string")
    if _is_enum(annotation):
        return annotation(value).value if not isinstance(value, annotation) else value.value
    if origin is list or annotation is list:
        (item_type,) = typing.get_args(annotation) or (typing.Any,)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        return [_coerce_one(item, item_type) for item in value]
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError("not a mapping")
        return value
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        return annotation(value)
    return value


def _is_enum(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, enum.Enum)


def _type_name(annotation) -> str:
    names = []
    for member in _union_members(annotation):
        if member is type(None):
            names.append("null")
        elif typing.get_origin(member) is not None:
            names.append(str(member))
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " or ".join(names)


def _unknown_key(key: str, known, where: str, flag: str = "") -> RecipeError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{flag}{close[0]}'?)" if close else ""
    return RecipeError(f"{where}: unknown key '{flag}{key}'{hint}")


def load_recipe_file(path: str) -> tuple[dict, str]:
    """Read a recipe with `yaml.safe_load`; Python tags and non-mapping documents are errors."""
    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        values = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        raise RecipeError(
            f"{path}: rejected YAML tag ({error.problem}); recipes are plain YAML, no Python tags"
        ) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values, got {type(values).__name__}")
    return values, text


def _parse_cli(argv: list[str], known: dict) -> dict:
    values = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise RecipeError(f"command line: expected --key value, got {token!r}")
        key, has_value, raw = token[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            raise _unknown_key(key, known, "command line", flag="--")
        _, annotation = known[key]
        if not has_value:
            next_is_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
            if next_is_value:
                raw = argv[index + 1]
                index += 1
            elif bool in _union_members(annotation):
                raw = "true"
            else:
                raise RecipeError(f"command line: --{key} needs a value")
        values[key] = _cli_value(raw, annotation)
        index += 1
    return values


def _cli_value(raw: str, annotation):
    members = [m for m in _union_members(annotation) if m is not type(None)]
    if raw in ("null", "None") and type(None) in _union_members(annotation):
        return None
    if str in members and not raw.lstrip().startswith(("[", "{")):
        return raw  # a prompt like "yes", a run name like 2024 or eval_strategy "no" stays text
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_recipe(argv: list[str]) -> Recipe:
    """`[RECIPE.yaml] [--key value ...]` -> Recipe. Command-line values override the file's."""
    argv = list(argv)
    path = None
    values: dict = {}
    text = ""
    known = _field_types()
    if argv and not argv[0].startswith("--"):
        path = argv.pop(0)
        values, text = load_recipe_file(path)
        for key in values:
            if key not in known:
                raise _unknown_key(key, known, path)
    where = {key: f"{path}: key '{key}'" for key in values}
    overrides = _parse_cli(argv, known)
    values.update(overrides)
    where.update({key: f"command line: --{key}" for key in overrides})

    kwargs: dict[type, dict] = {cls: {} for cls in ARGUMENT_CLASSES}
    for key, value in values.items():
        cls, annotation = known[key]
        kwargs[cls][key] = _coerce(value, annotation, where[key])
    explicit = frozenset(values)
    source = path or "command line"
    _use_cpu_when_no_accelerator(kwargs[CaptionTrainingArguments])
    model_args = _construct(ModelArguments, kwargs[ModelArguments], source)
    data_args = _construct(DataArguments, kwargs[DataArguments], source)
    training_args = _construct(CaptionTrainingArguments, kwargs[CaptionTrainingArguments], source)
    recipe = Recipe(model_args, data_args, training_args, path, text, explicit, overrides)
    validate_recipe(recipe)
    return recipe


def _use_cpu_when_no_accelerator(training_kwargs: dict) -> None:
    """No GPU/XPU/MPS here: run on the CPU explicitly (several processes become one gloo data-parallel job).

    Without use_cpu the Trainer finds no distributed backend for CPU ranks and silently trains every rank alone
    on its own copy of the model, and a GPU recipe's `bf16: true` is refused instead of running CPU autocast.
    """
    import torch

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return
    if torch.backends.mps.is_available():
        return
    training_kwargs.setdefault("use_cpu", True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        training_kwargs.setdefault("ddp_backend", "gloo")


def _construct(cls, kwargs: dict, source: str):
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{source}: {error}") from None


def validate_recipe(recipe: Recipe) -> None:
    """Combinations that cannot work fail here, before any model or data is loaded."""
    model, data, training = recipe.model, recipe.data, recipe.training
    source = recipe.path or "command line"

    def check(condition: bool, message: str) -> None:
        if not condition:
            raise RecipeError(f"{source}: {message}")

    check(
        model.training_mode in TRAINING_MODES,
        f"training_mode must be one of {TRAINING_MODES}, got {model.training_mode!r}",
    )
    if model.training_mode != "lora":
        stray = sorted(recipe.explicit_keys.intersection(LORA_KEYS))
        check(
            not stray,
            f"{', '.join(stray)} only apply to training_mode: lora (training_mode is {model.training_mode!r})",
        )
    check(
        model.attn_implementation in ("eager", "sdpa"),
        f"attn_implementation must be eager or sdpa, got {model.attn_implementation!r}",
    )
    check(
        model.torch_dtype in ("float32", "bfloat16", "float16"),
        f"torch_dtype must be float32, bfloat16 or float16, got {model.torch_dtype!r}",
    )
    check(model.lora_r > 0, f"lora_r must be positive, got {model.lora_r}")
    check(bool(model.lora_target_modules), "lora_target_modules must name at least one module")
    check(
        data.caption_preprocessing in ("none", "blip"),
        f"caption_preprocessing must be none or blip, got {data.caption_preprocessing!r}",
    )
    check(
        data.image_augmentation in ("none", "blip"),
        f"image_augmentation must be none or blip, got {data.image_augmentation!r}",
    )
    check(0 <= data.validation_split_percentage < 100, "validation_split_percentage must be in [0, 100)")
    check(data.max_caption_length >= 4, f"max_caption_length must be at least 4 tokens, got {data.max_caption_length}")
    unknown_metrics = [name for name in training.eval_metrics if name not in CAPTION_METRICS]
    check(not unknown_metrics, f"eval_metrics: unknown {unknown_metrics}; choose from {CAPTION_METRICS}")
    check(bool(training.eval_metrics), "eval_metrics must name at least one metric")
    if training.metric_for_best_model is not None:
        name = training.metric_for_best_model.removeprefix("eval_")
        scored = {"bleu_1", "bleu_2", "bleu_3", "bleu_4"} if "bleu" in training.eval_metrics else set()
        scored |= {m for m in training.eval_metrics if m != "bleu"}
        check(
            name in scored,
            f"metric_for_best_model {training.metric_for_best_model!r} is not computed; "
            f"eval_metrics give {sorted(scored)}",
        )
    check(
        not training.load_best_model_at_end or training.metric_for_best_model is not None,
        "load_best_model_at_end needs metric_for_best_model (e.g. cider); evaluation reports caption metrics, no loss",
    )
    check(
        not training.push_to_hub or bool(training.hub_model_id),
        "push_to_hub: true needs hub_model_id (e.g. user/blip-football)",
    )
    check(
        training.hub_strategy in ("end", "every_save"),
        f"hub_strategy {training.hub_strategy!r}: blip-recipes pushes the model at the end (end) or at every save "
        "(every_save); checkpoints with optimizer state are never uploaded",
    )
    check(
        not training.push_merged or (model.training_mode == "lora" and model.merge_lora),
        "push_merged needs training_mode: lora and merge_lora: true",
    )
    check(
        training.generation_max_length is None or training.generation_max_length > training.generation_min_length,
        "generation_max_length must exceed generation_min_length",
    )
    check(not (training.bf16 and training.fp16), "bf16 and fp16 are exclusive")
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
        sharded = training.fsdp or training.deepspeed
        sharded = sharded or _env_flag("ACCELERATE_USE_FSDP") or _env_flag("ACCELERATE_USE_DEEPSPEED")
        check(
            not sharded,
            "cache_vision_features runs on one device or under DDP, not with FSDP or DeepSpeed (they shard the "
            "encoder it runs before training)",
        )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def wants_evaluation(training: CaptionTrainingArguments) -> bool:
    return (
        training.eval_strategy != "no" or training.do_eval or training.eval_on_start or training.load_best_model_at_end
    )
