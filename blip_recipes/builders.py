"""Builders: a parsed recipe -> data, datasets, model, collator, trainer.

Two entry points, one per job: `build_trainer` (training: the training_mode decides what trains) and
`build_evaluator` (scoring a finished model: no train split, nothing trainable, decoding settings from the model).
The builders below them take flat arguments, so a script or test can assemble a run from parts.
"""

import dataclasses
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .choices import GENERATION_DEFAULTS
from .collator import CaptionCollator
from .config import Recipe, extra_evaluation_datasets, extra_training_datasets, scores_captions, wants_evaluation
from .data import (
    CaptionData,
    CaptionEvalDataset,
    CaptionSplit,
    CaptionTrainDataset,
    DataError,
    ResizedImageCache,
    image_cache_dir,
    training_pairs,
)
from .data.datasets import image_positions_per_epoch
from .data.records import (
    check_images,
    collect_extra_evaluation,
    collect_extra_training,
    collect_splits,
    collect_with_eval_dataset,
    copied_training_images,
    drop_bad_rows,
    mix_training_splits,
)
from .model import (
    apply_training_mode,
    check_decoding,
    check_model_source,
    check_tokenizer,
    decoding_settings,
    load_model,
    load_processor,
    parameter_counts,
    recipe_decoding,
    set_decoding,
    text_positions,
)
from .trainer import CaptionTrainer
from .transforms import ImageTransform
from .vision_features import cache_vision_features

logger = logging.getLogger("blip_recipes")


@dataclass
class CaptionDatasets:
    train: CaptionTrainDataset | None
    evaluation: CaptionEvalDataset | None
    test: CaptionEvalDataset | None
    extra_evaluation: dict[str, CaptionEvalDataset] = dataclasses.field(default_factory=dict)


def load_data(recipe: Recipe, need_train: bool) -> CaptionData:
    """The recipe's splits, loaded (process 0 first: it fills the datasets cache the others read) and checked once
    per job (the processes share the image decoding; the result is cached for later runs)."""
    data_args, training = recipe.data, recipe.training
    if data_args.image_root and not os.path.isdir(data_args.image_root):  # else every row is "file not found"
        raise DataError(f"image_root {data_args.image_root}: no such directory (the image column's relative paths "
                        "are read under it)")  # fmt: skip
    # The scored splits (eval_split, test_split) are eval_dataset_name's when it is set, else dataset_name's.
    # Columns and image_root are shared; dataset_config_name and dataset_revision are dataset_name's own.
    scored_args = data_args
    if data_args.eval_dataset_name is not None:
        scored_args = dataclasses.replace(data_args, dataset_name=data_args.eval_dataset_name)
        if data_args.eval_dataset_name != data_args.dataset_name:
            scored_args = dataclasses.replace(scored_args, dataset_config_name=None, dataset_revision=None)
    # extra_eval_datasets are scored beside the evaluation split: at each evaluation of a training run, and by
    # `evaluate` given the run's recipe (which drops them when told another dataset to score)
    extra_scored = extra_evaluation_datasets(data_args) if wants_evaluation(training) or not need_train else []
    if data_args.streaming:  # the training split streams (build_stream)
        if need_train and not scores_captions(recipe):
            return CaptionData(None, None, None)
        need_train = False
    need_eval = not need_train or wants_evaluation(training)
    with training.main_process_first(desc="loading the dataset"):
        if not need_train:
            data, bad_rows = collect_splits(scored_args, training.seed, need_eval=need_eval, need_train=False)
        elif scored_args is data_args:
            data, bad_rows = collect_splits(data_args, training.seed, need_eval=need_eval, need_train=True)
        else:
            data, bad_rows = collect_with_eval_dataset(data_args, scored_args, training.seed, need_eval)
        mixture = extra_training_datasets(data_args) if need_train else []
        if mixture:
            data.extra_train, extra_bad = collect_extra_training(data_args, mixture, training.seed,
                                                                 data.scored_splits())  # fmt: skip
            bad_rows += extra_bad
        if extra_scored:
            trained = [split for split in (data.train, *data.extra_train) if split is not None]
            data.extra_evaluation, extra_bad = collect_extra_evaluation(data_args, extra_scored, training.seed,
                                                                        trained)  # fmt: skip
            bad_rows += extra_bad
    if data_args.validate_images:
        progress = training.local_process_index == 0 and not training.disable_tqdm
        bad_rows += check_images(data, data_args.preprocessing_num_workers, training.process_index,
                                 training.world_size, progress)  # fmt: skip
        bad_rows += copied_training_images(data, bad_rows)
    source = scored_args.dataset_name if not need_train else data_args.dataset_name
    if need_train and (scored_args is not data_args or mixture or extra_scored):  # each bad row names its split
        source = ", ".join([data_args.dataset_name, *(extra.dataset_name for extra in mixture)]) + " (training)"
        scored_names = [scored_args.dataset_name] if scored_args is not data_args else []
        scored_names += [extra.dataset_name for extra in extra_scored]
        if scored_names:
            source += f", {', '.join(scored_names)} (evaluation)"
    data = drop_bad_rows(data, bad_rows, data_args, source)
    return mix_training_splits(data, [extra.repeat for extra in mixture])


