"""Vision features computed once per image, not once per epoch (`cache_vision_features: true`).

"Vision features" is this concept's one name: the recipe key `cache_vision_features`, the store tensor the encoder
holds as `vision_features` (adapt.AdaptedVisionModel), the datasets' `vision_features` flag and the collator's
`VISION_FEATURES_ROW` item key.

When the vision encoder trains nothing (frozen_vision, or LoRA adapters on the text decoder only) and images are not
augmented, its output for an image never changes. The encoder then runs once over the training images before the
first step, into one (images, patches + 1, width) tensor (the "store"): on the training device when it fits in half
of the free device memory, else in host memory. Training items carry their image's row in the store instead of
pixels (CaptionCollator puts the rows where pixel_values go, so the Trainer, DDP and torch.compile see the model's
usual signature), and the vision encoder, given integer rows instead of an image batch (adapt.is_feature_rows),
returns the stored rows.
Evaluation and generation pass pixels and run the encoder as usual.

The store holds the encoder output in the dtype the text decoder consumes it in: under bf16/fp16 autocast the
cross-attention key/value projections cast it to that dtype anyway, so frozen_vision computes exactly what it would
without the cache (LoRA dropout on those projections' input sees the features rounded first: a bf16 rounding).
"""

import logging
import math
import os
import time

import torch

from .adapt import attach_vision_features, unwrap_blip

logger = logging.getLogger(__name__)

DEVICE_MEMORY_SHARE = 0.5  # of free device memory; the rest is left to training (activations, optimizer state)
HOST_MEMORY_SHARE = 0.7  # of available host memory


class VisionFeaturesError(ValueError):
    """The cache cannot be used in this run; the message says why and what to change."""


def store_shape(vision_config, images: int) -> tuple[int, int, int]:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return images, patches + 1, vision_config.hidden_size


def choose_store_device(nbytes: int, device: torch.device) -> torch.device:
    """The training device when the store fits in its share of free memory, else the host; an error if neither."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= DEVICE_MEMORY_SHARE * free:
            return device
    host = _available_host_memory()
    if host is None or nbytes <= HOST_MEMORY_SHARE * host:
        return torch.device("cpu")
    raise VisionFeaturesError(
        f"cache_vision_features: the features need {nbytes / 2**30:.1f} GiB, more than the device and host memory "
        f"can spare ({host / 2**30:.1f} GiB available on the host); set cache_vision_features: false, or use "
        "max_train_samples"
    )


def _available_host_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_vision_is_frozen(model) -> None:
    vision = unwrap_blip(model).vision_model
    trainable = [f"vision_model.{name}" for name, p in vision.named_parameters() if p.requires_grad]
    if trainable:
        raise VisionFeaturesError(
            f"cache_vision_features needs a vision encoder that does not train, but {len(trainable)} of its "
            f"parameters do (e.g. {trainable[0]}); use training_mode: frozen_vision, or LoRA targets outside the "
            "vision encoder"
        )


@torch.no_grad()
def encode_images(
    vision_model,
    dataset,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    batch_size: int,
    num_workers: int = 0,
    process_index: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """The encoder's last hidden state for every image of `dataset` (items with uint8 "pixel_values"), in order.

    Under data parallelism each process encodes every world_size-th image and the shards are exchanged, so every
    process ends up with the whole store.
    """
    from torch.utils.data import DataLoader, Subset

    config = vision_model.config
    shape = store_shape(config, len(dataset))
    dtype = autocast_dtype or next(vision_model.parameters()).dtype
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    store_device = choose_store_device(nbytes, device)
    store = torch.empty(shape, dtype=dtype, device=store_device)
    own = list(range(process_index, len(dataset), world_size))
    logger.info(
        "encoding %d training images once (%d on this process): %.2f GiB of vision features in %s memory",
        len(dataset), len(own), nbytes / 2**30, "device" if store_device.type != "cpu" else "host",
    )  # fmt: skip
    per_process = math.ceil(len(dataset) / world_size)
    own = own or [0]  # fewer images than processes: a process with none still takes part in every exchange
    own += own[-1:] * (per_process - len(own))  # equal shards for all_gather; the repeats are dropped
    # Its own generator: a loader otherwise draws its worker seed from the global RNG, and training (dropout, LoRA
    # dropout) must see the same random stream with or without the cache.
    loader = DataLoader(
        Subset(dataset, own), batch_size=batch_size, num_workers=num_workers, collate_fn=_stack_pixels,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    was_training = vision_model.training
    vision_model.eval()
    started = time.perf_counter()
    start = 0
    from tqdm.auto import tqdm

    for pixels in tqdm(loader, desc="encoding vision features", disable=process_index != 0, leave=False):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            features = vision_model(pixel_values=pixels.to(device, non_blocking=True)).last_hidden_state
        features = features.to(dtype)
        count = len(features)
        if world_size == 1:
            store[start : start + count].copy_(features)  # blocking: a non_blocking D2H copy could be read early
        else:
            _exchange(store, features, start, world_size)
        start += count
    vision_model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    rate = len(dataset) / max(seconds, 1e-9)
    logger.info("encoded %d images in %.1f s (%.0f images/s)", len(dataset), seconds, rate)
    return store


def _exchange(store: torch.Tensor, features: torch.Tensor, start: int, world_size: int) -> None:
    """Gather one batch of every process's shard; process p's i-th image is image p + i * world_size."""
    import torch.distributed as dist

    on_backend = features if dist.get_backend() != "gloo" else features.cpu()
    gathered = [torch.empty_like(on_backend) for _ in range(world_size)]
    dist.all_gather(gathered, on_backend.contiguous())
    for process, shard in enumerate(gathered):
        positions = torch.arange(start, start + len(shard)) * world_size + process
        keep = positions < len(store)
        store[positions[keep].to(store.device)] = shard[keep.to(shard.device)].to(store.device)


def _stack_pixels(items: list[dict]) -> torch.Tensor:
    return torch.stack([item["pixel_values"] for item in items])


def cache_vision_features(model, dataset, device: torch.device, **encode_options) -> torch.Tensor:
    """Encode `dataset`'s images once with `model`'s (frozen) vision encoder and make the encoder answer store rows.

    `encode_options` are encode_images' autocast_dtype, batch_size, num_workers, process_index and world_size.
    """
    check_vision_is_frozen(model)
    vision = unwrap_blip(model).vision_model
    vision.to(device)
    store = encode_images(vision, dataset, device, **encode_options)
    attach_vision_features(model, store)
    return store
