"""Model loading, the one trainability builder (training_mode -> which parameters train), decoding settings.

Builders take flat arguments (no config objects), so tests and other scripts can call them directly. Every change to
BLIP's own modules goes through adapt.py.
"""

import functools
import json
import logging
import os
import re

import torch

from .adapt import adapt_blip, freeze_vision_encoder, unwrap_blip
from .builtin import is_builtin, resolve_builtin
from .choices import GENERATION_DEFAULTS, TORCH_DTYPES

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in TORCH_DTYPES}  # "bfloat16" -> torch.bfloat16, ...
PROMPT_KEY = "caption_prompt"  # the training prompt, saved in generation_config.json beside beams and lengths

__all__ = ["unwrap_blip", "load_model", "load_processor", "apply_training_mode", "merge_lora"]


class ModelError(ValueError):
    """A model that cannot be found or used as it is; the message names it and what to do."""


_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")


def check_model_source(model_name_or_path: str, revision: str = "main") -> None:
    """Before anything loads: a local model directory that exists and holds a model, or a Hub id that can be had
    (cached, when offline). Errors name the model and say what to do."""
    name = model_name_or_path
    if revision not in (None, "main") and (is_builtin(name) or os.path.isdir(os.path.expanduser(name))):
        # from_pretrained ignores a revision for a local folder: the model loaded is whatever the folder holds now
        raise ModelError(
            f"model_name_or_path {name}: a local model has no revisions; the revision {revision!r} (model_revision, "
            "--revision) names a Hub model's branch, tag or commit: remove it"
        )
    if is_builtin(name):
        return
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ModelError(f"model_name_or_path {name}: a file, not a model directory or Hub id")
        if not _HUB_ID.match(name):
            raise ModelError(f"model_name_or_path {name}: no such directory")
        if hub_offline():
            if not in_hub_cache(name, revision):
                raise ModelError(
                    f"model_name_or_path {name}: no local directory of that name, and the Hub model is not in the "
                    f"local cache while offline (HF_HUB_OFFLINE is set); download it with network access first "
                    f"(`hf download {name}`) or give a local directory"
                )
        else:
            problem = hub_model_problem(name, revision)
            if problem:
                raise ModelError(f"model_name_or_path {name}: no local directory of that name, and {problem}")
        path = resolve_model_path(name, revision)
        if not os.path.isdir(path):  # a Hub model: from_pretrained fetches it
            return
    if not any(os.path.isfile(os.path.join(path, file)) for file in ("config.json", "adapter_config.json")):
        raise ModelError(f"model_name_or_path {name}: the directory holds no config.json or adapter_config.json")
    if is_lora_adapter(path):  # an adapter loads onto its base: a base moved, deleted or uncached fails here
        try:
            check_model_source(lora_base_model(path))
        except ModelError as error:
            raise ModelError(
                f"model_name_or_path {name} is a LoRA adapter whose base model cannot be loaded: {error}; point "
                "base_model_name_or_path in its adapter_config.json at where the base model is"
            ) from None


def in_hub_cache(repo_id: str, revision: str = "main") -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = [
        try_to_load_from_cache(repo_id, file, revision=revision) for file in ("config.json", "adapter_config.json")
    ]
    return any(isinstance(path, str) for path in found)


HUB_PROBE_TIMEOUT = 10  # seconds


