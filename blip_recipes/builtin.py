"""The embedded offline default: a synthetic shapes captioning dataset and a tiny random BLIP.

Both are generated deterministically on first use into a cache directory and then loaded through the same code
paths as user data (an imagefolder with metadata.jsonl) and Hub checkpoints (`from_pretrained` on a directory), so
the demo exercises the real loaders. Nothing is downloaded.
"""

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager

from .choices import GENERATION_DEFAULTS

BUILTIN_PREFIX = "builtin:"
SHAPES_VERSION = 1
TINY_BLIP_VERSION = 1

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "left": ((0.25, 0.5), "on the left"),
    "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "center": ((0.5, 0.5), "in the center"),
}
SPLIT_SIZES = {"train": 480, "validation": 60}
IMAGE_PIXELS = 128


def cache_root() -> str:
    return os.environ.get("BLIP_RECIPES_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "blip_recipes"))


def is_builtin(name: str | None) -> bool:
    return bool(name) and name.startswith(BUILTIN_PREFIX)


def resolve_builtin(name: str) -> str:
    """builtin:shapes / builtin:tiny-blip -> a local directory, generated on first use."""
    kind = name.removeprefix(BUILTIN_PREFIX)
    if kind == "shapes":
        return _materialize(f"shapes-v{SHAPES_VERSION}", write_shapes_dataset)
    if kind == "tiny-blip":
        return _materialize(f"tiny-blip-v{TINY_BLIP_VERSION}", write_tiny_blip)
    raise ValueError(f"unknown builtin {name!r}; available: builtin:shapes, builtin:tiny-blip")


def _materialize(dirname: str, writer) -> str:
    target = os.path.join(cache_root(), dirname)
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    with _exclusive_lock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, ".complete")):
            # Written beside the target and renamed, so a crash never leaves a half-written builtin behind.
            staging = tempfile.mkdtemp(prefix=dirname + ".", dir=cache_root())
            writer(staging)
            open(os.path.join(staging, ".complete"), "w").close()
            # mkdtemp made the folder 0700 and safetensors the weights 0600: a cache shared by several users (or
            # baked into a container image as root) must be readable as the umask allows, like any other folder.
            from .checkpoints import current_umask, share_as_umask_allows

            os.chmod(staging, 0o777 & ~current_umask())
            share_as_umask_allows(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target


@contextmanager
def _exclusive_lock(path: str):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shape_captions(color: str, shape: str, position: str) -> list[str]:
    """Three differently phrased references for one image, as human annotators would write them."""
    phrase = POSITIONS[position][1]
    return [
        f"a {color} {shape} {phrase}",
        f"there is a {color} {shape} {phrase} of the image",
        f"a {shape} that is {color}, {phrase}",
    ]


def draw_shape_image(color: str, shape: str, position: str, rng: random.Random):
    from PIL import Image, ImageDraw

    size = IMAGE_PIXELS
    shade = rng.randint(200, 250)
    image = Image.new("RGB", (size, size), (shade, shade, rng.randint(200, 250)))
    draw = ImageDraw.Draw(image)
    (cx, cy), _ = POSITIONS[position]
    cx = cx * size + rng.uniform(-0.06, 0.06) * size
    cy = cy * size + rng.uniform(-0.06, 0.06) * size
    radius = rng.uniform(0.12, 0.18) * size
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def write_shapes_dataset(directory: str, split_sizes: dict[str, int] | None = None, seed: int = 0) -> None:
    """An imagefolder dataset: <split>/<n>.png plus <split>/metadata.jsonl with a list of captions per image."""
    rng = random.Random(seed)
    combos = [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    for split, count in (split_sizes or SPLIT_SIZES).items():
        os.makedirs(os.path.join(directory, split), exist_ok=True)
        with open(os.path.join(directory, split, "metadata.jsonl"), "w", encoding="utf-8") as metadata:
            for index in range(count):
                color, shape, position = combos[rng.randrange(len(combos))]
                file_name = f"{index:05d}.png"
                draw_shape_image(color, shape, position, rng).save(os.path.join(directory, split, file_name))
                record = {"file_name": file_name, "text": shape_captions(color, shape, position)}
                metadata.write(json.dumps(record) + "\n")


def caption_vocabulary() -> list[str]:
    words = {
        "a",
        "an",
        "picture",
        "photo",
        "of",
        "image",
        "there",
        "is",
        "that",
        "the",
        "with",
        "and",
        "in",
        "on",
        "at",
    }
    for color in COLORS:
        for shape in SHAPES:
            for position in POSITIONS:
                for caption in shape_captions(color, shape, position):
                    words.update(caption.replace(",", " ").split())
    # Letters, digits and continuation pieces let WordPiece spell any word, so user text never becomes [UNK] only.
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    continuation = ["##" + piece for piece in pieces]
    punctuation = list(".,!?'\"-:;()&/")
    return sorted(words) + pieces + continuation + punctuation


def build_tiny_tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [word for word in dict.fromkeys(caption_vocabulary()) if word not in specials]
    # [DEC] comes last, as in BLIP's tokenizer (bert-base vocab + [DEC]): the decoder's bos token.
    vocab = {token: index for index, token in enumerate(specials + words + ["[DEC]"])}
    return BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=64)


def tiny_blip_config(tokenizer, image_size: int = 64, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    from transformers import BlipConfig

    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": 8,
        # BLIP's default vision initializer_range (1e-10) makes a random encoder output a constant.
        "initializer_range": 0.02,
    }
    return BlipConfig(text_config=text_config, vision_config=vision_config)


def write_tiny_blip(directory: str, seed: int = 0) -> None:
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = build_tiny_tokenizer()
    config = tiny_blip_config(tokenizer)
    image_size = config.vision_config.image_size
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
        # Position embeddings as strong as the patch content, so that even a frozen random encoder says where
        # things are (at BLIP's 0.02 scale the shapes' positions are nearly invisible to a random tiny model).
        torch.nn.init.normal_(model.vision_model.embeddings.position_embedding, std=0.5)
    model.generation_config.max_length = GENERATION_DEFAULTS.max_length
    # Not save_pretrained: it writes weights only on distributed rank 0, and every machine of a multi-node job
    # (each with its own cache, whichever starts first) must be able to generate its builtin.
    from safetensors.torch import save_model

    save_model(model, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    processor.save_pretrained(directory)
