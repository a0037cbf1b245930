"""Self-critical training (scst.py, rewards.py) and the weight average (ema.py)."""

import json
import os
import random
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from blip_recipes.builders import build_trainer
from blip_recipes.metrics import ptb_tokenize
from blip_recipes.model import unwrap_blip
from blip_recipes.recipe_parser import parse_recipe
from blip_recipes.rewards import CiderD, bleu4, simple_tokenize
from blip_recipes.scst import baseline_rewards, caption_mask, sequence_log_probs
from tests.conftest import QUICK, REPO, assert_readable_by_everyone, encoder_calls, read_json, run_cli


@pytest.fixture(scope="module")
def shapes_references(shapes_dir):
    with open(os.path.join(shapes_dir, "train", "metadata.jsonl"), encoding="utf-8") as handle:
        references = [json.loads(line)["text"] for line in handle][:120]
    tokens = iter(ptb_tokenize([caption for captions in references for caption in captions]))
    return [[next(tokens) for _ in captions] for captions in references]


def test_cider_d_and_bleu_4_equal_pycocoevalcap(shapes_references):
    """The same corpus (PTB-tokenised shapes references; candidates: other images' references, so scores range from
    0 to high) scored by pycocoevalcap and in process: every image's CIDEr-D and BLEU-4 to 1e-6."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    count = len(shapes_references)
    candidates = {i: [rng.choice(shapes_references[rng.randrange(count)])] for i in range(count)}
    candidates[0] = ["a"]  # one word: no bigram at all
    references = dict(enumerate(shapes_references))
    _, expected_cider = Cider().compute_score(references, candidates)
    _, expected_bleu = Bleu(4).compute_score(references, candidates, verbose=0)
    cider = CiderD(shapes_references)
    for image in range(count):
        assert cider.score(candidates[image][0], image) == pytest.approx(expected_cider[image], abs=1e-6)
        assert bleu4(candidates[image][0], shapes_references[image]) == pytest.approx(
            expected_bleu[3][image], abs=1e-6
        )
    assert len({round(score, 3) for score in expected_cider}) > 20  # a spread of scores, not one value


def test_sampled_captions_are_tokenised_as_the_ptb_tokenizer_does():
    texts = ["a dog, running on the grass.", "there is a cat's toy - on the left!", "two  birds ; in (the) sky",
             "it doesn't fit... they're here -- a [red] {box}"]  # fmt: skip
    assert [simple_tokenize(text) for text in texts] == ptb_tokenize(texts)


def test_baselines():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    greedy = torch.tensor([2.5, 1.0])
    assert torch.equal(baseline_rewards(rewards, greedy, "greedy"), torch.tensor([[2.5] * 3, [1.0] * 3]))
    # Each sample's baseline is the mean of the image's other samples.
    assert torch.equal(baseline_rewards(rewards, None, "mean"), torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))


def test_caption_mask_keeps_tokens_up_to_the_first_sep():
    sep, pad = 102, 0
    tokens = torch.tensor([[5, 6, sep, pad, pad], [5, sep, 7, sep, pad], [5, 6, 7, 8, 9]])
    assert caption_mask(tokens, sep).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_the_gradient_raises_above_baseline_samples_and_lowers_the_others(tiny_model_dir):
    from blip_recipes.model import load_model

    model = load_model(tiny_model_dir, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8).repeat(2, 1, 1, 1)
    bos, sep = model.config.text_config.bos_token_id, model.config.text_config.sep_token_id
    prefix = torch.tensor([[bos], [bos]])
    samples = torch.tensor([[10, 11, 12, sep], [20, 21, sep, 0]])
    mask = caption_mask(samples, sep)
    before = sequence_log_probs(model, pixels, prefix, samples, mask).detach()
    advantage = torch.tensor([1.0, -1.0])  # sample 0 beat the baseline, sample 1 fell short
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = -(advantage * sequence_log_probs(model, pixels, prefix, samples, mask)).mean()
    loss.backward()
    optimizer.step()
    after = sequence_log_probs(model, pixels, prefix, samples, mask).detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_the_teacher_forced_pass_encodes_each_image_once_for_its_samples(tiny_model_dir):
    """SelfCriticalLoss passes the (images, samples) index: the same log-probabilities and gradients as one image copy
    per sample."""
    from blip_recipes.model import load_model

    model = load_model(tiny_model_dir, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    bos, sep = model.config.text_config.bos_token_id, model.config.text_config.sep_token_id
    prefix = torch.full((6, 1), bos)
    samples = torch.randint(5, 40, (6, 5))
    samples[:, 3] = sep
    mask = caption_mask(samples, sep)
    advantage = torch.randn(6)
    results = []
    for pixels, index in ((images.repeat_interleave(3, dim=0), None), (images, torch.tensor([[0, 0, 0], [1, 1, 1]]))):
        model.zero_grad(set_to_none=True)
        log_probs = sequence_log_probs(model, pixels, prefix, samples, mask, index)
        (-(advantage * log_probs).mean()).backward()
        results.append((log_probs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (copies, copy_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, copies, rtol=1e-5, atol=1e-6)
    for name, gradient in copy_grads.items():
        torch.testing.assert_close(shared_grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_beam_samples_are_the_beams_of_the_evaluation_search(captioning_model):
    """scst_sampling beam: the K finished beams, best first; the first is the caption a K-beam evaluation writes."""
    from blip_recipes.evaluation import generate_caption_ids
    from blip_recipes.model import load_model
    from blip_recipes.scst import sample_captions

    model = load_model(captioning_model, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    torch.manual_seed(3)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    prefix = torch.full((2, 1), model.config.text_config.bos_token_id)
    beams, _ = sample_captions(model, pixels, prefix, 4, 20, 3, greedy=False, sampling="beam")
    best = generate_caption_ids(model, pixels, prefix, num_beams=4, max_length=20, min_length=3)
    assert beams.shape[0] == 8
    for image in range(2):
        first = beams[4 * image].tolist()
        assert first[: best.shape[1]] == best[image].tolist()
        assert len({tuple(row.tolist()) for row in beams[4 * image : 4 * image + 4]}) == 4  # four different captions


def quick_recipe(output_dir, *extra, recipe="full"):
    return parse_recipe([os.path.join(REPO, "recipes", "shapes", f"{recipe}.yaml"), "--output_dir", str(output_dir),
                         *QUICK, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def captioning_model(tmp_path_factory, builtin_cache):
    """A tiny model trained briefly with cross-entropy (what SCST starts from)."""
    output_dir = tmp_path_factory.mktemp("ce")
    trainer = build_trainer(quick_recipe(output_dir, "--max_steps", "90", "--per_device_train_batch_size", "32"))
    trainer.train()
    trainer.save_model()
    return str(output_dir)


def test_scst_raises_the_reward_on_training_images(tmp_path, captioning_model):
    """Eight training images, 60 steps: the mean CIDEr-D of the captions the model samples for them (the reward
    SCST maximises in expectation) rises steadily."""
    recipe = quick_recipe(tmp_path, "--model_name_or_path", captioning_model, "--training_objective", "scst",
                          "--scst_baseline", "mean", "--scst_num_samples", "8", "--learning_rate", "5e-4",
                          "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--max_steps", "60",
                          "--per_device_train_batch_size", "8", "--max_train_samples", "8",
                          "--logging_steps", "10")  # fmt: skip
    trainer = build_trainer(recipe)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 6
    rewards = [entry["scst_reward"] for entry in logged]
    assert rewards[-1] > rewards[0] + 0.15 and rewards[-2] > rewards[0], rewards
    for entry in logged:
        assert {"scst_reward", "scst_baseline", "scst_sample_length", "scst_max_length_fraction"} <= set(entry)
        assert 0 <= entry["scst_max_length_fraction"] <= 1 and entry["scst_sample_length"] > 1


@pytest.mark.parametrize("mode, cache", [("lora", "true"), ("frozen_vision", "false")])
def test_scst_trains_only_what_the_mode_trains(tmp_path, captioning_model, mode, cache):
    """LoRA on cached vision features (the store answers for the encoder) changes only adapters; frozen_vision on
    pixels never changes the vision encoder."""
    recipe = quick_recipe(tmp_path, "--model_name_or_path", captioning_model, "--training_objective", "scst",
                          "--scst_baseline", "mean", "--scst_num_samples", "3", "--max_steps", "3",
                          "--per_device_train_batch_size", "8", "--cache_vision_features", cache,
                          recipe=mode)  # fmt: skip
    trainer = build_trainer(recipe)
    before = {n: p.detach().clone() for n, p in unwrap_blip(trainer.model).named_parameters()}
    encoded = encoder_calls(trainer.model)
    trainer.train()
    changed = {n for n, p in unwrap_blip(trainer.model).named_parameters() if not torch.equal(p, before[n])}
    assert changed
    if mode == "lora":
        assert all("lora_" in name for name in changed)
    else:
        assert not any(name.startswith("vision_model.") for name in changed)
        assert any(name.startswith("text_decoder.") for name in changed)
        # Each step encodes its 8 images once to sample and once for the teacher-forced pass, not once per sample.
        assert encoded == [8, 8] * 3


def test_scst_keys_need_scst_and_the_mean_baseline_two_samples(tmp_path):
    from blip_recipes.config import RecipeError

    with pytest.raises(RecipeError, match="scst_num_samples only apply to training_objective: scst"):
        quick_recipe(tmp_path, "--scst_num_samples", "3")
    with pytest.raises(RecipeError, match="scst_num_samples must be at least 2"):
        quick_recipe(tmp_path, "--training_objective", "scst", "--scst_baseline", "mean", "--scst_num_samples", "1")
    with pytest.raises(RecipeError, match="ema_decay must be in"):
        quick_recipe(tmp_path, "--ema_decay", "1.5")
    with pytest.raises(RecipeError, match="ema_decay with load_best_model_at_end"):
        quick_recipe(tmp_path, "--ema_decay", "0.9", "--load_best_model_at_end", "true", "--metric_for_best_model",
                     "cider", "--eval_strategy", "steps", "--save_strategy", "steps")  # fmt: skip


@pytest.mark.parametrize("keys, message", [
    (["--training_objective", "scst"], "training_objective scst and ema_decay run on one device or under DDP"),
    (["--ema_decay", "0.9"], "training_objective scst and ema_decay run on one device or under DDP"),
    (["--training_mode", "frozen_vision", "--cache_vision_features", "true"], "cache_vision_features runs on one"),
    (["--group_captions_by_image", "true"], "group_captions_by_image runs on one device or under DDP"),
], ids=["scst", "ema", "vision-features", "group-captions"])  # fmt: skip
@pytest.mark.parametrize("engine", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_what_is_tested_only_unsharded_is_refused_under_deepspeed_and_fsdp(tmp_path, monkeypatch, keys, message,
                                                                          engine):  # fmt: skip
    from blip_recipes.config import RecipeError

    monkeypatch.setenv(engine, "true")
    with pytest.raises(RecipeError, match=message):
        quick_recipe(tmp_path, *keys)


def test_resuming_with_ema_needs_the_average_in_the_checkpoint(tmp_path):
    from blip_recipes.config import RecipeError
    from blip_recipes.train import check_before_loading

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3}')
    (checkpoint / "optimizer.pt").write_bytes(b"state")
    recipe = quick_recipe(tmp_path, "--ema_decay", "0.9", "--resume_from_checkpoint", "true")
    with pytest.raises(RecipeError, match="no ema.safetensors, but this recipe sets ema_decay"):
        check_before_loading(recipe)


def test_scst_under_ddp(tmp_path, captioning_model):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29681", "-m", "blip_recipes.cli"]  # fmt: skip
    result = run_cli(["train", "recipes/shapes/scst.yaml", "--model_name_or_path", captioning_model, "--output_dir",
                      str(tmp_path / "run"), *QUICK, "--max_steps", "4", "--per_device_train_batch_size", "8",
                      "--log_level_replica", "info"], launcher=launcher)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert len(re.findall(r"processes: world_size=2 \(distributed, device cpu:0, engine DDP\)", log)) == 2
    assert "weights identical on all 2 processes" in log
    assert read_json(tmp_path / "run" / "trainer_state.json")["global_step"] == 4


class WeightRecorder:
    """The trainable weights after every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                recorder.steps.append({n: p.detach().clone() for n, p in unwrap_blip(model).named_parameters()})

        self.steps, self.callback = [], Callback()