def ask_hub(repo_id: str, revision: str | None = None, repo_type: str = "model") -> tuple[str, str]:
    """One request for a repo's info: (answer, reason), answer one of found, gated (the download says whether this
    login has access), missing (no such repo, or private), no revision, unreachable (no connection, a timeout, a
    server error: the transport's own errors vary with the huggingface_hub version, hence the broad except)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=HUB_PROBE_TIMEOUT)
    except GatedRepoError:  # a RepositoryNotFoundError too
        return "gated", ""
    except RepositoryNotFoundError:
        return "missing", ""
    except RevisionNotFoundError:
        return "no revision", ""
    except Exception as error:
        text = str(error).strip()
        return "unreachable", text.splitlines()[0][:200] if text else type(error).__name__
    return "found", ""


@functools.cache  # one request per repo and process, for the check and the loaders alike
def hub_model_answer(repo_id: str, revision: str = "main") -> tuple[str, str]:
    return ask_hub(repo_id, revision)


@functools.cache
def hub_model_problem(repo_id: str, revision: str = "main") -> str | None:
    """Why a name that is not a local directory cannot be had from the Hub (ask_hub); None when it can. Without it
    a mistyped local path, or a machine without network, waits minutes (huggingface_hub retries each file that
    cannot connect for ~25 s, and several files are asked for) for an error about the processor. A model in the
    local cache still loads when the Hub cannot be reached."""
    answer, reason = hub_model_answer(repo_id, revision)
    if answer == "missing":
        return "no Hub model of that name either (a private one needs a login: `hf auth login` or HF_TOKEN)"
    if answer == "no revision":
        return f"the Hub model has no revision {revision!r} (model_revision)"
    if answer != "unreachable":
        return None
    if in_hub_cache(repo_id, revision):
        logger.warning("asking the Hub for %s failed (%s): it loads from the local cache", repo_id, reason)
        return None
    return (
        f"asking the Hub for it failed ({reason}); check the path, or download the model where there is network "
        f"(`hf download {repo_id}`) and set HF_HUB_OFFLINE=1"
    )


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, as the environment or huggingface_hub (read at its import) says: no Hub calls at all."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def check_tokenizer(tokenizer, model, model_name_or_path: str) -> None:
    """The tokenizer belongs to the model: its vocabulary fits the text decoder's and the decoder's bos id is BLIP's
    [DEC]. A model directory without tokenizer files otherwise loads a 5-token tokenizer and trains on [UNK]s."""
    text_config = unwrap_blip(model).config.text_config
    size, vocabulary, bos = len(tokenizer), text_config.vocab_size, text_config.bos_token_id
    where = f"model_name_or_path {model_name_or_path}"
    if size > vocabulary:
        raise ModelError(
            f"{where}: the tokenizer has {size:,} tokens, more than the model's {vocabulary:,} embeddings"
        )
    if size < vocabulary // 2:
        raise ModelError(
            f"{where}: the tokenizer has {size:,} tokens but the model's text decoder has {vocabulary:,}: its "
            "tokenizer files (tokenizer.json / vocab.txt) are missing or belong to another model"
        )
    token = tokenizer.convert_ids_to_tokens(bos) if bos is not None and bos < size else None
    if token != "[DEC]":
        raise ModelError(f"{where}: the decoder's bos token id {bos} is {token!r} in the tokenizer, not BLIP's [DEC]")


def resolve_model_path(model_name_or_path: str, revision: str = "main") -> str:
    """What loaders read: a builtin's generated folder; a Hub repo holding a LoRA adapter downloaded whole into the
    Hub cache (an adapter repo is small: adapter, processor, decoding settings), so every adapter, local or pushed,
    loads the one way local ones do; anything else as given (a local folder, or a Hub model for from_pretrained)."""
    if is_builtin(model_name_or_path):
        return resolve_builtin(model_name_or_path)
    if os.path.isdir(model_name_or_path) or not _HUB_ID.match(model_name_or_path):
        return model_name_or_path
    return (
        snapshot_when_hub_unreachable(model_name_or_path, revision)
        or _hub_adapter_folder(model_name_or_path, revision)
        or model_name_or_path
    )


def snapshot_when_hub_unreachable(repo_id: str, revision: str = "main") -> str | None:
    """A cached Hub repo's snapshot folder when the Hub cannot be reached (HF_HUB_OFFLINE unset): loaded by id,
    huggingface_hub retried each file it checked for ~25 s (`caption` with a cached model took 5.5 minutes)."""
    if hub_offline() or hub_model_answer(repo_id, revision)[0] != "unreachable":
        return None
    return cached_snapshot(repo_id, revision)


def cached_snapshot(repo_id: str, revision: str | None = "main", repo_type: str = "model") -> str | None:
    """The Hub cache's snapshot folder of a repo at `revision`, without asking the Hub; None when not cached."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or a name the Hub would refuse
        return None


