"""Self-critical sequence training (Rennie et al. 2017): `training_objective: scst` optimises CIDEr-D directly.

Per training image, without gradients, with the image encoded once and its cross-attention keys/values projected
once for all its samples (evaluation.decode): `num_samples` captions from the model (the recipe's prompt and max
length): multinomial draws (Rennie et al.), or with `scst_sampling: beam` the finished beams of a beam search that
wide (Cornia et al. 2020, "Meshed-Memory Transformer for Image Captioning": the captions a beam-search evaluation
chooses among); and, for the `greedy` baseline, the greedy caption. Each sample's reward is its CIDEr-D against all
of the image's references (plus an optional BLEU-4 share), with document frequencies from the training references
(rewards.py). The baseline is the greedy caption's reward (`greedy`, Rennie et al.) or the mean reward of the
image's other samples (`mean`, the "new self-critical" variant). Then, with gradients, one teacher-forced pass over
the samples gives each sample's log-probability (its tokens up to and including [SEP]); it too encodes each image
once and projects its cross-attention keys/values once for its samples (adapt.SharedImages). The loss is

    -(reward - baseline) x log p(sample), averaged over the step's samples,

so samples better than the baseline become more likely and worse ones less. CaptionTrainer.compute_loss calls
`SelfCriticalLoss` instead of the cross-entropy when the objective is scst; the data are one item per image.
"""

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F

from .adapt import SharedImages, unwrap_blip
from .evaluation import decode
from .metrics import ptb_tokenize
from .rewards import CiderD, bleu4, simple_tokenize

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_captions(model, pixel_values, prefix_ids, num_samples: int, max_length: int, min_length: int,
                    greedy: bool, sampling: str = "multinomial"):  # fmt: skip
    """(sampled new tokens [images x num_samples, T], greedy new tokens [images, T'] or None); one encoder pass.

    `sampling`: multinomial draws, or the `num_samples` finished beams of a beam search of that width."""
    blip = unwrap_blip(model)
    was_training = blip.training
    blip.eval()  # no dropout while drawing the samples and the baseline
    try:
        image_embeds = blip.vision_model(pixel_values=pixel_values).last_hidden_state
        lengths = (max_length, min_length)
        if sampling == "beam":
            sampled = decode(blip, image_embeds, prefix_ids, *lengths, num_beams=num_samples,
                             num_return_sequences=num_samples)  # fmt: skip
        else:
            sampled = decode(blip, image_embeds, prefix_ids, *lengths, do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, num_return_sequences=num_samples)  # fmt: skip
        baseline = decode(blip, image_embeds, prefix_ids, *lengths) if greedy else None
        return sampled, baseline
    finally:
        blip.train(was_training)


