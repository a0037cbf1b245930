"""The one source of every fixed set of choices and of the decoding defaults.

Recipe fields are typed with these `Literal`s (the parser checks any Literal field generically), and the code that
acts on a choice (dtype lookup, attention swap, metric names) reads the same tuples, so a new choice is added here.
"""

import typing
from dataclasses import dataclass

TrainingMode = typing.Literal["full", "frozen_vision", "lora"]
TorchDtype = typing.Literal["float32", "bfloat16", "float16"]
AttnImplementation = typing.Literal["sdpa", "eager"]
CaptionPreprocessing = typing.Literal["none", "blip"]
ImageAugmentation = typing.Literal["none", "blip"]
# The Trainer's other strategies (checkpoint, all_checkpoints) upload optimizer state; publishing is hub.py's job.
HubStrategy = typing.Literal["end", "every_save", "checkpoint"]
TrainingObjective = typing.Literal["cross_entropy", "scst"]
ScstBaseline = typing.Literal["greedy", "mean"]
ScstSampling = typing.Literal["multinomial", "beam"]

TRAINING_MODES: tuple[str, ...] = typing.get_args(TrainingMode)
TORCH_DTYPES: tuple[str, ...] = typing.get_args(TorchDtype)
ATTN_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(AttnImplementation)


# Images with more pixels are refused from their header, before any decoding (configurable: max_image_pixels in a
# recipe, --max_image_pixels for caption and serve). 64 megapixels is more than a 50 MP camera's photos; a decoded
# 64 MP RGB image is 192 MB, and a small file that declares far more pixels is a decompression bomb.
MAX_IMAGE_PIXELS = 8_000 * 8_000


@dataclass(frozen=True)
class GenerationDefaults:
    """Decoding used when neither the recipe, the command line nor the model's saved settings say otherwise.

    Lengths count the decoder prefix ([DEC] + prompt), as LAVIS and BlipForConditionalGeneration.generate do.
    """

    num_beams: int = 3
    max_length: int = 30
    min_length: int = 5
    prompt: str = ""


GENERATION_DEFAULTS = GenerationDefaults()
