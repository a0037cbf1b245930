"""Every run-time change to transformers' BLIP, in one place: class swaps, checked when they are applied.

transformers' BLIP is used as it is, except for what `adapt_blip` swaps in, always in this order:

0. `BlipForConditionalGeneration` and `BlipTextLMPredictionHead` -> subclasses whose `get_output_embeddings()` /
   `weight` name the tied LM head, so FSDP2 shards the word embeddings and the head (two tied parameters) as one unit;
   the top model also saves a standard checkpoint whatever engine gathered its weights (DeepSpeed included), and its
   forward takes `image_index` (group_captions_by_image): the batch's distinct images are encoded once and each
   caption row names its image (`SharedImages`; SDPA cross-attention also projects keys/values once per image).
   Generation (evaluation.decode) hands the decoder SharedImages too: beams and samples share their image's
   cross-attention keys/values and cache.
1. `BlipVisionModel` -> `AdaptedVisionModel`, which adds three things, each off until set:
   - uint8 pixels are normalised on the encoder's own device (`image_mean`/`image_std`; float pixels pass untouched),
     so data loaders ship a quarter of the bytes and do no float work;
   - vision features: given a 1-D integer tensor in place of an image batch (`is_feature_rows`), the encoder returns
     those rows of an attached store of its own earlier outputs (`attach_vision_features`, vision_features.py)
     instead of running; pixels still run the encoder;
   - frozen: `freeze_vision_encoder` keeps it in eval mode (dropout off) whatever `train()` the Trainer calls.
2. Attention (`attn_implementation`): `sdpa` swaps `BlipAttention` (vision) and `BlipTextSelfAttention` (text self-
   and cross-attention) for subclasses that call `scaled_dot_product_attention`; `eager` swaps them back.

A swap changes only a module's class: weights, parameter names and state dicts stay as they are, so checkpoints stay
interchangeable, DDP / torch.compile / CUDA graphs see ordinary modules, and a saved model loads in stock
transformers. Each swap first checks that the upstream class still has every attribute and forward argument its
replacement relies on, and raises `AdaptationError` naming what is missing: a transformers upgrade that changes
BLIP fails at load, not silently at step 1000. setup.cfg bounds transformers to the versions tested here.
"""

import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.blip import modeling_blip
from transformers.models.blip.modeling_blip import BlipAttention, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMPredictionHead, BlipTextSelfAttention

from .choices import ATTN_IMPLEMENTATIONS


class AdaptationError(RuntimeError):
    """The installed transformers' BLIP no longer has what an adaptation relies on."""


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


def record_upstream_base_class(adapter_dir: str) -> None:
    """peft writes the base model's class into adapter_config.json (`auto_mapping`) for AutoPeftModel to import. Ours
    is this module's same-named subclass, and stock peft imports only from transformers, so anyone without
    blip-recipes could not load a pushed adapter that way. The adapter fits transformers' own class: record that."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    mapping = config.get("auto_mapping")
    if not isinstance(mapping, dict) or mapping.get("parent_library") != __name__:
        return
    upstream = getattr(modeling_blip, mapping.get("base_model_class", ""), None)
    if upstream is None:
        raise AdaptationError(f"{path}: auto_mapping names {mapping.get('base_model_class')!r}, which "
                              f"transformers' BLIP does not have")  # fmt: skip
    config["auto_mapping"] = {**mapping, "parent_library": upstream.__module__}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def is_feature_rows(pixel_values: torch.Tensor) -> bool:
    """The contract between the collator and AdaptedVisionModel: rows of the vision-features store travel where
    pixel_values go (so the Trainer, DDP and torch.compile see the model's usual signature), as a 1-D integer tensor;
    images are always 4-D."""
    return pixel_values.dim() == 1 and pixel_values.dtype == torch.long


class AdaptedVisionModel(BlipVisionModel):
    """BLIP's vision encoder plus uint8 normalisation, vision-features lookup and a frozen mode (module docstring)."""

    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    vision_features: torch.Tensor | None = None  # a plain attribute: never saved, moved by .to() or broadcast by DDP
    frozen: bool = False

    def forward(self, pixel_values: torch.Tensor | None = None, *args, **kwargs):
        if pixel_values is not None and is_feature_rows(pixel_values):
            if self.vision_features is None:
                raise RuntimeError("the vision encoder got vision-feature rows but no store is attached")
            return BaseModelOutputWithPooling(last_hidden_state=_look_up(self.vision_features, pixel_values))
        if pixel_values is not None and pixel_values.dtype == torch.uint8 and self.image_mean is not None:
            from .transforms import normalize_pixels

            pixel_values = normalize_pixels(pixel_values, self.image_mean, self.image_std)
        return super().forward(pixel_values, *args, **kwargs)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)