@functools.cache  # asked by each check and loader: one Hub request per repo and process
def _hub_adapter_folder(repo_id: str, revision: str) -> str | None:
    """The local snapshot of a Hub repo that holds adapter_config.json; None for a model repo, or when the repo
    cannot be reached (from_pretrained then says why: offline and uncached, gated, no such repo)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(repo_id, "adapter_config.json", revision=revision)
    except (EntryNotFoundError, OSError):  # no such file (a model repo), or no such repo / no network / not cached
        return None
    try:
        return snapshot_download(repo_id, revision=revision)
    except OSError as error:
        raise ModelError(f"model_name_or_path {repo_id} is a LoRA adapter on the Hub that could not be downloaded "
                         f"whole: {error}") from None  # fmt: skip


def is_lora_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def lora_base_model(adapter_path: str) -> str:
    path = os.path.join(adapter_path, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelError(f"{path}: not a readable adapter config ({error})") from None
    if not isinstance(base, str) or not base:
        raise ModelError(f"{path}: no base_model_name_or_path, so the adapter's base model is unknown")
    return base


def adapter_folder(model_name_or_path: str, revision: str = "main") -> str | None:
    """The local folder of a LoRA adapter (a folder, or a Hub repo downloaded); None for a model."""
    path = resolve_model_path(model_name_or_path, revision)
    return path if is_lora_adapter(path) else None


def adapter_base(model_name_or_path: str, revision: str = "main") -> str | None:
    """The base model of a LoRA adapter (folder or Hub repo); None for a model."""
    folder = adapter_folder(model_name_or_path, revision)
    return lora_base_model(folder) if folder else None


def check_continued_adapter(
    model_name_or_path: str, revision: str, lora_r: int, lora_alpha: float, lora_dropout: float, lora_target_modules
) -> None:
    """training_mode lora from a LoRA adapter trains that adapter further, so its shape is the adapter's: a recipe
    asking for other LoRA settings is refused (peft would load the adapter as saved and ignore them)."""
    folder = adapter_folder(model_name_or_path, revision)
    if folder is None:
        return
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    targets = saved.get("target_modules")
    wanted = {
        "lora_r": (lora_r, saved.get("r")),
        "lora_alpha": (lora_alpha, saved.get("lora_alpha")),
        "lora_dropout": (lora_dropout, saved.get("lora_dropout")),
        "lora_target_modules": (
            sorted(lora_target_modules),
            sorted(targets) if isinstance(targets, list) else targets,
        ),
    }
    differ = [f"{key}: recipe {mine}, adapter {theirs}" for key, (mine, theirs) in wanted.items() if mine != theirs]
    if differ:
        raise ModelError(
            f"model_name_or_path {model_name_or_path} is a LoRA adapter, which training_mode lora trains further "
            f"as it is, but the recipe asks for other LoRA settings ({'; '.join(differ)}). Set them to the "
            f"adapter's, or fold the adapter into its base first (blip-recipes merge-lora) to train a new one on top"
        )


def check_lora_targets(model_name_or_path: str, revision: str, lora_target_modules) -> None:
    """Every lora_target_modules entry names modules of this BLIP, known from its config before anything loads.
    peft refuses only a list of which nothing matches, once the model has loaded (after the data check), and
    silently drops an entry that matches nothing beside others that do (a typo such as 'querry')."""
    from accelerate import init_empty_weights
    from transformers import BlipConfig, BlipForConditionalGeneration

    base = adapter_base(model_name_or_path, revision)
    path = resolve_model_path(base) if base else resolve_model_path(model_name_or_path, revision)
    config = BlipConfig.from_pretrained(path, revision="main" if base else revision)
    with init_empty_weights():  # modules without memory: BLIP-large's names in well under a second
        modules = dict(BlipForConditionalGeneration(config).named_modules())
    missing = [target for target in lora_target_modules
               if not any(name == target or name.endswith(f".{target}") for name in modules)]  # fmt: skip
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items()
                         if isinstance(module, torch.nn.Linear)})  # fmt: skip
        raise ModelError(
            f"lora_target_modules {missing}: no module of this BLIP is named so (peft matches the end of a module "
            f"name); its linear layers end in: {', '.join(linear)}"
        )


def load_processor(model_name_or_path: str, revision: str = "main"):
    """The BlipProcessor saved with a model (for a LoRA adapter: the adapter's own copy, else its base model's)."""
    from transformers import BlipProcessor

    path = resolve_model_path(model_name_or_path, revision)
    if (
        os.path.isdir(path)
        and is_lora_adapter(path)
        and not os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    ):
        path = resolve_model_path(lora_base_model(path))
        revision = "main"  # the revision named the adapter, not its base
    try:
        return BlipProcessor.from_pretrained(path, revision=revision)
    except OSError as error:  # not found, unreachable Hub, gated repo: transformers says which in its message
        raise ModelError(f"model_name_or_path {model_name_or_path}: could not load its processor ({error})") from None


def load_model(
    model_name_or_path: str,
    revision: str = "main",
    torch_dtype: str = "float32",
    attn_implementation: str = "sdpa",
    lora_trainable: bool = False,
    image_mean=None,
    image_std=None,
    merge_adapter: bool = False,
):
    """BlipForConditionalGeneration from a Hub id or directory, adapted (adapt.py); a LoRA adapter (folder or Hub
    repo) loads onto its base, with the decoding settings saved beside the adapter. `merge_adapter`: an adapter is
    folded into its base, for training modes that train the model's own weights (peft would save only the adapter,
    losing every other change)."""
    from transformers import BlipForConditionalGeneration, GenerationConfig

    path = resolve_model_path(model_name_or_path, revision)
    dtype = DTYPES[torch_dtype]
    if os.path.isdir(path) and is_lora_adapter(path):
        from peft import PeftModel

        base_name = lora_base_model(path)
        base = BlipForConditionalGeneration.from_pretrained(resolve_model_path(base_name), dtype=dtype)
        name_by_hub_id(base, base_name)
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            base.generation_config = GenerationConfig.from_pretrained(path)
        model = PeftModel.from_pretrained(base, path, is_trainable=lora_trainable and not merge_adapter)
        if merge_adapter:
            model = model.merge_and_unload()
            logger.info("model_name_or_path %s is a LoRA adapter on %s: merged into it, so its own weights can train",
                        model_name_or_path, base_name)  # fmt: skip
    else:
        model = BlipForConditionalGeneration.from_pretrained(path, revision=revision, dtype=dtype)
        name_by_hub_id(model, model_name_or_path)
    return adapt_blip(model, attn_implementation, image_mean, image_std)


def name_by_hub_id(model, model_name_or_path: str) -> None:
    """A Hub model loaded from its cached snapshot (snapshot_when_hub_unreachable) is named by its Hub id, as a
    download names it: peft records the name as an adapter's base_model_name_or_path, which must not be a folder in
    this machine's cache. Any other name is the path from_pretrained was given and named it by already."""
    if _HUB_ID.match(model_name_or_path):  # a builtin (builtin:...) keeps its generated folder's name
        model.config._name_or_path = model.name_or_path = model_name_or_path  # peft reads the model's attribute


