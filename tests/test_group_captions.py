"""group_captions_by_image: each image encoded once for all its captions in a batch; the same function as encoding
it once per caption (loss and gradients), in every training mode, with either attention and on cached features."""

import os

import pytest
import torch
from transformers import set_seed

from blip_recipes.adapt import SharedImages, freeze_vision_encoder
from blip_recipes.builders import build_trainer
from blip_recipes.collator import CaptionCollator
from blip_recipes.config import RecipeError
from blip_recipes.data import IMAGE_POSITION, VISION_FEATURES_ROW, ImageGroupedSampler
from blip_recipes.model import apply_training_mode, load_model, load_processor, unwrap_blip
from blip_recipes.recipe_parser import parse_recipe
from blip_recipes.trainer import caption_loss
from tests.conftest import QUICK, REPO, encoder_calls

# Six caption rows of three images, in an order a batch can have (rows of one image need not be adjacent).
ROW_IMAGES = [0, 1, 0, 2, 2, 2]
# The collator's index when each image has the same number of consecutive rows: (images, captions per image).
UNIFORM = torch.tensor([[0, 0], [1, 1], [2, 2]])
LAYOUTS = {"any-order": torch.tensor(ROW_IMAGES), "uniform": UNIFORM}
CAPTIONS = ["a red square", "a blue circle on the left", "red square", "green", "a green triangle", "the triangle"]


def captions_batch(tokenizer, bos_token_id):
    return CaptionCollator(tokenizer, bos_token_id, pad_to_multiple_of=8)._captions([{"caption": c} for c in CAPTIONS])


def loss_and_gradients(model, inputs):
    model.zero_grad(set_to_none=True)
    labels = inputs.pop("labels")
    loss = caption_loss(model(**inputs), labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(plain, shared):
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert plain[1].keys() == shared[1].keys() and plain[1]
    for name, gradient in plain[1].items():
        torch.testing.assert_close(shared[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "mode,attention,features",
    [
        ("full", "sdpa", False),
        ("full", "eager", False),
        ("lora", "sdpa", False),
        ("frozen_vision", "sdpa", False),
        ("frozen_vision", "sdpa", True),
    ],  # fmt: skip
)
def test_shared_images_give_the_loss_and_gradients_of_one_image_per_caption(mode, attention, features, layout):
    torch.manual_seed(0)
    processor = load_processor("builtin:tiny-blip")
    model = load_model(
        "builtin:tiny-blip",
        attn_implementation=attention,
        lora_trainable=mode == "lora",
        image_mean=processor.image_processor.image_mean,
        image_std=processor.image_processor.image_std,
    )
    model = apply_training_mode(model, mode, 4, 8, 0.0, ["query", "key", "value", "qkv"], seed=0)
    model.train()
    text = captions_batch(processor.tokenizer, model.config.text_config.bos_token_id)
    vision = model.config.vision_config
    size, tokens = vision.image_size, (vision.image_size // vision.patch_size) ** 2 + 1
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    image_index = LAYOUTS[layout]
    if features:  # the store holds three images' encoder outputs; rows name them
        freeze_vision_encoder(model)
        unwrap_blip(model).vision_model.vision_features = torch.randn(3, tokens, vision.hidden_size)
        per_row, distinct = image_index.reshape(-1).clone(), torch.arange(3)
    else:
        per_row, distinct = images[image_index.reshape(-1)], images
    plain = loss_and_gradients(model, {"pixel_values": per_row, **text})
    shared = loss_and_gradients(model, {"pixel_values": distinct, "image_index": image_index, **text})
    assert_same(plain, shared)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_cross_attention_projects_each_image_once(layout):
    model = load_model("builtin:tiny-blip")
    attention = unwrap_blip(model).text_decoder.bert.encoder.layer[0].crossattention.self
    rows = []
    attention.key.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    states = torch.randn(3, 577, model.config.vision_config.hidden_size)
    hidden = torch.randn(6, 5, model.config.text_config.hidden_size)
    index = LAYOUTS[layout]
    shared = attention(hidden, encoder_hidden_states=SharedImages(states, index))[0]
    assert rows == [3]  # keys projected for the three images, not the six captions
    torch.testing.assert_close(shared, attention(hidden, encoder_hidden_states=states[index.reshape(-1)])[0])


def test_collator_puts_each_image_in_once_and_indexes_it_per_caption():
    processor = load_processor("builtin:tiny-blip")
    collator = CaptionCollator(processor.tokenizer, 1)
    pixels = [torch.full((3, 4, 4), position, dtype=torch.uint8) for position in (7, 3, 9)]
    items = [{"pixel_values": pixels[i], IMAGE_POSITION: (7, 3, 9)[i], "caption": c} for i, c in
             zip(ROW_IMAGES, CAPTIONS)]  # fmt: skip
    batch = collator(items)
    assert batch["image_index"].tolist() == ROW_IMAGES
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [7, 3, 9]
    plain = collator([{k: v for k, v in item.items() if k != IMAGE_POSITION} for item in items])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], plain[key])
    rows = collator([{VISION_FEATURES_ROW: (7, 3, 9)[i], IMAGE_POSITION: (7, 3, 9)[i], "caption": c}
                     for i, c in zip(ROW_IMAGES, CAPTIONS)])  # fmt: skip
    assert rows["pixel_values"].tolist() == [7, 3, 9] and rows["image_index"].tolist() == ROW_IMAGES
    # Each image's rows consecutive and equally many: the index says so by its shape.
    uniform = collator([{VISION_FEATURES_ROW: p, IMAGE_POSITION: p, "caption": "a"} for p in (4, 4, 1, 1, 6, 6)])
    assert uniform["pixel_values"].tolist() == [4, 1, 6] and torch.equal(uniform["image_index"], UNIFORM)


def test_sampler_keeps_an_images_captions_together_and_is_seeded_per_epoch():
    positions = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4]
    sampler = ImageGroupedSampler(positions, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(len(positions))) and len(sampler) == len(positions)
    runs = [positions[i] for i in first]
    assert [p for i, p in enumerate(runs) if i == 0 or runs[i - 1] != p] == sorted(set(runs), key=runs.index)
    assert len(set(runs)) == 5  # every image's items form one run
    assert list(ImageGroupedSampler(positions, seed=5)) == first
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1