def ema_run(output_dir, steps, resume=None, recorder=None):
    recipe = quick_recipe(output_dir, "--ema_decay", "0.5", "--max_steps", str(steps), "--per_device_train_batch_size",
                          "8", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3",
                          "--warmup_steps", "0")  # fmt: skip
    from transformers import set_seed

    set_seed(recipe.training.seed)
    trainer = build_trainer(recipe, callbacks=[recorder.callback] if recorder else [])
    initial = {n: p.detach().clone() for n, p in unwrap_blip(trainer.model).named_parameters()}
    trainer.train(resume_from_checkpoint=resume)
    return trainer, initial


def test_ema_is_the_hand_computed_average_and_is_what_is_saved(tmp_path):
    recorder = WeightRecorder()
    trainer, initial = ema_run(tmp_path, 4, recorder=recorder)
    expected = {name: tensor.clone() for name, tensor in initial.items()}
    for weights in recorder.steps:
        for name in expected:
            expected[name] = expected[name] * 0.5 + weights[name] * 0.5
    assert len(recorder.steps) == 4
    for name, tensor in expected.items():
        torch.testing.assert_close(trainer.ema.average[name], tensor, rtol=0, atol=1e-6)
    raw = {n: p.detach().clone() for n, p in unwrap_blip(trainer.model).named_parameters()}
    with trainer.ema_weights():
        trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "model.safetensors")
    some = "text_decoder.bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(saved[some], expected[some], rtol=0, atol=1e-6)
    assert not torch.equal(saved[some], raw[some])
    # Outside the block the model trains on from its raw weights.
    assert all(torch.equal(p, raw[n]) for n, p in unwrap_blip(trainer.model).named_parameters())
    assert os.path.isfile(tmp_path / "checkpoint-3" / "ema.safetensors")
    for folder in ("checkpoint-3", "final"):
        assert_readable_by_everyone(tmp_path / folder)


def test_ema_resumes_exactly(tmp_path):
    straight, _ = ema_run(tmp_path / "straight", 6)
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, _ = ema_run(tmp_path / "resumed", 6, resume=str(tmp_path / "resumed" / "checkpoint-3"))
    assert straight.ema.average.keys() == resumed.ema.average.keys()
    assert all(torch.equal(straight.ema.average[n], resumed.ema.average[n]) for n in straight.ema.average)
