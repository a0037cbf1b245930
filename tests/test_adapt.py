"""adapt.py: every run-time change to BLIP is a checked class swap; a BLIP that lacks what a swap relies on fails at
load with a message naming it."""

import pytest
import torch
from transformers.models.blip import modeling_blip, modeling_blip_text

from blip_recipes.adapt import (
    AdaptationError,
    AdaptedVisionModel,
    adapt_blip,
    attach_vision_features,
    freeze_vision_encoder,
)
from blip_recipes.builtin import build_tiny_tokenizer, tiny_blip_config


def plain_blip():
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)
    return BlipForConditionalGeneration(tiny_blip_config(build_tiny_tokenizer())).eval()


def test_swaps_change_classes_only():
    model = plain_blip()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    adapt_blip(model, "sdpa", [0.5] * 3, [0.25] * 3)
    adapt_blip(model, "sdpa", [0.5] * 3, [0.25] * 3)  # idempotent
    assert type(model.vision_model) is AdaptedVisionModel
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)


def test_a_missing_attribute_fails_at_swap_time_naming_it():
    model = plain_blip()
    del model.text_decoder.bert.encoder.layer[0].crossattention.self.value
    with pytest.raises(AdaptationError, match=r"text_decoder\.bert\.encoder\.layer\.0\.crossattention\.self "
                                              r"\(BlipTextSelfAttention\) has no value"):  # fmt: skip
        adapt_blip(model, "sdpa")
    vision = plain_blip()
    del vision.vision_model.post_layernorm
    with pytest.raises(AdaptationError, match="has no post_layernorm, which AdaptedVisionModel relies on"):
        adapt_blip(vision)


def test_an_upstream_forward_argument_the_swap_would_drop_fails(monkeypatch):
    upstream = modeling_blip_text.BlipTextSelfAttention.forward

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, rotary_embeddings=None, **kwargs):  # fmt: skip
        return upstream(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache)

    monkeypatch.setattr(modeling_blip_text.BlipTextSelfAttention, "forward", forward)
    with pytest.raises(AdaptationError, match="BlipTextSelfAttention.forward takes rotary_embeddings, which "
                                              "BlipTextSdpaSelfAttention does not handle"):  # fmt: skip
        adapt_blip(plain_blip(), "sdpa")


def test_an_upstream_method_argument_the_swap_passes_must_still_exist(monkeypatch):
    upstream = modeling_blip.BlipForConditionalGeneration.save_pretrained

    def save_pretrained(self, save_directory, state_dict=None, **kwargs):  # an upstream without save_original_format
        return upstream(self, save_directory, state_dict=state_dict)

    monkeypatch.setattr(modeling_blip.BlipForConditionalGeneration, "save_pretrained", save_pretrained)
    with pytest.raises(AdaptationError, match="save_pretrained no longer takes save_original_format"):
        adapt_blip(plain_blip())


def test_a_gathered_state_dict_saves_without_tied_copies(tmp_path):
    """A state dict of copies (as DeepSpeed gathers it) saves the tensors a one-process save_pretrained writes."""
    from safetensors.torch import load_file

    model = adapt_blip(plain_blip())
    model.save_pretrained(tmp_path / "plain")
    copies = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert "text_decoder.cls.predictions.decoder.weight" in copies
    model.save_pretrained(tmp_path / "gathered", state_dict=copies)
    plain, gathered = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "gathered" / "model.safetensors"),
    )
    assert set(plain) == set(gathered) and all(torch.equal(plain[name], gathered[name]) for name in plain)


def test_a_renamed_upstream_class_fails():
    class RenamedAttention(modeling_blip.BlipAttention):  # what a BLIP whose vision attention class changed holds
        pass

    model = plain_blip()
    for layer in model.vision_model.encoder.layers:
        layer.self_attn.__class__ = RenamedAttention
    with pytest.raises(AdaptationError, match="no BlipAttention module in BlipForConditionalGeneration"):
        adapt_blip(model, "sdpa")


def test_frozen_encoder_stays_in_eval_mode_and_rows_need_a_store():
    model = plain_blip()
    adapt_blip(model)
    freeze_vision_encoder(model)
    model.train()
    assert not model.vision_model.training and model.text_decoder.training
    assert not any(parameter.requires_grad for parameter in model.vision_model.parameters())
    rows = torch.tensor([1, 0])
    with pytest.raises(RuntimeError, match="no store is attached"):
        model.vision_model(pixel_values=rows)
    store = torch.randn(3, 5, 4)
    attach_vision_features(model, store)
    assert torch.equal(model.vision_model(pixel_values=rows).last_hidden_state, store[[1, 0]])
    assert "vision_features" not in model.state_dict()