def image_transform(image_processor, augmentation: str = "none") -> ImageTransform:
    size = image_processor.size
    return ImageTransform(size["height"], size["width"], image_processor.resample, augmentation=augmentation)


def resized_image_cache(split: CaptionSplit | None, transform: ImageTransform, enabled: bool, workers=None,
                        main_process_first=nullcontext):  # fmt: skip
    """The split's resized-image cache when enabled and the transform is deterministic, else None."""
    if not enabled or split is None or transform.augmentation != "none":
        return None
    with main_process_first(desc="caching resized images"):
        return ResizedImageCache.build(split, transform, image_cache_dir(), workers)


def build_datasets(
    data: CaptionData, image_processor, caption_preprocessing: str = "none", image_augmentation: str = "none",
    image_cache: bool = False, vision_features: bool = False, workers: int | None = None,
    main_process_first=nullcontext, group_by_image: bool = False,
) -> CaptionDatasets:  # fmt: skip
    """Training pairs (pixels, or rows of the vision-features store; naming their image with `group_by_image`) and
    one-item-per-image evaluation sets."""
    plain = image_transform(image_processor)

    def evaluation_set(split):
        if split is None:
            return None
        return CaptionEvalDataset(split, plain, resized_image_cache(split, plain, image_cache, workers,
                                                                    main_process_first))  # fmt: skip

    train = None
    if data.train is not None:
        augmented = image_transform(image_processor, image_augmentation)
        pixels = None if vision_features else resized_image_cache(
            data.train, augmented, image_cache, workers, main_process_first
        )  # fmt: skip
        train = CaptionTrainDataset(data.train, augmented, caption_preprocessing, pixels, vision_features,
                                    group_by_image)  # fmt: skip
    extra = {name: evaluation_set(split) for name, split in data.extra_evaluation.items()}
    datasets = CaptionDatasets(train, evaluation_set(data.evaluation), evaluation_set(data.test), extra)
    sizes = [len(d) if d else "no" for d in (datasets.train, datasets.evaluation, datasets.test)]
    logger.info("data: %s training captions, %s evaluation images, %s test images%s", *sizes,
                "".join(f", {len(dataset)} {name} images" for name, dataset in extra.items()))  # fmt: skip
    return datasets


def build_stream(data_args, image_processor, seed: int, process_index: int = 0, num_processes: int = 1):
    """The streaming training split (data/streaming.py): endless items, split over processes and workers."""
    import os

    from .data.streaming import CaptionStream, stream_shards

    shards = stream_shards(data_args)
    image_root = data_args.image_root
    if image_root is None and os.path.isfile(data_args.dataset_name):  # paths in a JSON/CSV file: next to it
        image_root = os.path.dirname(os.path.abspath(data_args.dataset_name))
    logger.info("data: streaming %d shards of %s over %d processes, shuffle buffer %d", len(shards),
                data_args.dataset_name, num_processes, data_args.shuffle_buffer_size)  # fmt: skip
    return CaptionStream(
        shards, image_transform(image_processor, data_args.image_augmentation), seed, process_index, num_processes,
        data_args.shuffle_buffer_size, data_args.caption_preprocessing, image_root, data_args.max_image_pixels,
        data_args.max_bad_samples_fraction,
    )  # fmt: skip