@torch.compiler.disable
def _look_up(store: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if store.device == rows.device:
        return store.index_select(0, rows)
    return store.index_select(0, rows.to(store.device)).to(rows.device, non_blocking=True)


@dataclass(frozen=True)
class SharedImages:
    """The encoder's output for a batch's distinct images and, per caption row, which of them it describes.

    Passed where the text decoder takes `encoder_hidden_states`; upstream's text stack only hands it on to the
    cross-attention (BlipTextSdpaSelfAttention), which projects keys and values once per image. Gradients of all
    captions of an image add up in its one encoder pass: the same function as encoding the image once per caption, at
    a fraction of the encoder's and the cross-attention projections' work.

    `image_index` is (caption rows,): row i describes states[image_index[i]]; or (images, captions per image) when
    each image has that many consecutive rows (the collator says so when a batch is laid out that way; generation's
    beams and samples always are): then the cross-attention attends each image's rows as one longer query sequence,
    copying no keys or values, and a key/value cache keeps them once per image.
    """

    states: torch.Tensor  # (images, image tokens, width)
    image_index: torch.Tensor  # (caption rows,) or (images, captions per image), long

    @staticmethod
    def consecutive(images: int, per_image: int, device) -> torch.Tensor:
        """The (images, per_image) index of `per_image` consecutive rows per image."""
        return torch.arange(images, device=device).repeat_interleave(per_image).view(images, per_image)

    @property
    def captions_per_image(self) -> int | None:
        return self.image_index.shape[1] if self.image_index.dim() == 2 else None

    def rows(self, per_image: torch.Tensor) -> torch.Tensor:
        """(images, ...) -> (caption rows, ...), as a product with a one-hot matrix: its backward sums each image's
        rows with another matrix product (index_select's backward is an atomic scatter-add, slow in bf16)."""
        index, images = self.image_index.reshape(-1), per_image.shape[0]
        one_hot = (index[:, None] == torch.arange(images, device=index.device)).to(per_image.dtype)
        return (one_hot @ per_image.reshape(images, -1)).view(index.shape[0], *per_image.shape[1:])


class BlipForConditionalGeneration(modeling_blip.BlipForConditionalGeneration):
    """BLIP whose get_output_embeddings() names the text decoder's prediction head (upstream's returns None).

    The head's decoder weight is the word embedding matrix and its decoder bias is the head's own `bias`: two tied
    parameters. Code that looks for tied input/output embeddings (accelerate's FSDP2) then keeps the embeddings and
    the whole head in one shard unit instead of failing with "shared with a parameter already managed by another
    FSDP group". Same class name as upstream: save_pretrained records it in config.architectures.
    """

    def get_output_embeddings(self):
        return self.text_decoder.cls.predictions

    def forward(self, pixel_values, input_ids=None, attention_mask=None, labels=None, image_index=None, **kwargs):
        """Upstream's forward, or with `image_index` (the collator's, group_captions_by_image) one encoder pass over
        the batch's distinct images (`pixel_values` holds each once) shared by the caption rows that name them."""
        if image_index is None:
            return super().forward(
                pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        encoder_hidden_states = SharedImages(image_embeds, image_index)
        if not takes_shared_images(self):  # eager: upstream wants a row per caption
            encoder_hidden_states = encoder_hidden_states.rows(image_embeds)
        outputs = self.text_decoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
            labels=labels, reduction="mean", use_cache=False, **kwargs,
        )  # fmt: skip
        return modeling_blip.BlipForConditionalGenerationModelOutput(
            loss=outputs.loss, logits=outputs.logits, image_embeds=image_embeds, last_hidden_state=image_embeds
        )

    def save_pretrained(self, save_directory, *args, state_dict=None, save_original_format=False, **kwargs):
        """The checkpoint a one-process run writes, whoever gathered the weights (found under DeepSpeed):

        - tied duplicates dropped: upstream recognises tied weights by shared storage, and a gathered state dict
          (ZeRO-2) holds copies, so the LM head's weight and bias were written beside the embeddings they are;
        - current parameter names: upstream renames weights back to the format they were loaded from, and its
          ZeRO-3 loader records every legacy renaming as used, so LayerNorm `weight`/`bias` were saved as
          `gamma`/`beta`. Loading accepts both formats; stock names are what other tools expect.
        """
        if state_dict is not None:
            tied = self.all_tied_weights_keys  # {tied name: the parameter it is}
            state_dict = {
                name: tensor for name, tensor in state_dict.items() if not (name in tied and tied[name] in state_dict)
            }
        return super().save_pretrained(
            save_directory, *args, state_dict=state_dict, save_original_format=save_original_format, **kwargs
        )


class TiedPredictionHead(BlipTextLMPredictionHead):
    """The prediction head, exposing its decoder's (tied) weight as `weight`, as an output embedding has one."""

    @property
    def weight(self):
        return self.decoder.weight


class BlipSdpaAttention(BlipAttention):
    """Vision encoder self-attention (fused qkv projection, no mask) through scaled_dot_product_attention."""

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        context = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
        )
        return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


