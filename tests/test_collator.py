import numpy as np
import pytest
import torch
from PIL import Image

from blip_recipes.collator import CaptionCollator
from blip_recipes.transforms import ImageTransform, normalize_pixels


@pytest.fixture()
def collator(tiny_processor):
    return lambda prompt="", max_length=40: CaptionCollator(
        tiny_processor.tokenizer,
        bos_token_id=tiny_processor.tokenizer.bos_token_id,
        prompt=prompt,
        max_length=max_length,
    )


def features(captions, size=64):
    return [
        {"pixel_values": torch.randint(0, 256, (3, size, size), dtype=torch.uint8), "caption": c} for c in captions
    ]


def test_first_token_is_decoder_bos_not_cls(collator, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    batch = collator()(features(["a red circle on the left", "a blue square"]))
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert tokenizer.bos_token == "[DEC]"
    assert not (batch["input_ids"] == tokenizer.cls_token_id).any()


def test_padding_is_dynamic_and_masked(collator, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    batch = collator()(features(["a red circle on the left of the image", "a square"]))
    short = tokenizer("a square").input_ids  # [CLS] a square [SEP]
    long = tokenizer("a red circle on the left of the image").input_ids
    assert batch["input_ids"].shape[1] == len(long) < 512  # the longest caption, not the tokenizer maximum
    pads = batch["attention_mask"] == 0
    assert pads[1].sum() == len(long) - len(short)
    assert (batch["labels"][pads] == -100).all()
    assert (batch["input_ids"][pads] == tokenizer.pad_token_id).all()
    # Real tokens (after the bos) are learned, including the closing [SEP] that teaches the model to stop.
    assert batch["labels"][1, 1 : len(short)].tolist() == short[1:]
    assert batch["labels"][1, len(short) - 1] == tokenizer.sep_token_id
    assert batch["labels"][:, 0].tolist() == [-100, -100]


def test_prompt_tokens_are_masked(collator, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    prompt = "a picture of "
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert prompt_tokens == 3
    batch = collator(prompt=prompt)(features(["a red circle"]))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tokenizer.decode(ids[1 : 1 + prompt_tokens]) == "a picture of"
    assert (labels[: 1 + prompt_tokens] == -100).all()
    assert tokenizer.decode(labels[1 + prompt_tokens : -1]) == "a red circle"
    generation_prefix = collator(prompt=prompt).prompt_ids(2)
    assert generation_prefix.tolist() == [ids[: 1 + prompt_tokens].tolist()] * 2


def test_a_caption_cut_at_max_length_is_not_trained_to_end_there(collator, tiny_processor):
    """The tokenizer's truncation kept [SEP] after the cut, so a model trained on long captions learned to stop
    mid-sentence. A caption of exactly max_length tokens still ends with [SEP]; a longer one is its first max_length
    tokens, every one learned, and no [SEP]."""
    tokenizer = tiny_processor.tokenizer
    fits = "a red circle on the left"
    whole = tokenizer(fits).input_ids  # [CLS] ... [SEP]
    longer = fits + " of the image and a blue one too"
    limit = len(whole)
    batch = collator(max_length=limit)(features([fits, longer]))
    assert batch["input_ids"].shape[1] == limit and batch["attention_mask"].all()
    assert batch["labels"][0, 1:].tolist() == whole[1:] and whole[-1] == tokenizer.sep_token_id
    cut = tokenizer(longer, add_special_tokens=False).input_ids[: limit - 1]
    assert batch["labels"][1, 1:].tolist() == cut and tokenizer.sep_token_id not in batch["labels"][1].tolist()
    assert batch["input_ids"][1, 1:].tolist() == cut
    # Padded to a multiple of 8, the pad masked; the [DEC] bos first either way.
    padded = CaptionCollator(tokenizer, tokenizer.bos_token_id, max_length=limit, pad_to_multiple_of=8)(
        features([fits, "a square"])
    )
    assert padded["input_ids"].shape[1] == -(-limit // 8) * 8
    assert (padded["labels"][padded["attention_mask"] == 0] == -100).all()
    assert (padded["input_ids"][:, 0] == tokenizer.bos_token_id).all()


def test_eval_batches_carry_indices_and_no_text(collator):
    batch = collator()([{"pixel_values": torch.zeros(3, 64, 64, dtype=torch.uint8), "index": 5}])
    assert set(batch) == {"pixel_values", "index"} and batch["index"].tolist() == [5]


def test_pixels_match_the_blip_image_processor(tiny_processor, tiny_model_dir):
    from blip_recipes.adapt import adapt_blip
    from blip_recipes.model import load_model

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8))
    image_processor = tiny_processor.image_processor
    size = image_processor.size
    transform = ImageTransform(size["height"], size["width"], image_processor.resample)
    uint8 = transform(image).unsqueeze(0)
    assert uint8.dtype == torch.uint8
    ours = normalize_pixels(uint8, image_processor.image_mean, image_processor.image_std)
    reference = image_processor(images=image, return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (1, 3, size["height"], size["width"])
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-5)
    # The model normalises uint8 batches itself (on its device) and leaves float batches alone.
    model = load_model(tiny_model_dir).eval()
    adapt_blip(model, image_mean=image_processor.image_mean, image_std=image_processor.image_std)
    adapt_blip(model, image_mean=image_processor.image_mean, image_std=image_processor.image_std)  # idempotent
    with torch.no_grad():
        from_uint8 = model.vision_model(pixel_values=uint8).last_hidden_state
        from_float = model.vision_model(pixel_values=reference).last_hidden_state
        positional = model.vision_model(uint8).last_hidden_state
    torch.testing.assert_close(from_uint8, from_float, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(positional, from_uint8)


def test_caption_lengths_are_reported_and_what_the_limits_cut_is_said(tiny_processor, collator, caplog, tmp_path):
    """A caption longer than max_caption_length is cut (test_a_caption_cut_...), and generation stops at
    generation_max_length: neither said so. Lengths count what the collator makes: [DEC] + prompt + caption + [SEP]."""
    import logging
    import os

    from blip_recipes.builders import build_trainer, report_caption_lengths
    from blip_recipes.recipe_parser import parse_recipe
    from tests.conftest import QUICK, REPO

    captions = ["a red circle"] * 7 + ["a red circle on a blue square next to a green triangle"] * 3
    made = [int(row.sum()) for row in collator()(features(captions))["attention_mask"]]
    short, long = made[0], made[-1]
    with caplog.at_level(logging.INFO, logger="blip_recipes"):
        numbers = report_caption_lengths(captions, tiny_processor.tokenizer, "", long - 1, short + 1)
    assert numbers == {"median": short, "p95": long, "longest": long, "cut": 3, "too_long_to_generate": 3}
    assert f"training captions (10): {short} tokens median, {long} at the 95th percentile, {long} the longest" in (
        caplog.text
    )
    assert f"3 of 10 training captions (30.0%) have more than max_caption_length {long - 1} tokens" in caplog.text
    assert f"30.0% of 10 training captions have more than generation_max_length {short + 1} tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="blip_recipes"):  # within both limits, and a prompt counted
        report_caption_lengths(captions, tiny_processor.tokenizer, "a picture of ", long + 3, long + 3)
        assert "training captions (10)" in caplog.text and "WARNING" not in caplog.text
        # A run says it before training: two thirds of the shapes captions are longer than 8 tokens.
        recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--output_dir", str(tmp_path),
                               "--max_caption_length", "8", *QUICK])  # fmt: skip
        build_trainer(recipe)
    assert "960 of 1,440 training captions (66.7%) have more than max_caption_length 8 tokens" in caplog.text


def test_captions_that_already_begin_with_the_prompt_are_said(caplog):
    """Captions written "a picture of a dog" with prompt "a picture of " train "a picture of a picture of a dog", and
    the generated captions (scored without the prompt) miss it against references that keep it: said before
    training. Compared by words, so "an apple" does not begin with the prompt "a "."""
    import logging

    from blip_recipes.builders import report_prompt_in_captions

    with caplog.at_level(logging.WARNING, logger="blip_recipes"):
        assert report_prompt_in_captions(
            ["A picture of  a dog", "a picture of a cat", "two cats"], "a picture of "
        ) == (pytest.approx(2 / 3))
        assert "67% of the training captions begin with the prompt 'a picture of '" in caplog.text
        caplog.clear()
        assert report_prompt_in_captions(["an apple", "a dog", "two cats"], "a ") == pytest.approx(1 / 3)
        assert report_prompt_in_captions(["a dog"], "") == 0.0
        assert "WARNING" not in caplog.text