def build_model(
    model_name_or_path: str, image_processor, revision: str = "main", torch_dtype: str = "float32",
    attn_implementation: str = "sdpa", training_mode: str | None = None, lora_r: int = 16, lora_alpha: int = 32,
    lora_dropout: float = 0.05, lora_target_modules=("query", "key", "value"), seed: int | None = None,
):  # fmt: skip
    """The adapted BLIP (adapt.py); with `training_mode`, made trainable as that mode says, else nothing trains."""
    model = load_model(
        model_name_or_path, revision, torch_dtype, attn_implementation, lora_trainable=training_mode == "lora",
        image_mean=image_processor.image_mean, image_std=image_processor.image_std,
        merge_adapter=training_mode in ("full", "frozen_vision"),
    )  # fmt: skip
    if training_mode is None:
        return model.requires_grad_(False)
    model = apply_training_mode(model, training_mode, lora_r, lora_alpha, lora_dropout, lora_target_modules, seed)
    trainable, total = parameter_counts(model)
    logger.info("training_mode=%s: %s of %s parameters train (%.2f%%)", training_mode, f"{trainable:,}",
                f"{total:,}", 100.0 * trainable / total)  # fmt: skip
    return model


def build_collator(processor, model, prompt: str, max_caption_length: int, pad_to_multiple_of: int | None):
    return CaptionCollator(
        processor.tokenizer,
        bos_token_id=model.config.text_config.bos_token_id,
        prompt=prompt,
        max_length=max_caption_length,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def _trainer_arguments(training_args, **changes):
    """The Trainer gets push_to_hub off: its own Hub code would create the repo at start-up and upload checkpoint
    folders; publishing is hub.py's job (allow-listed files, a real model card)."""
    if training_args.push_to_hub:
        changes["push_to_hub"] = False
    return dataclasses.replace(training_args, **changes) if changes else training_args


def build_trainer(recipe: Recipe, callbacks=(), data: CaptionData | None = None) -> CaptionTrainer:
    """Everything a training run needs. `data` replaces loading `dataset_name` (callers that assemble splits)."""
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    with training_args.main_process_first(desc="loading the processor"):  # process 0 generates builtin:tiny-blip
        processor = load_processor(model_args.model_name_or_path, model_args.model_revision)
    decoding = recipe_decoding(training_args.generation_num_beams, training_args.generation_max_length,
                               training_args.generation_min_length, data_args.prompt)  # fmt: skip
    # The prompt's tokens against the lengths now, before any image is decoded; the decoder's positions once loaded.
    check_decoding(processor.tokenizer, decoding, data_args.max_caption_length)
    data = data if data is not None else load_data(recipe, need_train=True)
    if data.train is not None and training_args.process_index == 0:  # before the image cache and the model load
        captions = [caption for _, caption in training_pairs(data.train, data_args.caption_preprocessing)]
        report_caption_lengths(captions, processor.tokenizer, data_args.prompt, data_args.max_caption_length,
                               decoding["max_length"])  # fmt: skip
        report_prompt_in_captions(captions, data_args.prompt)
    datasets = build_datasets(
        data, processor.image_processor, data_args.caption_preprocessing, data_args.image_augmentation,
        data_args.image_cache, model_args.cache_vision_features, data_args.preprocessing_num_workers,
        training_args.main_process_first, training_args.group_captions_by_image,
    )  # fmt: skip
    model = build_model(
        model_args.model_name_or_path, processor.image_processor, model_args.model_revision, model_args.torch_dtype,
        model_args.attn_implementation, model_args.training_mode, model_args.lora_r, model_args.lora_alpha,
        model_args.lora_dropout, model_args.lora_target_modules, training_args.seed,
    )  # fmt: skip
    check_tokenizer(processor.tokenizer, model, model_args.model_name_or_path)
    check_decoding(processor.tokenizer, decoding, data_args.max_caption_length, text_positions(model))
    set_decoding(model, **decoding)
    if model_args.cache_vision_features:
        encode_vision_features(model, data.train, processor.image_processor, training_args, data_args.image_cache)
    train_dataset, changes, scst = datasets.train, {}, None
    collator = build_collator(processor, model, data_args.prompt, data_args.max_caption_length,
                              data_args.pad_to_multiple_of)  # fmt: skip
    if training_args.training_objective == "scst":  # one item per image; the loss samples its captions
        train_dataset = CaptionEvalDataset(data.train, datasets.train.transform, datasets.train.cache,
                                           model_args.cache_vision_features)  # fmt: skip
        positions = image_positions_per_epoch(data.train)
        if len(positions) != len(train_dataset):  # extra_train_datasets' SOURCE*K: images repeated per epoch
            train_dataset = torch.utils.data.Subset(train_dataset, positions)
        scst = build_scst_loss(data.train, processor.tokenizer, collator, training_args)
    if data_args.streaming:
        seed = training_args.data_seed or training_args.seed
        train_dataset = build_stream(data_args, processor.image_processor, seed, training_args.process_index,
                                     training_args.world_size)  # fmt: skip
        changes["ignore_data_skip"] = True  # the stream restores its own position; the Trainer's skip would decode
    check_one_whole_batch(train_dataset, training_args)
    return CaptionTrainer(
        model=model, args=_trainer_arguments(training_args, **changes), train_dataset=train_dataset,
        eval_dataset=datasets.evaluation, test_dataset=datasets.test, processing_class=processor,
        caption_collator=collator, callbacks=list(callbacks), scst=scst, extra_eval_datasets=datasets.extra_evaluation,
    )  # fmt: skip


CAPTION_LENGTH_SAMPLE = 20_000  # captions measured at most (600k COCO captions take ~50 s to tokenize on 2 cores)
TOO_LONG_TO_GENERATE = 0.25  # share of training captions longer than generation_max_length worth a warning (COCO
# Karpathy under LAVIS' 20 tokens, prompt included, has a few percent: the published setting, not a mistake)


def report_caption_lengths(
    captions: list[str], tokenizer, prompt: str, max_caption_length: int, generation_max_length: int
) -> dict:
    """Logs the training captions' lengths in decoder tokens ([DEC] + prompt + caption + [SEP], what both length
    limits count), and warns about what the limits do silently: a longer caption is cut to max_caption_length (its
    end never learned); generation stops at generation_max_length, so a model trained on longer captions is scored
    on cut ones. Returns the numbers logged."""
    import random

    if not captions:
        return {}
    sample = captions
    if len(captions) > CAPTION_LENGTH_SAMPLE:
        sample = random.Random(0).sample(captions, CAPTION_LENGTH_SAMPLE)
    encoded = tokenizer([prompt + caption for caption in sample], add_special_tokens=True, verbose=False)
    lengths = sorted(len(ids) for ids in encoded["input_ids"])
    cut = sum(length > max_caption_length for length in lengths)
    too_long = sum(length > generation_max_length for length in lengths)
    numbers = {"median": lengths[len(lengths) // 2], "p95": lengths[int(0.95 * (len(lengths) - 1))],
               "longest": lengths[-1], "cut": cut, "too_long_to_generate": too_long}  # fmt: skip
    measured = f"{len(captions):,}"
    if len(sample) < len(captions):
        measured = f"a sample of {len(sample):,} of {len(captions):,}"
    logger.info("training captions (%s): %d tokens median, %d at the 95th percentile, %d the longest ([DEC] + "
                "prompt + caption + [SEP])", measured, numbers["median"], numbers["p95"], lengths[-1])  # fmt: skip
    if cut:
        logger.warning("%s of %s training captions (%.1f%%) have more than max_caption_length %d tokens (the "
                       "longest %d): each is trained on its first %d tokens only (and not taught to end there); "
                       "raise max_caption_length to train them whole", f"{cut:,}", measured, 100 * cut / len(sample),
                       max_caption_length, lengths[-1], max_caption_length)  # fmt: skip
    if too_long > TOO_LONG_TO_GENERATE * len(sample):
        logger.warning("%.1f%% of %s training captions have more than generation_max_length %d tokens: generated "
                       "captions stop there, shorter than the references they are scored against; raise "
                       "generation_max_length", 100 * too_long / len(sample), measured,
                       generation_max_length)  # fmt: skip
    return numbers


PROMPT_IN_CAPTIONS = 0.5  # share of training captions starting with the prompt worth a warning


def report_prompt_in_captions(captions: list[str], prompt: str) -> float:
    """Warns when most training captions already begin with the prompt (captions written as "a picture of a dog"
    with prompt "a picture of "): the model is trained on the prompt twice ("a picture of a picture of a dog"), and
    its captions, scored without the prompt, are compared with references that keep it. Returns that share."""
    words = prompt.lower().split()
    if not words or not captions:
        return 0.0
    share = sum(caption.lower().split()[: len(words)] == words for caption in captions) / len(captions)
    if share > PROMPT_IN_CAPTIONS:
        logger.warning("%.0f%% of the training captions begin with the prompt %r, which every caption is trained "
                       "after and which generated captions are scored without: the model learns the prompt twice and "
                       "its captions miss it against the references; remove it from the captions, or set prompt: ''",
                       100 * share, prompt)  # fmt: skip
    return share


def check_one_whole_batch(train_dataset, training_args) -> None:
    """With dataloader_drop_last a training set smaller than one batch on every process is all dropped: the run
    would "finish" after 0 steps and save the untouched model."""
    if not training_args.dataloader_drop_last or not hasattr(train_dataset, "__len__"):
        return
    rows, batch = len(train_dataset), training_args.per_device_train_batch_size * training_args.world_size
    if rows < batch:
        raise DataError(
            f"dataloader_drop_last: true drops every training batch: {rows} training rows, fewer than one batch of "
            f"{training_args.per_device_train_batch_size} per process x {training_args.world_size} process(es); "
            "lower per_device_train_batch_size or set dataloader_drop_last: false"
        )


def build_scst_loss(split: CaptionSplit, tokenizer, collator: CaptionCollator, training_args):
    """The self-critical loss over `split`'s images (rewards against each image's references, scst.py)."""
    from .scst import SelfCriticalLoss

    logger.info("training_objective=scst: %d %s samples per image, %s baseline, reward weights CIDEr-D %g / BLEU-4 %g",
                training_args.scst_num_samples, training_args.scst_sampling, training_args.scst_baseline,
                *training_args.scst_reward_weights)  # fmt: skip
    return SelfCriticalLoss(
        [record.captions for record in split.records], tokenizer, collator.prompt_ids,
        num_samples=training_args.scst_num_samples, baseline=training_args.scst_baseline,
        max_length=training_args.generation_max_length or GENERATION_DEFAULTS.max_length,
        min_length=training_args.generation_min_length, reward_weights=training_args.scst_reward_weights,
        sampling=training_args.scst_sampling,
    )  # fmt: skip


def encode_vision_features(model, split: CaptionSplit, image_processor, training_args, image_cache: bool) -> None:
    """Run the frozen encoder once over the training images into the vision-features store (vision_features.py)."""
    args = training_args
    plain = image_transform(image_processor)
    pixels = resized_image_cache(split, plain, image_cache, None, args.main_process_first)
    autocast_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    cache_vision_features(
        model, CaptionEvalDataset(split, plain, pixels), args.device, autocast_dtype=autocast_dtype,
        batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
        process_index=args.process_index, world_size=args.world_size,
    )  # fmt: skip


def build_evaluator(
    recipe: Recipe, data: CaptionData | None = None, evaluation_layout: str = "flat"
) -> CaptionTrainer:
    """A trainer that only evaluates a finished model (full or LoRA adapter) on the recipe's eval split (and its
    test split, if it names one, and its extra_eval_datasets), by default writing straight into output_dir.
    Decoding settings the recipe and command line leave unset come from the model."""
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    check_model_source(model_args.model_name_or_path, model_args.model_revision)
    with training_args.main_process_first(desc="loading the processor"):
        processor = load_processor(model_args.model_name_or_path, model_args.model_revision)
    data = data if data is not None else load_data(recipe, need_train=False)
    scored = CaptionData(None, data.evaluation, data.test, extra_evaluation=data.extra_evaluation)
    datasets = build_datasets(
        scored, processor.image_processor, image_cache=data_args.image_cache,
        workers=data_args.preprocessing_num_workers, main_process_first=training_args.main_process_first,
    )  # fmt: skip
    model = build_model(
        model_args.model_name_or_path, processor.image_processor, model_args.model_revision, model_args.torch_dtype,
        model_args.attn_implementation,
    )  # fmt: skip
    check_tokenizer(processor.tokenizer, model, model_args.model_name_or_path)
    saved = decoding_settings(model)
    unset = {"prompt", "num_beams", "max_length", "min_length"} - {
        key.removeprefix("generation_") for key in recipe.explicit_keys
    }
    decoding = {
        "prompt": data_args.prompt,
        "num_beams": training_args.generation_num_beams,
        "max_length": training_args.generation_max_length,
        "min_length": training_args.generation_min_length,
    }
    decoding.update({key: saved[key] for key in unset})  # fmt: skip
    decoding = recipe_decoding(**decoding)
    check_decoding(processor.tokenizer, decoding, max_positions=text_positions(model))
    logger.info("decoding: %s", ", ".join(f"{key}={value!r}" for key, value in decoding.items()))
    args = _trainer_arguments(
        training_args, generation_num_beams=decoding["num_beams"], generation_max_length=decoding["max_length"],
        generation_min_length=decoding["min_length"],
    )  # fmt: skip
    return CaptionTrainer(
        model=model, args=args, eval_dataset=datasets.evaluation, test_dataset=datasets.test,
        extra_eval_datasets=datasets.extra_evaluation, processing_class=processor,
        caption_collator=build_collator(processor, model, decoding["prompt"], data_args.max_caption_length,
                                        data_args.pad_to_multiple_of),
        evaluation_layout=evaluation_layout,
    )  # fmt: skip
