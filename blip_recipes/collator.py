"""The one collator every recipe uses: uint8 images + caption text -> BLIP training inputs.

Pixels stay uint8 all the way to the model, which normalises them on its own device (adapt.AdaptedVisionModel):
a quarter of the bytes through worker processes, pinned memory and PCIe, and no float work in the workers.

Three things differ from the notebook (`processor(..., padding="max_length")`, `labels=input_ids`):
- captions are padded to the longest in the batch, not to the tokenizer's 512;
- the first token is the decoder's bos `[DEC]`, as `BlipForConditionalGeneration.generate` feeds it (the
  processor emits `[CLS]`, so a model trained on raw processor output is trained on a prefix it never sees later);
- labels are -100 on padding and on the prompt, so only caption tokens (and the closing [SEP]) are learned; a caption
  cut at max_caption_length has no [SEP] (it is not taught to end there).

Items that name their image (IMAGE_POSITION, group_captions_by_image) put each distinct image of the batch in once,
and `image_index` says which of them each caption row describes (adapt.SharedImages): (rows,), or (images, captions
per image) when each image's rows are consecutive and equally many.
"""

import torch

from .adapt import SharedImages
from .data import IMAGE_POSITION, VISION_FEATURES_ROW


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
        image_index = None
        if IMAGE_POSITION in features[0]:  # each distinct image once, in order of first appearance
            first_items = {}
            for feature in features:
                first_items.setdefault(feature[IMAGE_POSITION], feature)
            row_of = {position: row for row, position in enumerate(first_items)}
            image_index = torch.tensor([row_of[feature[IMAGE_POSITION]] for feature in features], dtype=torch.long)
            images, per_image = len(first_items), len(features) // len(first_items)
            consecutive = SharedImages.consecutive(images, per_image, image_index.device)
            if consecutive.numel() == len(features) and torch.equal(image_index, consecutive.view(-1)):
                image_index = consecutive  # each image's rows consecutive and equally many: the folded layout
            batch = self._images(list(first_items.values()))
        else:
            batch = self._images(features)
        if "caption" not in features[0]:  # evaluation: images only, plus their positions in the eval set
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
            return batch
        batch.update(self._captions(features))
        if image_index is not None:
            batch["image_index"] = image_index
        return batch

    @staticmethod
    def _images(features: list[dict]) -> dict:
        if VISION_FEATURES_ROW in features[0]:
            # Rows of the vision-features store, passed where the model expects its images (adapt.is_feature_rows).
            rows = [f[VISION_FEATURES_ROW] for f in features]
            return {"pixel_values": torch.tensor(rows, dtype=torch.long)}
        return {"pixel_values": torch.stack([f["pixel_values"] for f in features])}

    def _captions(self, features: list[dict]) -> dict:
        # Encoded to one token over the limit, which tells a caption that fits from one that does not: a caption cut
        # at max_length keeps its first tokens and no [SEP], so it is not trained to end where the limit cut it (the
        # tokenizer's own truncation keeps [SEP], as LAVIS has it: a model learns to stop mid-sentence).
        rows = self.tokenizer(
            [self.prompt + f["caption"] for f in features],
            truncation=True,
            max_length=self.max_length + 1,
            return_token_type_ids=False,
            return_attention_mask=False,
        )["input_ids"]
        rows = [row[: self.max_length] for row in rows]
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, : len(row)] = 1
        input_ids[:, 0] = self.bos_token_id
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : 1 + self.prompt_length] = -100
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def prompt_ids(self, batch_size: int, device=None) -> torch.Tensor:
        """Decoder prefix for generation: [DEC] + prompt tokens, one row per image."""
        ids = [self.bos_token_id] + self.prompt_token_ids
        return torch.tensor([ids] * batch_size, dtype=torch.long, device=device)
