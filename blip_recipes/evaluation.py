"""Caption generation and the files every evaluation writes (predictions, per-image scores, caption grids)."""

import json
import logging
import math
import os

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .adapt import CACHE_ARGUMENT, SharedImages, takes_shared_images, unwrap_blip
from .choices import GENERATION_DEFAULTS
from .metrics import MetricsError, score_captions
from .model import (
    check_decoding,
    check_model_source,
    check_tokenizer,
    decoding_settings,
    load_model,
    load_processor,
    text_positions,
)
from .transforms import ImageTransform

logger = logging.getLogger(__name__)


class BeamSharedCrossAttentionCache(EncoderDecoderCache):
    """Beam search reorders every cached tensor at every step. The cross-attention keys and values of all beams of
    one image are the same (they attend to the same image) and beams are only ever reordered within their image, so
    the cross-attention part is never reordered: with SDPA it holds one row per image (decode hands the decoder
    SharedImages), which a reorder by beam would break; with eager attention one row per beam, where reordering
    changes nothing and would copy beams x image tokens x width x layers per step."""

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.self_attention_cache.reorder_cache(beam_idx)


@torch.no_grad()
def generate_caption_ids(
    model,
    pixel_values: torch.Tensor,
    prefix_ids: torch.Tensor,
    num_beams: int = GENERATION_DEFAULTS.num_beams,
    max_length: int = GENERATION_DEFAULTS.max_length,
    min_length: int = GENERATION_DEFAULTS.min_length,
) -> torch.Tensor:
    """New tokens after `prefix_ids` ([DEC] + prompt). The vision encoder runs once per image, before beams fan out.

    Lengths count the prefix, as LAVIS and BlipForConditionalGeneration.generate count them.
    """
    # Under FSDP2 the parameters outside the layer units (patch embedding, layer norms) are gathered by the root
    # module's forward, which generation bypasses (it calls the encoder and the decoder's generate directly).
    root = _fsdp_root(model)
    if root is not None:
        root.unshard()
    try:
        return _generate(unwrap_blip(model), pixel_values, prefix_ids, num_beams, max_length, min_length)
    finally:
        if root is not None:
            root.reshard()


def _fsdp_root(model):
    """The outermost FSDP2 module on the way from `model` to BLIP (a PeftModel is sharded as a whole), or None."""
    from torch.distributed.fsdp import FSDPModule

    while model is not None:
        if isinstance(model, FSDPModule):
            return model
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None) or (
            model.get_base_model() if hasattr(model, "get_base_model") else None
        )  # fmt: skip
    return None


def _generate(blip, pixel_values, prefix_ids, num_beams, max_length, min_length) -> torch.Tensor:
    image_embeds = blip.vision_model(pixel_values=pixel_values).last_hidden_state
    return decode(blip, image_embeds, prefix_ids, max_length, min_length, num_beams=num_beams)


def decode(blip, image_embeds, prefix_ids, max_length: int, min_length: int, num_beams: int = 1,
           **search) -> torch.Tensor:  # fmt: skip
    """New tokens after `prefix_ids` from BLIP's text decoder over already encoded images: greedy, beam search (with
    the beam-shared cross-attention cache), or whatever `search` asks of `generate` (sampling, several sequences).
    With several beams or sequences per image, SDPA cross-attention projects each image's keys/values once."""
    text_config = blip.config.text_config
    rows_per_image = max(num_beams, search.get("num_return_sequences", 1))
    cache = BeamSharedCrossAttentionCache(DynamicCache(), DynamicCache()) if rows_per_image > 1 else None
    encoder_hidden_states = image_embeds
    if rows_per_image > 1 and takes_shared_images(blip):
        # generate() repeats every tensor argument once per beam or sample; SharedImages is not a tensor, so each image
        # stays one row and the SDPA cross-attention projects and caches its keys/values once for all its beams or
        # samples (1/rows_per_image of that work and of the cross-attention cache), attending them as before.
        index = SharedImages.consecutive(image_embeds.shape[0], rows_per_image, image_embeds.device)
        encoder_hidden_states = SharedImages(image_embeds, index)
    # No encoder_attention_mask: every image token is real, and without a mask SDPA can use its fastest kernel.
    output = blip.text_decoder.generate(
        input_ids=prefix_ids,
        encoder_hidden_states=encoder_hidden_states,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        bos_token_id=text_config.bos_token_id,
        num_beams=num_beams,
        max_length=max_length,
        min_length=min_length,
        use_cache=True,
        **{"do_sample": False, CACHE_ARGUMENT: cache, **search},
    )
    return output[:, prefix_ids.shape[1] :]


