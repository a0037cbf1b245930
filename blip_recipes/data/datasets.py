"""Torch datasets over checked splits: (image, caption) pairs for training, one item per image for evaluation."""

import re

import torch

from ..transforms import ImageTransform
from .image_cache import ResizedImageCache
from .records import CaptionSplit, ImageRecord

# The item key under which a training item names its image's row in the vision-features store (vision_features.py)
# instead of carrying pixels; CaptionCollator reads it.
VISION_FEATURES_ROW = "vision_features_row"
# With group_captions_by_image, the item key naming the item's image (its position in the split): CaptionCollator
# puts each image of a batch in it once, and the model encodes it once for all its captions (adapt.SharedImages).
IMAGE_POSITION = "image_position"

_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def blip_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS' BlipCaptionProcessor.pre_caption: lowercase, punctuation to spaces, at most `max_words` words."""
    caption = _BLIP_PUNCTUATION.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def training_pairs(split: CaptionSplit, caption_preprocessing: str = "none") -> list[tuple[int, str]]:
    """(image position, caption as trained on) for every caption of every image of `split`, `record.repeat` times
    (extra_train_datasets' SOURCE*K)."""
    clean = blip_caption if caption_preprocessing == "blip" else (lambda caption: caption)
    return [
        (position, clean(caption))
        for position, record in enumerate(split.records)
        for _ in range(record.repeat)
        for caption in record.captions
    ]


def image_positions_per_epoch(split: CaptionSplit) -> list[int]:
    """Each image's position, `record.repeat` times: an epoch of one item per image (self-critical training)."""
    return [position for position, record in enumerate(split.records) for _ in range(record.repeat)]


class CaptionTrainDataset(torch.utils.data.Dataset):
    """One item per (image, caption): every reference caption is a training target.

    With `vision_features` an item names its image's row in the vision-features store (VISION_FEATURES_ROW) instead
    of carrying pixels: the features were computed once (vision_features.py) and the model looks them up.

    With `group_by_image` (group_captions_by_image) an item also names its image (IMAGE_POSITION), and consecutive
    items of one image share one decoded (and augmented) image: ImageGroupedSampler puts them next to each other.
    """

    def __init__(
        self, split: CaptionSplit, transform: ImageTransform, caption_preprocessing: str = "none",
        cache: ResizedImageCache | None = None, vision_features: bool = False, group_by_image: bool = False,
    ):  # fmt: skip
        self.split = split
        self.transform = transform
        self.cache = cache
        self.vision_features = vision_features
        self.group_by_image = group_by_image
        self._last_image = (None, None)  # (position, pixels) of the item before, with group_by_image
        self.pairs = training_pairs(split, caption_preprocessing)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def image_positions(self) -> list[int]:
        """Each item's image (its position in the split), in item order."""
        return [position for position, _ in self.pairs]

    def __getitem__(self, index: int) -> dict:
        position, caption = self.pairs[index]
        if self.vision_features:
            item = {VISION_FEATURES_ROW: position}
        elif self.group_by_image:
            if self._last_image[0] != position:
                self._last_image = (position, _pixels(self.split, self.transform, self.cache, position))
            item = {"pixel_values": self._last_image[1]}
        else:
            item = {"pixel_values": _pixels(self.split, self.transform, self.cache, position)}
        item["caption"] = caption
        if self.group_by_image:
            item[IMAGE_POSITION] = position
        return item


class ImageGroupedSampler(torch.utils.data.Sampler):
    """Every item once per epoch, each image's items next to each other, in an order that depends only on the seed and
    the epoch (so a resume skips to the same place): group_captions_by_image.

    With `batch_size`, the epoch is laid out in blocks of exactly that many items: images with equally many captions,
    where that count divides the batch size (COCO: 5 captions, batch 160 -> 32 images), fill blocks of their own, in
    which every image's captions are in one batch, equally many and consecutive, so the cross-attention attends them
    without copying keys/values (adapt.SharedImages). The other images (COCO's few with 6 or 7 captions, and each
    count's last partial block) fill blocks in which an image may straddle two batches (it is encoded in both).
    Blocks come in a seeded random order, the last partial one at the end of the epoch, so that every block stays
    aligned with a batch. Without `batch_size`: the images in a seeded random order.
    """

    def __init__(self, image_positions: list[int], seed: int, batch_size: int | None = None):
        self.seed, self.epoch, self.batch_size = seed, 0, batch_size
        self.items_by_image: dict[int, list[int]] = {}
        for index, position in enumerate(image_positions):
            self.items_by_image.setdefault(position, []).append(index)
        self.length = len(image_positions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        images = list(self.items_by_image.values())
        images = [images[i] for i in torch.randperm(len(images), generator=generator).tolist()]
        if self.batch_size is None:
            for items in images:
                yield from items
            return
        blocks, others = _image_blocks(images, self.batch_size)
        rows = [item for items in others for item in items]
        full = len(rows) - len(rows) % self.batch_size
        blocks += [rows[start : start + self.batch_size] for start in range(0, full, self.batch_size)]
        for block in torch.randperm(len(blocks), generator=generator).tolist():
            yield from blocks[block]
        yield from rows[full:]


def _image_blocks(images: list[list[int]], batch_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Blocks of `batch_size` items, each of whole images with one caption count; and the images left over."""
    by_count: dict[int, list[list[int]]] = {}
    for items in images:
        by_count.setdefault(len(items), []).append(items)
    blocks, others = [], []
    for count, group in by_count.items():
        if batch_size % count:
            others += group
            continue
        per_block = batch_size // count
        whole = len(group) - len(group) % per_block
        blocks += [[item for items in group[start : start + per_block] for item in items]
                   for start in range(0, whole, per_block)]  # fmt: skip
        others += group[whole:]
    return blocks, others


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