class BlipTextSdpaSelfAttention(BlipTextSelfAttention):
    """Text decoder self- and cross-attention, with the same key/value cache handling as the eager module.

    transformers renamed the cache argument from `past_key_values` to `cache` (5.2x); both are taken.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
        is_cross_attention = encoder_hidden_states is not None
        mask = encoder_attention_mask if is_cross_attention else attention_mask
        shared = encoder_hidden_states if isinstance(encoder_hidden_states, SharedImages) else None
        # Each image's caption rows consecutive and equally many, no mask: its rows' queries attend its keys as one.
        # With a cache (generation: rows are beams or samples) the cache keeps one image's keys/values once too.
        fold = shared is not None and shared.captions_per_image is not None and mask is None
        key, value = self._keys_and_values(hidden_states, encoder_hidden_states, cache, per_row=not fold)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        if fold:
            rows, heads, length, size = query.shape
            images, per_image = shared.image_index.shape
            query = query.view(images, per_image, heads, length, size).transpose(1, 2)
            query = query.reshape(images, heads, per_image * length, size)
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=1.0 / math.sqrt(self.attention_head_size),
        )
        if fold:
            context = context.view(images, heads, per_image, length, size).transpose(1, 2)
        context = context.transpose(-3, -2).reshape(*input_shape, self.all_head_size)
        return context, None

    def _keys_and_values(self, hidden_states, encoder_hidden_states, cache, per_row: bool = True):
        """Keys and values, from the cache where it has them. SharedImages: projected once per image, then one row
        per caption (`per_row`) or per image."""
        is_cross_attention = encoder_hidden_states is not None
        layer_cache, cross_cached = cache, False
        if isinstance(cache, EncoderDecoderCache):
            cross_cached = is_cross_attention and cache.is_updated.get(self.layer_idx)
            layer_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        if cross_cached:
            return layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
        source = encoder_hidden_states if is_cross_attention else hidden_states
        shared = source if isinstance(source, SharedImages) else None
        if shared is not None:
            source = shared.states
        key, value = self.key(source), self.value(source)
        if shared is not None and per_row:
            key, value = shared.rows(key), shared.rows(value)
        kv_shape = (*key.shape[:-1], -1, self.attention_head_size)
        key, value = key.view(kv_shape).transpose(1, 2), value.view(kv_shape).transpose(1, 2)
        if layer_cache is not None:
            key, value = layer_cache.update(key, value, self.layer_idx)
            if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        return key, value


def takes_shared_images(blip) -> bool:
    """Whether BLIP's text cross-attention takes SharedImages: the SDPA module does; eager wants a row per caption."""
    return isinstance(blip.text_decoder.bert.encoder.layer[0].crossattention.self, BlipTextSdpaSelfAttention)


@dataclass(frozen=True)
class Swap:
    """upstream -> replacement, valid while upstream instances have `attributes` and upstream's forward takes no
    named argument outside `forward_arguments` (an argument the replacement would silently drop)."""

    upstream: type
    replacement: type
    attributes: tuple[str, ...]
    forward_arguments: tuple[str, ...] | None  # None: the replacement keeps upstream's forward
    # {method: named arguments the replacement passes to upstream's method}, which upstream must still take
    passes: tuple[tuple[str, tuple[str, ...]], ...] = ()


HEAD_SWAPS = (
    Swap(
        modeling_blip.BlipForConditionalGeneration, BlipForConditionalGeneration,
        attributes=("text_decoder", "vision_model", "get_input_embeddings", "all_tied_weights_keys"),
        forward_arguments=None,
        passes=(
            ("save_pretrained", ("state_dict", "save_original_format")),
            ("forward", ("pixel_values", "input_ids", "attention_mask", "labels")),
        ),
    ),
    Swap(BlipTextLMPredictionHead, TiedPredictionHead, attributes=("decoder", "bias", "transform"),
         forward_arguments=None),
)  # fmt: skip
VISION_SWAP = Swap(
    BlipVisionModel, AdaptedVisionModel,
    attributes=("config", "embeddings", "encoder", "post_layernorm"),
    forward_arguments=("pixel_values", "interpolate_pos_encoding"),
)  # fmt: skip
ATTENTION_SWAPS = (
    Swap(
        BlipAttention, BlipSdpaAttention,
        attributes=("qkv", "projection", "num_heads", "head_dim", "scale", "dropout"),
        forward_arguments=("hidden_states",),
    ),
    Swap(
        BlipTextSelfAttention, BlipTextSdpaSelfAttention,
        attributes=("query", "key", "value", "attention_head_size", "all_head_size", "dropout", "layer_idx"),
        forward_arguments=(
            "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "cache",
            "past_key_values",
        ),
    ),
)  # fmt: skip