def test_sampler_fills_whole_batches_with_equally_captioned_images():
    """COCO-like counts (most images 5 captions, a few 6 or 7), batch 20: 92 of the 95 five-caption images fill 23
    batches of 4 whole images each; the rest (47 items) fill 2 mixed batches and a last partial one, at the end."""
    counts = [5] * 95 + [6] * 3 + [7] * 2
    positions = [image for image, count in enumerate(counts) for _ in range(count)]
    for epoch in (0, 1):
        sampler = ImageGroupedSampler(positions, seed=3, batch_size=20)
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(positions)))
        batches = [[positions[i] for i in order[start : start + 20]] for start in range(0, len(order), 20)]
        whole = [b for b in batches if len(b) == 20 and all(b.count(image) == counts[image] == 5 for image in b)
                 and all(b[i] == b[i - 1] or i % 5 == 0 for i in range(1, 20))]  # fmt: skip
        assert len(batches) == 26 and len(whole) == 23
        assert len(batches[-1]) == 7  # the partial block is last: every other block is aligned with a batch


def train(tmp_path, mode, extra=(), strip=False):
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", f"{mode}.yaml"), "--output_dir", str(tmp_path),
                           *QUICK, "--max_train_samples", "40", "--num_train_epochs", "2", "--warmup_steps", "0",
                           "--group_captions_by_image", "true", *extra])  # fmt: skip
    set_seed(recipe.training.seed)
    trainer = build_trainer(recipe)
    if strip:  # the same batches, but every caption row brings its own copy of its image
        collator = trainer.data_collator
        trainer.data_collator = lambda items: collator([{k: v for k, v in i.items() if k != IMAGE_POSITION}
                                                        for i in items])  # fmt: skip
    calls = encoder_calls(trainer.model)
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], sum(calls)


@pytest.mark.parametrize("mode,batch", [("full", 16), ("lora", 16), ("full", 15)])
def test_grouped_training_equals_one_image_copy_per_caption(tmp_path, mode, batch):
    # LoRA on the vision encoder too, which then runs; dropout draws depend on how many images it runs on
    extra = ["--lora_dropout", "0", "--lora_target_modules", "query,key,value,qkv", "--cache_vision_features",
             "false"] if mode == "lora" else []  # fmt: skip
    extra += ["--per_device_train_batch_size", str(batch)]
    grouped, grouped_losses, grouped_encoded = train(tmp_path / "grouped", mode, extra)
    copies, copies_losses, copies_encoded = train(tmp_path / "copies", mode, extra, strip=True)
    # 40 images x 3 captions, batch 16 or 15: 8 steps an epoch (with 16, the last one short), 16 in all.
    assert grouped.state.global_step == copies.state.global_step == 16
    assert copies_encoded == 2 * 40 * 3
    if batch == 15:  # five whole images per batch: every image encoded once an epoch (the (5, 3) index layout)
        assert grouped_encoded == 2 * 40
    else:  # 5 or 6 images per batch, 40 images an epoch plus those split over two batches
        assert 2 * 40 < grouped_encoded <= 2 * (40 + 8)
    assert grouped_losses == pytest.approx(copies_losses, abs=1e-5)
    copies_state = unwrap_blip(copies.model).state_dict()
    for name, tensor in unwrap_blip(grouped.model).state_dict().items():
        torch.testing.assert_close(tensor, copies_state[name], atol=1e-5, rtol=1e-4, msg=name)


def test_grouped_training_on_cached_features(tmp_path):
    trainer, losses, encoded = train(tmp_path / "features", "frozen_vision", ["--cache_vision_features", "true"])
    _, copies_losses, _ = train(tmp_path / "copies", "frozen_vision", ["--cache_vision_features", "true"], strip=True)
    assert encoded == 0 and trainer.state.global_step == 16
    assert losses == pytest.approx(copies_losses, abs=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--training_objective", "scst"], "training_objective cross_entropy"),
        (["--streaming", "true", "--max_steps", "5"], "not with streaming"),
    ],
)
def test_group_captions_by_image_refusals(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--output_dir", str(tmp_path),
                      "--group_captions_by_image", "true", *extra])  # fmt: skip


def test_the_trainers_loader_reorders_images_each_epoch_and_repeats_an_epoch_exactly(tmp_path):
    """What an exact resume relies on: the Trainer sets the sampler's epoch, and an epoch's order is its seed's."""
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml"), "--output_dir", str(tmp_path),
                           *QUICK, "--max_train_samples", "40", "--group_captions_by_image", "true"])  # fmt: skip
    loader = build_trainer(recipe).get_train_dataloader()
    assert isinstance(loader.batch_sampler.sampler, ImageGroupedSampler)

    def first_batch(epoch):
        loader.set_epoch(epoch)
        return next(iter(loader))["input_ids"]

    epoch_0 = first_batch(0)
    assert not torch.equal(first_batch(1), epoch_0)
    assert torch.equal(first_batch(0), epoch_0)