def caption_mask(new_tokens: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """1 for each generated token up to and including the first [SEP] (all of them when none ends the caption)."""
    is_sep = new_tokens.eq(sep_token_id).int()
    after_sep = (is_sep.cumsum(dim=1) - is_sep) > 0
    return (~after_sep).int()


def baseline_rewards(rewards: torch.Tensor, greedy_rewards: torch.Tensor | None, kind: str) -> torch.Tensor:
    """[images, samples] baselines: the greedy caption's reward, or the mean reward of the image's other samples."""
    if kind == "greedy":
        return greedy_rewards.unsqueeze(1).expand_as(rewards)
    count = rewards.shape[1]
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (count - 1)


def sequence_log_probs(model, pixel_values, prefix_ids, new_tokens, mask, image_index=None) -> torch.Tensor:
    """log p(new tokens | image, prefix) per row, summed over the tokens `mask` keeps, with gradients: one
    teacher-forced pass through `model` itself (so DDP synchronises the gradients). With `image_index`, row i is a
    caption of pixel_values[image_index[i]] (adapt.SharedImages), else of pixel_values[i]."""
    sequences = torch.cat([prefix_ids, new_tokens], dim=1)
    attention = torch.cat([torch.ones_like(prefix_ids), mask], dim=1)
    shared = {} if image_index is None else {"image_index": image_index}
    logits = model(pixel_values=pixel_values, input_ids=sequences, attention_mask=attention, **shared).logits
    start = prefix_ids.shape[1] - 1  # the logit at position t predicts token t + 1
    predicted = logits[:, start : start + new_tokens.shape[1], :].float()
    token_log_probs = F.log_softmax(predicted, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * mask).sum(dim=1)


class SelfCriticalLoss:
    """The SCST loss over a batch of training images (pixel_values or vision-feature rows, and their indices)."""

    def __init__(self, references: list[list[str]], tokenizer, prefix_ids, num_samples: int = 5,
                 baseline: str = "greedy", max_length: int = 30, min_length: int = 0,
                 reward_weights=(1.0, 0.0), sampling: str = "multinomial"):  # fmt: skip
        if baseline not in ("greedy", "mean"):
            raise ValueError(f"scst_baseline must be greedy or mean, got {baseline!r}")
        if baseline == "mean" and num_samples < 2:
            raise ValueError("scst_baseline mean needs scst_num_samples >= 2 (the mean of the other samples)")
        flat = [caption for captions in references for caption in captions]
        tokenised = iter(ptb_tokenize(flat))
        self.references = [[next(tokenised) for _ in captions] for captions in references]
        self.cider = CiderD(self.references)
        self.tokenizer = tokenizer
        self.prefix_ids = prefix_ids  # callable(batch_size, device) -> [DEC] + prompt ids
        if sampling not in ("multinomial", "beam"):
            raise ValueError(f"scst_sampling must be multinomial or beam, got {sampling!r}")
        self.num_samples, self.baseline, self.sampling = num_samples, baseline, sampling
        self.max_length, self.min_length = max_length, min_length
        self.cider_weight, self.bleu_weight = float(reward_weights[0]), float(reward_weights[1])
        self.totals = defaultdict(float)  # per-step statistics, averaged and reset at each log
        self.steps = 0

    def rewards(self, new_tokens: torch.Tensor, images: list[int]) -> torch.Tensor:
        """Reward of each row of `new_tokens` (a caption of image images[row])."""
        captions = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        values = []
        for caption, image in zip(captions, images):
            words = simple_tokenize(caption)
            value = self.cider_weight * self.cider.score(words, image) if self.cider_weight else 0.0
            if self.bleu_weight:
                value += self.bleu_weight * bleu4(words, self.references[image])
            values.append(value)
        return torch.tensor(values, dtype=torch.float32)

    def __call__(self, model, inputs: dict, autocast) -> torch.Tensor:
        pixel_values, indices = inputs["pixel_values"], inputs["index"].tolist()
        k = self.num_samples
        prefix = self.prefix_ids(len(indices), pixel_values.device)
        with autocast():
            sampled, greedy = sample_captions(model, pixel_values, prefix, k, self.max_length, self.min_length,
                                              greedy=self.baseline == "greedy", sampling=self.sampling)  # fmt: skip
        sep = unwrap_blip(model).config.text_config.sep_token_id
        per_sample = [image for image in indices for _ in range(k)]
        rewards = self.rewards(sampled, per_sample).view(len(indices), k)
        greedy_rewards = self.rewards(greedy, indices) if greedy is not None else None
        baseline = baseline_rewards(rewards, greedy_rewards, self.baseline)
        advantage = (rewards - baseline).reshape(-1).to(pixel_values.device)
        mask = caption_mask(sampled, sep)
        # Each image's k samples are consecutive rows: the (images, k) layout encodes it once for them.
        image_index = SharedImages.consecutive(len(indices), k, pixel_values.device)
        with autocast():
            log_probs = sequence_log_probs(model, pixel_values, prefix.repeat_interleave(k, dim=0), sampled, mask,
                                           image_index)  # fmt: skip
        loss = -(advantage * log_probs).mean()

        lengths = mask.sum(dim=1).float()
        self.totals["scst_reward"] += rewards.mean().item()
        self.totals["scst_baseline"] += baseline.mean().item()
        self.totals["scst_sample_length"] += lengths.mean().item()
        self.totals["scst_max_length_fraction"] += (~sampled.eq(sep).any(dim=1)).float().mean().item()
        self.steps += 1
        return loss

    def pop_statistics(self) -> dict:
        """Means since the last call (what the Trainer logs beside the loss)."""
        if not self.steps:
            return {}
        averages = {name: round(total / self.steps, 4) for name, total in self.totals.items()}
        self.totals.clear()
        self.steps = 0
        return averages
