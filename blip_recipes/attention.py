"""Fused attention for BLIP: transformers' BLIP computes attention with explicit matmul + softmax (eager only).

`set_attention_implementation(model, "sdpa")` swaps the class of every BLIP attention module for a subclass whose
forward calls `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU). The
weights, their names and the state dict are untouched, so checkpoints stay interchangeable; "eager" swaps back.
"""

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


class BlipSdpaAttention(BlipAttention):
    """Vision encoder self-attention (fused qkv projection, no mask)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        context = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
        )
        return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


class BlipTextSdpaSelfAttention(BlipTextSelfAttention):
    """Text decoder self- and cross-attention, with the same key/value cache handling as the eager module."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
        is_cross_attention = encoder_hidden_states is not None
        mask = encoder_attention_mask if is_cross_attention else attention_mask

        cache = past_key_values
        cross_cached = False
        if isinstance(past_key_values, EncoderDecoderCache):
            cross_cached = is_cross_attention and past_key_values.is_updated.get(self.layer_idx)
            cache = (
                past_key_values.cross_attention_cache if is_cross_attention else past_key_values.self_attention_cache
            )
        if cross_cached:
            key = cache.layers[self.layer_idx].keys
            value = cache.layers[self.layer_idx].values
        else:
            source = encoder_hidden_states if is_cross_attention else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.attention_head_size)
            key = self.key(source).view(kv_shape).transpose(1, 2)
            value = self.value(source).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
                if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                    past_key_values.is_updated[self.layer_idx] = True

        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=1.0 / math.sqrt(self.attention_head_size),
        )
        context = context.transpose(1, 2).reshape(*input_shape, self.all_head_size)
        return context, None


_SWAPS = {
    "sdpa": {BlipAttention: BlipSdpaAttention, BlipTextSelfAttention: BlipTextSdpaSelfAttention},
    "eager": {BlipSdpaAttention: BlipAttention, BlipTextSdpaSelfAttention: BlipTextSelfAttention},
}


def set_attention_implementation(model: torch.nn.Module, implementation: str) -> int:
    """Switch every BLIP attention module of `model` to `implementation`; returns how many were switched."""
    if implementation not in _SWAPS:
        raise ValueError(f"attn_implementation must be one of {sorted(_SWAPS)}, got {implementation!r}")
    swaps = _SWAPS[implementation]
    switched = 0
    for module in model.modules():
        target = swaps.get(type(module))
        if target is not None:
            module.__class__ = target
            switched += 1
    return switched
