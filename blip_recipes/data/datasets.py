"""Torch datasets over checked splits: (image, caption) pairs for training, one item per image for evaluation."""

import re

import torch

from ..transforms import ImageTransform
from .image_cache import ResizedImageCache
from .records import CaptionSplit, ImageRecord

# The item key under which a training item names its image's row in the vision-features store (vision_features.py)
# instead of carrying pixels; CaptionCollator reads it.
VISION_FEATURES_ROW = "vision_features_row"

_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def blip_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS' BlipCaptionProcessor.pre_caption: lowercase, punctuation to spaces, at most `max_words` words."""
    caption = _BLIP_PUNCTUATION.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


class CaptionTrainDataset(torch.utils.data.Dataset):
    """One item per (image, caption): every reference caption is a training target.

    With `vision_features` an item names its image's row in the vision-features store (VISION_FEATURES_ROW) instead
    of carrying pixels: the features were computed once (vision_features.py) and the model looks them up.
    """

    def __init__(
        self, split: CaptionSplit, transform: ImageTransform, caption_preprocessing: str = "none",
        cache: ResizedImageCache | None = None, vision_features: bool = False,
    ):  # fmt: skip
        self.split = split
        self.transform = transform
        self.cache = cache
        self.vision_features = vision_features
        clean = blip_caption if caption_preprocessing == "blip" else (lambda caption: caption)
        self.pairs = [
            (position, clean(caption)) for position, record in enumerate(split.records) for caption in record.captions
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        position, caption = self.pairs[index]
        if self.vision_features:
            return {VISION_FEATURES_ROW: position, "caption": caption}
        return {"pixel_values": _pixels(self.split, self.transform, self.cache, position), "caption": caption}


def _pixels(split: CaptionSplit, transform: ImageTransform, cache, position: int) -> torch.Tensor:
    if cache is not None:
        return cache[position]
    return transform(split.table.load(split.records[position].row))


class CaptionEvalDataset(torch.utils.data.Dataset):
    """One item per image, with every reference (evaluation, and self-critical training). With `vision_features`
    an item names its image's row in the vision-features store instead of carrying pixels."""

    def __init__(self, split: CaptionSplit, transform: ImageTransform, cache: ResizedImageCache | None = None,
                 vision_features: bool = False):  # fmt: skip
        self.split = split
        self.transform = transform
        self.cache = cache
        self.vision_features = vision_features

    def __len__(self) -> int:
        return len(self.split.records)

    def record(self, index: int) -> ImageRecord:
        return self.split.records[index]

    def __getitem__(self, index: int) -> dict:
        if self.vision_features:
            return {VISION_FEATURES_ROW: index, "index": index}
        return {"pixel_values": _pixels(self.split, self.transform, self.cache, index), "index": index}

    def load_image(self, index: int):
        return self.split.table.load(self.split.records[index].row)
