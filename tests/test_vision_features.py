"""cache_vision_features: the frozen encoder runs once per training image, and training is otherwise unchanged."""

import os

import pytest
import torch
from transformers import set_seed

from blip_recipes.builders import build_trainer
from blip_recipes.config import RecipeError
from blip_recipes.model import unwrap_blip
from blip_recipes.recipe_parser import parse_recipe
from blip_recipes.vision_features import VisionFeaturesError, choose_store_device, encode_images
from tests.conftest import QUICK, REPO, encoder_calls

TWO_EPOCHS = ["--max_train_samples", "64", "--num_train_epochs", "2", "--warmup_steps", "0", "--do_eval", "true",
              "--max_eval_samples", "16"]  # fmt: skip


def train(mode, tmp_path, extra=()):
    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", f"{mode}.yaml"), "--output_dir", str(tmp_path),
                           *QUICK, *TWO_EPOCHS, *extra])  # fmt: skip
    set_seed(recipe.training.seed)  # as main() does: LoRA's initial weights come from the global RNG
    trainer = build_trainer(recipe)
    calls = encoder_calls(trainer.model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, sum(calls)


def test_cached_features_give_the_same_training_and_encode_each_image_once(tmp_path):
    plain, plain_losses, plain_encoded = train("frozen_vision", tmp_path / "plain",
                                               ["--cache_vision_features", "false"])  # fmt: skip
    cached, cached_losses, cached_encoded = train("frozen_vision", tmp_path / "cached",
                                                  ["--cache_vision_features", "true"])  # fmt: skip
    # 64 images x 3 captions, batch 16: 12 steps an epoch, 24 in all.
    assert cached.state.global_step == plain.state.global_step == 24
    assert plain_encoded == 2 * 64 * 3  # every caption of every epoch ran the encoder
    assert cached_encoded == 0  # training looked every image up; the 64 encodings happened in build_trainer
    store = unwrap_blip(cached.model).vision_model.vision_features
    assert store.shape[0] == 64
    assert cached_losses == pytest.approx(plain_losses, abs=1e-5)
    plain_state, cached_state = unwrap_blip(plain.model).state_dict(), unwrap_blip(cached.model).state_dict()
    assert plain_state.keys() == cached_state.keys()  # the store is not part of the model
    for name, tensor in plain_state.items():
        assert torch.allclose(tensor, cached_state[name], atol=1e-5), name

    # The store holds exactly what the encoder computes for each image.
    dataset = cached.train_dataset
    pixels = torch.stack([dataset.transform(dataset.split.table.load(dataset.split.records[i].row)) for i in (0, 63)])
    with torch.no_grad():
        direct = unwrap_blip(cached.model).vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(store[[0, 63]], direct, atol=1e-5, rtol=1e-5)

    # Evaluation still runs the encoder on pixels, and the saved model is a plain BLIP.
    metrics = cached.evaluate()
    assert metrics["eval_cider"] >= 0
    cached.save_model(str(tmp_path / "saved"))
    from transformers import BlipForConditionalGeneration

    reloaded = BlipForConditionalGeneration.from_pretrained(str(tmp_path / "saved"))
    assert not hasattr(reloaded.vision_model, "vision_features")


def test_text_only_lora_can_use_cached_features(tmp_path):
    trainer, losses, encoded = train("lora", tmp_path / "lora", ["--cache_vision_features", "true"])
    assert encoded == 0 and trainer.state.global_step == 24
    _, plain_losses, _ = train("lora", tmp_path / "plain", ["--cache_vision_features", "false"])
    assert losses == pytest.approx(plain_losses, abs=1e-5)


def test_vision_features_refuse_a_training_encoder(tmp_path):
    base = [os.path.join(REPO, "recipes", "shapes", "frozen_vision.yaml"), "--output_dir", str(tmp_path),
            "--cache_vision_features", "true"]  # fmt: skip
    with pytest.raises(RecipeError, match="cache_vision_features needs a vision encoder that does not train"):
        parse_recipe([*base, "--training_mode", "full"])
    with pytest.raises(RecipeError, match="image_augmentation must be none"):
        parse_recipe([*base, "--image_augmentation", "blip"])
    lora_on_vision = parse_recipe(
        [os.path.join(REPO, "recipes", "shapes", "lora.yaml"), "--output_dir", str(tmp_path),
         "--lora_target_modules", "query,key,value,qkv", *QUICK]
    )  # fmt: skip
    with pytest.raises(VisionFeaturesError, match="vision_model.encoder.layers.0.self_attn.qkv.lora_A"):
        build_trainer(lora_on_vision)


def test_vision_features_refuse_sharded_training(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="not with FSDP or DeepSpeed"):
        parse_recipe([os.path.join(REPO, "recipes", "shapes", "frozen_vision.yaml"), "--output_dir", str(tmp_path),
                      "--cache_vision_features", "true"])  # fmt: skip


def test_store_too_large_for_memory_is_an_error_before_training(monkeypatch):
    import blip_recipes.vision_features as vision_features

    monkeypatch.setattr(vision_features, "_available_host_memory", lambda: 2**30)
    assert choose_store_device(2**29, torch.device("cpu")).type == "cpu"
    with pytest.raises(VisionFeaturesError, match=r"need 1\.0 GiB, more than .* \(1\.0 GiB available on the host\)"):
        choose_store_device(2**30, torch.device("cpu"))


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, count, size):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index]}


def _encode_in_process(rank, world_size, model_dir, count, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        from blip_recipes.adapt import adapt_blip
        from blip_recipes.model import load_model

        model = load_model(model_dir)
        adapt_blip(model, image_mean=[0.5] * 3, image_std=[0.25] * 3)
        size = model.config.vision_config.image_size
        store = encode_images(model.vision_model, _Pixels(count, size), torch.device("cpu"), None, 3, 0, rank,
                              world_size)  # fmt: skip
        results[rank] = store
    finally:
        dist.destroy_process_group()


def test_processes_encode_disjoint_shards_and_all_get_the_whole_store(tiny_model_dir):
    """7 images over 2 processes (4 + 3, batches of 3): every process's store equals one process's."""
    import torch.multiprocessing as mp

    from blip_recipes.adapt import adapt_blip
    from blip_recipes.model import load_model

    count = 7
    model = load_model(tiny_model_dir)
    adapt_blip(model, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    size = model.config.vision_config.image_size
    alone = encode_images(model.vision_model, _Pixels(count, size), torch.device("cpu"), None, 3)
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_encode_in_process, args=(2, tiny_model_dir, count, 29531, results), nprocs=2,
                       start_method="spawn")  # fmt: skip
    for rank in (0, 1):
        torch.testing.assert_close(results[rank], alone, atol=1e-5, rtol=1e-5)
