"""Caption data, by concern: sources.py (load any supported source), records.py (rows -> images, checks, held-out
split), image_cache.py (the resized-image cache), datasets.py (torch datasets for training and evaluation)."""

from .datasets import (
    IMAGE_POSITION,
    VISION_FEATURES_ROW,
    CaptionEvalDataset,
    CaptionTrainDataset,
    ImageGroupedSampler,
    blip_caption,
    training_pairs,
)
from .image_cache import ResizedImageCache, image_cache_dir
from .records import CaptionData, CaptionSplit, ImageRecord, ImageTable, load_caption_splits
from .sources import DataError

__all__ = [
    "IMAGE_POSITION", "VISION_FEATURES_ROW", "CaptionData", "CaptionEvalDataset", "CaptionSplit",
    "CaptionTrainDataset", "DataError", "ImageGroupedSampler", "ImageRecord", "ImageTable", "ResizedImageCache",
    "blip_caption", "training_pairs", "image_cache_dir", "load_caption_splits",
]  # fmt: skip
