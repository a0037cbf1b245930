"""Image decoding and transforms: any stored image -> RGB PIL -> uint8 CHW tensor at the model's size.

Images stay uint8 here and in the collator; the model's vision encoder normalises whole batches on its own device
(adapt.AdaptedVisionModel): one vectorised op instead of one per image, and uint8 tensors cross process boundaries
at a quarter of the bytes of float32.
"""

import io
import math
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from .choices import MAX_IMAGE_PIXELS

URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class BadImageError(ValueError):
    """An image that cannot be used; the message says why in a few words."""


def open_image(source, image_root: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `source` (PIL image, path, bytes, or datasets' {'bytes', 'path'} dict) into an RGB PIL image.

    An image that declares more than `max_pixels` pixels is refused from its header, before decoding.
    """
    try:
        image = _open(source, image_root)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if image.width * image.height > max_pixels:
                raise BadImageError(
                    f"decompression bomb refused: too many pixels ({image.width}x{image.height} = "
                    f"{image.width * image.height:,}, limit {max_pixels:,})"
                )
            image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(f"decompression bomb refused ({error})") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"truncated or corrupt image ({error})") from None


def _open(source, image_root: str | None) -> Image.Image:
    # PIL's own bomb check (a warning above its limit, an error above twice it) stays as a second line; open_image
    # compares the header with the caller's limit before decoding.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS)
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes"):
            return Image.open(io.BytesIO(source["bytes"]))
        source = source.get("path")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImageError("empty image bytes")
        return Image.open(io.BytesIO(source))
    if not isinstance(source, str) or not source:
        raise BadImageError(f"no image (got {type(source).__name__})")
    if URL.match(source):  # many Hub datasets list image URLs; read as a path it was "not found" under image_root
        raise BadImageError(f"{source} is a URL: images are read from files, never downloaded (download them first "
                            "and name the files in the image column)")  # fmt: skip
    path = resolve_image_path(source, image_root)
    if not os.path.exists(path):
        raise BadImageError(f"file not found: {path}")
    if os.path.getsize(path) == 0:
        raise BadImageError(f"empty file: {path}")
    return Image.open(path)


def resolve_image_path(path: str, image_root: str | None) -> str:
    if image_root and not os.path.isabs(path):
        return os.path.join(image_root, path)
    return path


def to_rgb(image: Image.Image) -> Image.Image:
    """Every PIL mode to RGB the way a viewer shows it: transparency over white, 16-bit scaled, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(image), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit / 32-bit greyscale -> uint8, scaled so that white stays white, in memory proportional to the image
    (in-place integer arithmetic for 16-bit: about 7 bytes a pixel at the peak, where a float64 detour took 24)."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        wide = array.astype(np.uint32)
        wide *= 255
        wide //= 65535
        return wide.astype(np.uint8)
    top = 65535.0 if array.max() > 255 else 255.0
    scaled = array.astype(np.float32)
    scaled *= np.float32(255.0 / top)
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


def normalize_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised as the BLIP image processor does (rescale 1/255, then mean/std)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float().div_(255.0) - mean).div_(std)


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class ImageTransform:
    """RGB PIL image -> uint8 tensor (3, height, width); `augmentation='blip'` is LAVIS' blip_image_train."""

    def __init__(self, height: int, width: int, resample: int = Image.BICUBIC, augmentation: str = "none"):
        self.size = (height, width)
        self.resample = int(resample)
        self.augmentation = augmentation

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.augmentation == "blip":
            image = random_resized_crop(image, self.size, scale=(0.5, 1.0), resample=self.resample)
            if _uniform() < 0.5:
                image = ImageOps.mirror(image)
            image = rand_augment(image, num_ops=2, magnitude=5)
        elif image.size != (self.size[1], self.size[0]):
            image = image.resize((self.size[1], self.size[0]), resample=self.resample)
        return pil_to_uint8_tensor(image)


def _uniform(low: float = 0.0, high: float = 1.0) -> float:
    # torch's RNG, not `random`: the Trainer saves and restores it, so resumed runs augment identically.
    return low + (high - low) * torch.rand(()).item()


def random_resized_crop(image, size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), resample=Image.BICUBIC):
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(_uniform(0, height - crop_h + 1))
            left = int(_uniform(0, width - crop_w + 1))
            break
    else:  # fall back to a centre crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < ratio[0]:
            crop_w, crop_h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            crop_h, crop_w = height, int(round(height * ratio[1]))
        else:
            crop_w, crop_h = width, height
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return image.resize((size[1], size[0]), resample=resample, box=box)


_FILL = (128, 128, 128)


def _signed(value: float) -> float:
    return -value if _uniform() > 0.5 else value


def _affine(image, matrix):
    return image.transform(image.size, Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=_FILL)


# LAVIS RandomAugment(2, 5): each of two drawn ops applies with probability 0.5; levels scale with magnitude/10.
_RAND_AUGMENT_OPS = {
    "Identity": lambda image, level: image,
    "AutoContrast": lambda image, level: ImageOps.autocontrast(image),
    "Equalize": lambda image, level: ImageOps.equalize(image),
    "Brightness": lambda image, level: ImageEnhance.Brightness(image).enhance(level * 1.8 + 0.1),
    "Sharpness": lambda image, level: ImageEnhance.Sharpness(image).enhance(level * 1.8 + 0.1),
    "ShearX": lambda image, level: _affine(image, (1, _signed(level * 0.3), 0, 0, 1, 0)),
    "ShearY": lambda image, level: _affine(image, (1, 0, 0, _signed(level * 0.3), 1, 0)),
    "TranslateX": lambda image, level: _affine(image, (1, 0, _signed(level * 10.0), 0, 1, 0)),
    "TranslateY": lambda image, level: _affine(image, (1, 0, 0, 0, 1, _signed(level * 10.0))),
    "Rotate": lambda image, level: image.rotate(_signed(level * 30.0), fillcolor=_FILL),
}


def rand_augment(image, num_ops: int = 2, magnitude: int = 5):
    names = list(_RAND_AUGMENT_OPS)
    level = magnitude / 10.0
    for _ in range(num_ops):
        name = names[int(torch.randint(len(names), ()).item())]
        if _uniform() < 0.5:
            image = _RAND_AUGMENT_OPS[name](image, level)
    return image
