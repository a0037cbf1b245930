"""The one collator every recipe uses: uint8 images + caption text -> BLIP training inputs.

Pixels stay uint8 all the way to the model, which normalises them on its own device (adapt.AdaptedVisionModel):
a quarter of the bytes through worker processes, pinned memory and PCIe, and no float work in the workers.

Three things differ from the notebook (`processor(..., padding="max_length")`, `labels=input_ids`):
- captions are padded to the longest in the batch, not to the tokenizer's 512;
- the first token is the decoder's bos `[DEC]`, as `BlipForConditionalGeneration.generate` feeds it (the
  processor emits `[CLS]`, so a model trained on raw processor output is trained on a prefix it never sees later);
- labels are -100 on padding and on the prompt, so only caption tokens (and the closing [SEP]) are learned.
"""

import torch

from .data import VISION_FEATURES_ROW


class CaptionCollator:
    def __init__(
        self,
        tokenizer,
        bos_token_id: int,
        prompt: str = "",
        max_length: int = 40,
        pad_to_multiple_of: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.prompt = prompt
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        # Tokens the prompt occupies after the bos; LAVIS masks the same span (its prompt_length counts the bos).
        self.prompt_token_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
        self.prompt_length = len(self.prompt_token_ids)

    def __call__(self, features: list[dict]) -> dict:
        if VISION_FEATURES_ROW in features[0]:
            # Rows of the vision-features store, passed where the model expects its images (adapt.is_feature_rows).
            rows = [f[VISION_FEATURES_ROW] for f in features]
            batch = {"pixel_values": torch.tensor(rows, dtype=torch.long)}
        else:
            batch = {"pixel_values": torch.stack([f["pixel_values"] for f in features])}
        if "caption" not in features[0]:  # evaluation: images only, plus their positions in the eval set
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
            return batch
        encoded = self.tokenizer(
            [self.prompt + f["caption"] for f in features],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        input_ids = encoded["input_ids"]
        input_ids[:, 0] = self.bos_token_id
        labels = input_ids.masked_fill(encoded["attention_mask"] == 0, -100)
        labels[:, : 1 + self.prompt_length] = -100
        batch.update(input_ids=input_ids, attention_mask=encoded["attention_mask"], labels=labels)
        return batch

    def prompt_ids(self, batch_size: int, device=None) -> torch.Tensor:
        """Decoder prefix for generation: [DEC] + prompt tokens, one row per image."""
        ids = [self.bos_token_id] + self.prompt_token_ids
        return torch.tensor([ids] * batch_size, dtype=torch.long, device=device)
