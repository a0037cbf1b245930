"""SDPA attention for BLIP computes the same function as transformers' eager attention (CPU fp32; CUDA bf16)."""

import copy

import pytest
import torch

from blip_recipes.adapt import BlipSdpaAttention, BlipTextSdpaSelfAttention, set_attention_implementation
from blip_recipes.builtin import build_tiny_tokenizer, tiny_blip_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def models(device, dtype=torch.float32, dropout=0.0):
    from transformers import BlipForConditionalGeneration

    config = tiny_blip_config(build_tiny_tokenizer())
    config.vision_config.attention_dropout = dropout
    torch.manual_seed(0)
    eager = BlipForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    sdpa = copy.deepcopy(eager)
    assert set_attention_implementation(sdpa, "sdpa") == 2 + 2 * 2  # vision layers + text self/cross per layer
    return eager, sdpa


def batch(device, dtype):
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 64, 64, device=device, dtype=dtype)
    input_ids = torch.randint(5, 60, (3, 9), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding, as the collator produces
    attention_mask[2, 4:] = 0
    return pixels, input_ids, attention_mask


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_gradients_match(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    eager, sdpa = models(device, dtype)
    pixels, input_ids, attention_mask = batch(device, dtype)
    outputs = []
    for model in (eager, sdpa):
        model.zero_grad()
        out = model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask)
        real = attention_mask.bool()
        out.logits[real].float().pow(2).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs.append((out.logits[real], grads))
    assert relative_error(outputs[1][0], outputs[0][0]) < tolerance
    assert outputs[0][1].keys() == outputs[1][1].keys()
    # Relative per tensor, except where the true gradient is ~0 (key biases: softmax ignores a per-row constant).
    scale = max(grad.float().norm().item() for grad in outputs[0][1].values())
    for name, grad in outputs[0][1].items():
        error = (outputs[1][1][name].float() - grad.float()).norm().item()
        assert error <= 10 * tolerance * max(grad.float().norm().item(), 1e-3 * scale), name


@pytest.mark.parametrize("device", DEVICES)
def test_beam_search_with_kv_cache_matches(device):
    from blip_recipes.evaluation import generate_caption_ids

    eager, sdpa = models(device)
    pixels, _, _ = batch(device, torch.float32)
    prefix = torch.full((3, 1), eager.config.text_config.bos_token_id, device=device)
    with torch.no_grad():
        expected = generate_caption_ids(eager, pixels, prefix, num_beams=3, max_length=12, min_length=4)
        got = generate_caption_ids(sdpa, pixels, prefix, num_beams=3, max_length=12, min_length=4)
        stock = eager.generate(pixel_values=pixels, num_beams=3, max_length=12, min_length=4)
    assert torch.equal(got, expected)
    assert torch.equal(stock[:, 1:], expected)  # our generation path == BlipForConditionalGeneration.generate


def test_switching_back_and_state_dict_unchanged():
    eager, sdpa = models("cpu")
    assert isinstance(sdpa.vision_model.encoder.layers[0].self_attn, BlipSdpaAttention)
    assert isinstance(sdpa.text_decoder.bert.encoder.layer[0].crossattention.self, BlipTextSdpaSelfAttention)
    assert list(sdpa.state_dict()) == list(eager.state_dict())
    set_attention_implementation(sdpa, "eager")
    assert type(sdpa.vision_model.encoder.layers[0].self_attn).__name__ == "BlipAttention"
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        set_attention_implementation(sdpa, "flash")


def test_attention_dropout_is_applied_in_training_only():
    _, sdpa = models("cpu", dropout=0.5)
    pixels, _, _ = batch("cpu", torch.float32)
    vision = sdpa.vision_model
    with torch.no_grad():
        a, b = vision(pixel_values=pixels).last_hidden_state, vision(pixel_values=pixels).last_hidden_state
        assert torch.equal(a, b)
        vision.train()
        c, d = vision(pixel_values=pixels).last_hidden_state, vision(pixel_values=pixels).last_hidden_state
        assert not torch.equal(c, d)


def test_generation_encodes_each_image_once_not_once_per_beam():
    from blip_recipes.evaluation import generate_caption_ids

    _, sdpa = models("cpu")
    encoded = []
    sdpa.vision_model.register_forward_hook(lambda module, args, output: encoded.append(len(output.last_hidden_state)))
    pixels, _, _ = batch("cpu", torch.float32)
    prefix = torch.full((3, 1), sdpa.config.text_config.bos_token_id)
    generate_caption_ids(sdpa, pixels, prefix, num_beams=4, max_length=8, min_length=2)
    assert encoded == [3]


@pytest.mark.parametrize(
    "search, rows_per_image",
    [
        ({"num_beams": 3}, 3),
        ({"num_beams": 3, "num_return_sequences": 3}, 3),
        ({"do_sample": True, "top_k": 0, "num_return_sequences": 4}, 4),
    ],
    ids=["beams", "all-beams", "samples"],
)
def test_generation_projects_and_caches_image_keys_once_for_all_beams_and_samples(search, rows_per_image):
    """decode() hands SDPA cross-attention each image once (SharedImages): keys/values are projected and cached per
    image, not per beam or sample, and the tokens are eager attention's (which gets one image copy per row)."""
    from blip_recipes.adapt import CACHE_ARGUMENT
    from blip_recipes.evaluation import decode

    eager, sdpa = models("cpu")
    pixels, _, _ = batch("cpu", torch.float32)
    prefix = torch.tensor([[eager.config.text_config.bos_token_id, 7, 9]]).repeat(3, 1)  # a 2-token prompt
    attention = sdpa.text_decoder.bert.encoder.layer[0].crossattention.self
    projected, caches = [], []
    attention.key.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[0]))
    attention.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(kwargs[CACHE_ARGUMENT]), with_kwargs=True
    )
    captions = []
    for model in (eager, sdpa):
        torch.manual_seed(3)
        with torch.no_grad():
            image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
            captions.append(decode(model, image_embeds, prefix, max_length=14, min_length=5, **search))
    assert captions[0].shape[0] == 3 * search.get("num_return_sequences", 1)
    assert torch.equal(captions[1], captions[0])
    assert projected == [3]  # the three images' keys, once, though 3 x rows_per_image decoder rows attend them
    assert caches[-1].cross_attention_cache.layers[attention.layer_idx].keys.shape[0] == 3
    assert caches[-1].self_attention_cache.layers[0].keys.shape[0] == 3 * rows_per_image