class Captioner:
    """A fine-tuned model (full, or a LoRA adapter on its base) that captions PIL images in batches.

    Decoding settings (beams, lengths, prompt) default to the ones saved with the model (the recipe's); an argument
    that is not None overrides its setting. Runs on a GPU when there is one (bf16 autocast), else on the CPU.
    """

    def __init__(
        self, model_name_or_path: str, prompt: str | None = None, num_beams: int | None = None,
        max_length: int | None = None, min_length: int | None = None, device: str | None = None,
        revision: str = "main",
    ):  # fmt: skip
        from .collator import CaptionCollator

        self.name = model_name_or_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_model_source(model_name_or_path, revision)
        self.processor = load_processor(model_name_or_path, revision)
        image_processor = self.processor.image_processor
        self.model = load_model(
            model_name_or_path, revision, image_mean=image_processor.image_mean, image_std=image_processor.image_std
        )
        check_tokenizer(self.processor.tokenizer, self.model, model_name_or_path)
        self.model.to(self.device).eval()
        given = {"num_beams": num_beams, "max_length": max_length, "min_length": min_length, "prompt": prompt}
        self.decoding = {**decoding_settings(self.model), **{k: v for k, v in given.items() if v is not None}}
        check_decoding(self.processor.tokenizer, self.decoding, max_positions=text_positions(self.model),
                       keys={key: f"--{key}" for key in self.decoding})  # fmt: skip
        self.transform = ImageTransform(
            image_processor.size["height"], image_processor.size["width"], image_processor.resample
        )
        bos = unwrap_blip(self.model).config.text_config.bos_token_id
        self.prompt = CaptionCollator(self.processor.tokenizer, bos_token_id=bos, prompt=self.decoding["prompt"])

    @torch.no_grad()
    def caption(self, images) -> list[str]:
        pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        prefix = self.prompt.prompt_ids(len(images), device=self.device)
        decoding = self.decoding
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            ids = generate_caption_ids(
                self.model, pixels, prefix, decoding["num_beams"], decoding["max_length"], decoding["min_length"]
            )
        return decode_captions(self.processor.tokenizer, ids)


def decode_captions(tokenizer, token_ids) -> list[str]:
    return [" ".join(text.split()) for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def write_jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def read_predictions(path: str) -> tuple[list[str], list[str], list[list[str]]]:
    """A predictions JSONL -> (image ids, predictions, references); names the line of any malformed row."""
    ids, predictions, references = [], [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prediction, refs = row["prediction"], row["references"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with prediction and references ({error})"
                ) from None
            if isinstance(refs, str):
                refs = [refs]
            if not isinstance(prediction, str) or not refs or not all(isinstance(ref, str) for ref in refs):
                raise ValueError(f"{path}:{number}: prediction must be text and references a non-empty list of text")
            ids.append(str(row.get("image_id", number)))
            predictions.append(prediction)
            references.append(list(refs))
    if not predictions:
        raise ValueError(f"{path}: no predictions")
    return ids, predictions, references


def score_and_write(
    output_dir: str,
    image_ids: list[str],
    predictions: list[str],
    references: list[list[str]],
    metrics,
    load_image=None,
    grid_size: int = 6,
    title: str = "",
) -> tuple[dict, dict]:
    """Score, then write metrics.json, predictions.jsonl (with per-image scores) and caption grid PNGs.

    Returns (metrics, written paths). A METEOR failure is reported as meteor=NaN with the error logged; the
    other metrics and files are still produced.
    """
    try:
        corpus, per_image = score_captions(predictions, references, metrics)
    except MetricsError as error:
        if "meteor" not in metrics:
            raise
        logger.error("METEOR failed, reporting meteor=NaN and scoring the other metrics: %s", error)
        corpus, per_image = score_captions(predictions, references, [name for name in metrics if name != "meteor"])
        corpus["meteor"] = float("nan")
    os.makedirs(output_dir, exist_ok=True)
    paths = {"predictions": os.path.join(output_dir, "predictions.jsonl")}
    write_jsonl(
        paths["predictions"],
        (
            {"image_id": i, "prediction": p, "references": r, "scores": s}
            for i, p, r, s in zip(image_ids, predictions, references, per_image)
        ),
    )
    paths["metrics"] = os.path.join(output_dir, "metrics.json")
    with open(paths["metrics"], "w", encoding="utf-8") as handle:
        json.dump(corpus, handle, indent=2)
    if load_image is not None and grid_size > 0:
        sample = evenly_spaced(len(predictions), grid_size)
        order = "cider" if "cider" in corpus else next(iter(corpus))
        worst = sorted(range(len(predictions)), key=lambda index: per_image[index].get(order, 0.0))[:grid_size]
        for name, indices in (("caption_grid", sample), ("worst_captions", worst)):
            paths[name] = os.path.join(output_dir, f"{name}.png")
            render_caption_grid(
                paths[name],
                [load_image(index) for index in indices],
                [predictions[index] for index in indices],
                [references[index][0] for index in indices],
                [per_image[index].get(order) for index in indices],
                score_name=order,
                title=f"{title} ({name.replace('_', ' ')})".strip(),
            )
    return corpus, paths


def evenly_spaced(count: int, wanted: int) -> list[int]:
    wanted = min(count, wanted)
    return sorted({int(i * count / wanted) for i in range(wanted)}) if wanted else []


def render_caption_grid(path, images, predictions, first_references, scores, score_name="cider", title=""):
    """The notebook's 2x3 matplotlib figure, done properly: prediction, a reference and the per-image score."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    columns = min(3, len(images))
    rows = math.ceil(len(images) / columns)
    figure = plt.figure(figsize=(5 * columns, 5.2 * rows))
    for position, (image, prediction, reference, score) in enumerate(
        zip(images, predictions, first_references, scores), start=1
    ):
        axis = figure.add_subplot(rows, columns, position)
        axis.imshow(image)
        axis.axis("off")
        score_text = f"{score_name}: {score:.3f}" if score is not None else ""
        text = f"pred: {prediction or '(empty)'}\nref: {reference}\n{score_text}"
        axis.set_title("\n".join(textwrap.fill(line, 48) for line in text.split("\n")), fontsize=9, loc="left")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