def _check(swap: Swap, module: torch.nn.Module, where: str) -> None:
    version = f"transformers {transformers.__version__}"
    missing = [name for name in swap.attributes if not hasattr(module, name)]
    if missing:
        raise AdaptationError(
            f"{version}: {where} ({swap.upstream.__name__}) has no {', '.join(missing)}, which "
            f"{swap.replacement.__name__} relies on; install the transformers version in setup.cfg's range"
        )
    for method, arguments in swap.passes:
        taken = inspect.signature(getattr(swap.upstream, method)).parameters
        gone = [name for name in arguments if name not in taken]
        if gone:
            raise AdaptationError(
                f"{version}: {swap.upstream.__name__}.{method} no longer takes {', '.join(gone)}, which "
                f"{swap.replacement.__name__} passes; install the transformers version in setup.cfg's range"
            )
    if swap.forward_arguments is None:
        return
    parameters = inspect.signature(swap.upstream.forward).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
    unhandled = sorted(named - set(swap.forward_arguments))
    if unhandled:
        raise AdaptationError(
            f"{version}: {swap.upstream.__name__}.forward takes {', '.join(unhandled)}, which "
            f"{swap.replacement.__name__} does not handle; install the transformers version in setup.cfg's range"
        )


def _apply(model: torch.nn.Module, swaps, reverse: bool = False) -> int:
    """Swap classes of `model`'s modules; modules already swapped count as done. Returns how many are swapped."""
    done = 0
    for swap in swaps:
        source, target = (swap.replacement, swap.upstream) if reverse else (swap.upstream, swap.replacement)
        found = 0
        for name, module in model.named_modules():
            if type(module) is target:
                found += 1
            elif type(module) is source:
                if not reverse:
                    _check(swap, module, name or type(model).__name__)
                module.__class__ = target
                found += 1
        if found == 0:
            raise AdaptationError(
                f"transformers {transformers.__version__}: no {swap.upstream.__name__} module in "
                f"{type(model).__name__}; BLIP's modules were renamed, install the version in setup.cfg's range"
            )
        done += found
    return done


def set_attention_implementation(model: torch.nn.Module, implementation: str) -> int:
    """Switch every BLIP attention module of `model` to `implementation`; returns how many modules it covers."""
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {implementation!r}")
    return _apply(model, ATTENTION_SWAPS, reverse=implementation == "eager")


def adapted_vision_model(model) -> AdaptedVisionModel:
    """`model`'s vision encoder, swapped to AdaptedVisionModel (checked) if it is not already."""
    vision = unwrap_blip(model).vision_model
    _apply(vision, [VISION_SWAP])
    return vision


def adapt_blip(model, attn_implementation: str = "sdpa", image_mean=None, image_std=None):
    """Apply every swap in order (model and prediction head, vision encoder, attention). Idempotent; returns `model`.

    `image_mean`/`image_std` (the processor's) turn on uint8 pixel normalisation.
    """
    _apply(unwrap_blip(model), HEAD_SWAPS)
    vision = adapted_vision_model(model)
    if image_mean is not None:
        vision.image_mean, vision.image_std = tuple(image_mean), tuple(image_std)
    set_attention_implementation(model, attn_implementation)
    return model


def freeze_vision_encoder(model) -> None:
    """No gradients, never in the optimizer, and dropout off for good (the Trainer calls model.train() each step)."""
    vision = adapted_vision_model(model)
    vision.requires_grad_(False)
    vision.frozen = True
    vision.eval()


def attach_vision_features(model, store: torch.Tensor) -> None:
    """From now on the vision encoder answers rows of `store` (its own outputs, in dataset order)."""
    adapted_vision_model(model).vision_features = store


def detach_vision_features(model) -> None:
    """Drop the store (after training: evaluation runs the encoder on pixels, and the memory is freed)."""
    vision = unwrap_blip(model).vision_model
    if isinstance(vision, AdaptedVisionModel):
        vision.vision_features = None


# What BLIP's text decoder calls its key/value cache argument in the installed transformers (renamed in 5.2x).
_TEXT_ATTENTION_ARGUMENTS = inspect.signature(BlipTextSelfAttention.forward).parameters
CACHE_ARGUMENT = "cache" if "cache" in _TEXT_ATTENTION_ARGUMENTS else "past_key_values"