def set_decoding(model, num_beams: int, max_length: int, min_length: int, prompt: str) -> None:
    """Record how this model captions (recipe_decoding's settings) in its generation config, which every saved
    output carries (full, adapter, merged, pushed), so `caption`, `serve` and `evaluate` decode as the recipe
    evaluated."""
    config = unwrap_blip(model).generation_config
    config.num_beams, config.max_length, config.min_length = num_beams, max_length, min_length
    setattr(config, PROMPT_KEY, prompt)
    # A config marked as derived from the model config is rebuilt from known fields on load, dropping the prompt:
    # these settings are the recipe's own (tests/test_decoding_settings.py reloads them).
    config._from_model_config = False


RECIPE_DECODING_KEYS = {
    "num_beams": "generation_num_beams", "max_length": "generation_max_length",
    "min_length": "generation_min_length", "prompt": "prompt",
}  # fmt: skip


def recipe_decoding(num_beams: int | None, max_length: int | None, min_length: int, prompt: str) -> dict:
    """A recipe's decoding settings as evaluation uses them (null beams: greedy; null max_length: the default)."""
    return {
        "prompt": prompt,
        "num_beams": num_beams or 1,
        "max_length": max_length or GENERATION_DEFAULTS.max_length,
        "min_length": min_length,
    }


def text_positions(model) -> int:
    """How many token positions BLIP's text decoder has (512 for the published models)."""
    return unwrap_blip(model).config.text_config.max_position_embeddings


