"""Model loading and the one trainability builder: training_mode -> which parameters train.

Builders take flat arguments (no config objects), so tests and other scripts can call them directly.
"""

import json
import logging
import os
import types

import torch

from .attention import set_attention_implementation
from .builtin import is_builtin, resolve_builtin

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_name_or_path: str) -> str:
    return resolve_builtin(model_name_or_path) if is_builtin(model_name_or_path) else model_name_or_path


def is_lora_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def lora_base_model(adapter_path: str) -> str:
    with open(os.path.join(adapter_path, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle)["base_model_name_or_path"]


def load_processor(model_name_or_path: str, revision: str = "main"):
    """The BlipProcessor saved with a model (for a LoRA adapter: the adapter's own copy, else its base model's)."""
    from transformers import BlipProcessor

    path = resolve_model_path(model_name_or_path)
    if (
        os.path.isdir(path)
        and is_lora_adapter(path)
        and not os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    ):
        path = resolve_model_path(lora_base_model(path))
    return BlipProcessor.from_pretrained(path, revision=revision)


def load_model(
    model_name_or_path: str,
    revision: str = "main",
    torch_dtype: str = "float32",
    attn_implementation: str = "sdpa",
    lora_trainable: bool = False,
):
    """BlipForConditionalGeneration from a Hub id or directory; a LoRA adapter directory loads onto its base."""
    from transformers import BlipForConditionalGeneration

    path = resolve_model_path(model_name_or_path)
    dtype = DTYPES[torch_dtype]
    if os.path.isdir(path) and is_lora_adapter(path):
        from peft import PeftModel

        base = BlipForConditionalGeneration.from_pretrained(resolve_model_path(lora_base_model(path)), dtype=dtype)
        model = PeftModel.from_pretrained(base, path, is_trainable=lora_trainable)
    else:
        model = BlipForConditionalGeneration.from_pretrained(path, revision=revision, dtype=dtype)
    set_attention_implementation(model, attn_implementation)
    return model


def attach_pixel_normalizer(model, image_mean, image_std) -> None:
    """Let the vision encoder take uint8 pixels and normalise them itself, on its device; float input is untouched.

    Idempotent. Not saved with the model: a reloaded checkpoint takes the processor's float pixels as usual.
    """
    from .transforms import normalize_pixels

    vision = unwrap_blip(model).vision_model
    if getattr(vision, "_normalizes_uint8_pixels", False):
        return

    def normalize_uint8(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if pixels is None or pixels.dtype != torch.uint8:
            return None
        pixels = normalize_pixels(pixels, image_mean, image_std)
        if "pixel_values" in kwargs:
            return args, {**kwargs, "pixel_values": pixels}
        return (pixels, *args[1:]), kwargs

    vision.register_forward_pre_hook(normalize_uint8, with_kwargs=True)
    vision._normalizes_uint8_pixels = True


def freeze_module(module: torch.nn.Module) -> None:
    """No gradients, never in the optimizer, and dropout off for good (the Trainer calls model.train() each step)."""
    module.requires_grad_(False)
    module.eval()
    module.train = types.MethodType(_stay_in_eval_mode, module)


def _stay_in_eval_mode(self, mode: bool = True):
    return self


def apply_training_mode(
    model,
    training_mode: str,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | tuple[str, ...] = ("query", "key", "value"),
):
    """full: everything trains. frozen_vision: the vision encoder is frozen. lora: only LoRA adapters train."""
    if training_mode == "full":
        model.requires_grad_(True)
        return model
    if training_mode == "frozen_vision":
        model.requires_grad_(True)
        freeze_module(model.vision_model)
        return model
    if training_mode == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):  # resuming from an adapter loaded with lora_trainable=True
            return model
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(lora_target_modules)
        )
        try:
            return get_peft_model(model, config)
        except ValueError as error:
            raise ValueError(f"lora_target_modules {list(lora_target_modules)}: {error}") from None
    raise ValueError(f"training_mode must be full, frozen_vision or lora, got {training_mode!r}")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def unwrap_blip(model):
    """The BlipForConditionalGeneration inside DDP / torch.compile / PeftModel wrappers (LoRA layers stay in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def merge_lora(model):
    """A plain BlipForConditionalGeneration with the adapters folded into the weights (the PeftModel is unchanged)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