def check_decoding(
    tokenizer, decoding: dict, max_caption_length: int | None = None, max_positions: int | None = None,
    keys: dict = RECIPE_DECODING_KEYS,
) -> None:  # fmt: skip
    """Decoding settings {num_beams, max_length, min_length, prompt} (and the training captions' token budget) that
    cannot work with this tokenizer and text decoder fail here, naming the key (`keys`: how the caller spells them),
    instead of inside generate() at the first evaluation or as a training step whose labels are all masked.

    Lengths count the decoder prefix, [DEC] + the prompt's tokens, as generation does."""
    num_beams, max_length, min_length, prompt = (decoding[key] for key in ("num_beams", "max_length", "min_length",
                                                                           "prompt"))  # fmt: skip
    if num_beams < 1:
        raise ModelError(f"{keys['num_beams']} must be at least 1, got {num_beams}")
    if min_length < 0:
        raise ModelError(f"{keys['min_length']} must not be negative, got {min_length}")
    if max_length <= min_length:
        raise ModelError(f"{keys['max_length']} ({max_length}) must exceed {keys['min_length']} ({min_length})")
    prefix = 1 + (len(tokenizer(prompt, add_special_tokens=False).input_ids) if prompt else 0)
    prompt_words = f"[DEC] and the {keys['prompt']} {prompt!r} ({prefix - 1} tokens)" if prompt else "[DEC]"
    if max_length <= prefix:
        raise ModelError(
            f"{keys['max_length']} {max_length} leaves no room for a caption after {prompt_words}: lengths count "
            f"them; set it above {prefix}"
        )
    # A training caption is [DEC] + prompt + caption + [SEP], truncated to max_caption_length: without room for one
    # caption token and [SEP], every label is masked and the loss is 0/0.
    if max_caption_length is not None and max_caption_length < prefix + 2:
        raise ModelError(
            f"max_caption_length {max_caption_length} leaves no caption token to learn after {prompt_words}; "
            f"set it to at least {prefix + 2}"
        )
    if max_positions is not None:
        for key, value in ((keys["max_length"], max_length), ("max_caption_length", max_caption_length)):
            if value is not None and value > max_positions:
                raise ModelError(f"{key} {value} exceeds the text decoder's {max_positions} token positions")


def decoding_settings(model) -> dict:
    """{num_beams, max_length, min_length, prompt} saved with `model`; GENERATION_DEFAULTS where nothing was saved
    (a stock BLIP checkpoint's generation config says beams 1, max 20, min 0: not what this project trained for)."""
    config = unwrap_blip(model).generation_config
    if not hasattr(config, PROMPT_KEY):  # not saved by blip-recipes
        return {
            "num_beams": GENERATION_DEFAULTS.num_beams,
            "max_length": GENERATION_DEFAULTS.max_length,
            "min_length": GENERATION_DEFAULTS.min_length,
            "prompt": GENERATION_DEFAULTS.prompt,
        }
    return {
        "num_beams": config.num_beams or 1,
        "max_length": config.max_length or GENERATION_DEFAULTS.max_length,
        "min_length": config.min_length or 0,
        "prompt": getattr(config, PROMPT_KEY) or "",
    }


def apply_training_mode(
    model,
    training_mode: str,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | tuple[str, ...] = ("query", "key", "value"),
    seed: int | None = None,
):
    """full: everything trains. frozen_vision: the vision encoder is frozen. lora: only LoRA adapters train.

    `seed`: LoRA's initial adapter weights are drawn from it, right before they are made, so they do not depend on
    how many random numbers loading drew (DeepSpeed ZeRO-3 initialises the model under its own partitioning and
    draws differently from a one-process load: the same seed gave other adapters)."""
    if training_mode == "full":
        model.requires_grad_(True)
        return model
    if training_mode == "frozen_vision":
        model.requires_grad_(True)
        freeze_vision_encoder(model)
        return model
    if training_mode == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):  # resuming from an adapter loaded with lora_trainable=True
            return model
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(lora_target_modules)
        )
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as error:
            raise ValueError(f"lora_target_modules {list(lora_target_modules)}: {error}") from None
    raise ValueError(f"training_mode must be full, frozen_vision or lora, got {training_mode!r}")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total), counting tied weights once. Under DeepSpeed ZeRO-3 each process holds an empty
    placeholder (numel 0) per parameter; `ds_numel` is the full size."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(size for size, trains in sizes if trains), sum(size for size, _ in sizes)


def merge_lora(model):
    """A plain BlipForConditionalGeneration with the adapters folded into the weights (the PeftModel is unchanged)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def save_merged(adapter_model, processor, directory: str) -> None:
    """The merged model with the adapter's processor and decoding settings: a folder any BLIP loader reads."""
    from .checkpoints import share_as_umask_allows

    merge_lora(adapter_model).save_pretrained(directory)
    processor.save_pretrained(directory)
    share_as_umask_allows(directory)
