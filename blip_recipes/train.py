"""Fine-tune BLIP for image captioning from a YAML recipe.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m blip_recipes.train \\
        recipes/football/lora.yaml --learning_rate 1e-4 --num_train_epochs 20

`blip-recipes train RECIPE.yaml [--key value ...]` is the same entry point. One run, end to end:
recipe (config.py) -> data (data.py) -> model + training_mode (model.py) -> CaptionTrainer (trainer.py) -> save,
evaluate (evaluation.py, metrics.py) -> push (hub.py).
"""

import dataclasses
import logging
import os
import shutil
import sys
import warnings

import torch
import transformers
from transformers import set_seed

from .checkpoints import PREEMPTED_EXIT_CODE, PreemptionCallback, previous_run_files, resolve_resume
from .collator import CaptionCollator
from .config import RecipeError, parse_recipe, wants_evaluation
from .data import (
    CaptionEvalDataset,
    CaptionTrainDataset,
    DataError,
    ResizedImageCache,
    image_cache_dir,
    load_caption_splits,
)
from .feature_cache import FeatureCacheError, cache_vision_features
from .hub import HubPushCallback, metric_results, publish_run
from .metrics import MetricsError, check_metric_requirements
from .model import (
    apply_training_mode,
    attach_pixel_normalizer,
    load_model,
    load_processor,
    merge_lora,
    parameter_counts,
)
from .trainer import CaptionTrainer
from .transforms import ImageTransform

logger = logging.getLogger("blip_recipes")
PUSH_FAILED_EXIT_CODE = 3  # trained and saved, but not published


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(level)
    try:
        import datasets

        datasets.utils.logging.set_verbosity(level)
    except ImportError:  # only loading a dataset needs it; callers that pass their own splits may lack it
        pass
    # Our own progress lines (parameter counts, data sizes, metrics) on the main process even at "passive" level.
    ours = logging.INFO if training_args.should_log and training_args.log_level == "passive" else level
    logging.getLogger("blip_recipes").setLevel(ours)
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator is found.*")


def build_trainer(recipe, callbacks=(), for_training: bool = True, data=None) -> CaptionTrainer:
    """Data, model (with its training_mode), collator and trainer for a parsed recipe.

    `for_training=False` builds the same trainer for scoring a finished model: no train split, nothing trainable.
    `data` (a CaptionData) replaces loading `dataset_name`, for callers that assemble splits themselves.
    """
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    with training_args.main_process_first(desc="loading the processor"):  # process 0 generates builtin:tiny-blip
        processor = load_processor(model_args.model_name_or_path, model_args.model_revision)
    if data is None:
        with training_args.main_process_first(desc="loading and checking the dataset"):
            data = load_caption_splits(
                data_args, training_args.seed, need_eval=wants_evaluation(training_args) or not for_training,
                need_train=for_training,
            )  # fmt: skip
    image_processor = processor.image_processor
    size = (image_processor.size["height"], image_processor.size["width"], image_processor.resample)
    plain = ImageTransform(*size)

    def cache(split, transform):
        if not data_args.image_cache or split is None or transform.augmentation != "none":
            return None
        with training_args.main_process_first(desc="caching resized images"):
            return ResizedImageCache.build(split, transform, image_cache_dir(), data_args.preprocessing_num_workers)

    m = model_args
    cached_features = for_training and m.cache_vision_features
    train_dataset = None
    if data.train is not None:
        augmentation = ImageTransform(*size, augmentation=data_args.image_augmentation)
        pixels = None if cached_features else cache(data.train, augmentation)
        train_dataset = CaptionTrainDataset(
            data.train, augmentation, data_args.caption_preprocessing, pixels, feature_rows=cached_features
        )
    eval_dataset = (
        CaptionEvalDataset(data.evaluation, plain, cache(data.evaluation, plain)) if data.evaluation else None
    )
    test_dataset = CaptionEvalDataset(data.test, plain, cache(data.test, plain)) if data.test else None
    sizes = [len(dataset) if dataset else "no" for dataset in (train_dataset, eval_dataset, test_dataset)]
    logger.info("data: %s training captions, %s evaluation images, %s test images", *sizes)

    model = load_model(m.model_name_or_path, m.model_revision, m.torch_dtype, m.attn_implementation,
                       lora_trainable=for_training and m.training_mode == "lora")  # fmt: skip
    if for_training:
        model = apply_training_mode(model, m.training_mode, m.lora_r, m.lora_alpha, m.lora_dropout,
                                    m.lora_target_modules)  # fmt: skip
        trainable, total = parameter_counts(model)
        logger.info("training_mode=%s: %s of %s parameters train (%.2f%%)", m.training_mode, f"{trainable:,}",
                    f"{total:,}", 100.0 * trainable / total)  # fmt: skip
    # Saved with the model, so `generate` elsewhere decodes as this recipe evaluates.
    generation_config = model.generation_config
    generation_config.num_beams = training_args.generation_num_beams or 1
    generation_config.max_length = training_args.generation_max_length
    generation_config.min_length = training_args.generation_min_length

    attach_pixel_normalizer(model, image_processor.image_mean, image_processor.image_std)
    if cached_features:
        t = training_args
        autocast_dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else None
        cache_vision_features(
            model, CaptionEvalDataset(data.train, plain, cache(data.train, plain)), t.device,
            autocast_dtype=autocast_dtype, batch_size=t.per_device_eval_batch_size,
            num_workers=t.dataloader_num_workers, process_index=t.process_index, world_size=t.world_size,
        )  # fmt: skip
    collator = CaptionCollator(
        processor.tokenizer,
        bos_token_id=model.config.text_config.bos_token_id,
        prompt=data_args.prompt,
        max_length=data_args.max_caption_length,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
    )
    # The Trainer's own Hub code would create the repo at start-up and upload checkpoint folders; publishing is
    # hub.py's job (allow-listed files, a real model card), so the Trainer gets a copy with push_to_hub off.
    trainer_args = (
        dataclasses.replace(training_args, push_to_hub=False) if training_args.push_to_hub else training_args
    )
    trainer = CaptionTrainer(
        model=model, args=trainer_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=processor, caption_collator=collator, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.test_dataset = test_dataset
    return trainer


def main(argv: list[str] | None = None) -> int:
    try:
        recipe = parse_recipe(sys.argv[1:] if argv is None else argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_args, training_args = recipe.model, recipe.training
    setup_logging(training_args)
    preemption = PreemptionCallback()
    callbacks = [preemption]
    if training_args.push_to_hub and training_args.hub_strategy == "every_save":
        callbacks.append(
            HubPushCallback(training_args.hub_model_id, training_args.hub_token, training_args.hub_private_repo)
        )
    try:
        if wants_evaluation(training_args):
            check_metric_requirements(training_args.eval_metrics)
        resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
        existing = previous_run_files(training_args.output_dir)
        if existing and resume is None and not training_args.overwrite_output_dir:
            raise RecipeError(
                f"output_dir {training_args.output_dir} already holds a run ({', '.join(existing[:4])}); "
                "continue it with --resume_from_checkpoint true, or replace it with --overwrite_output_dir true"
            )
        set_seed(training_args.seed)
        trainer = build_trainer(recipe, callbacks=callbacks)
    except (RecipeError, DataError, MetricsError, FeatureCacheError, ValueError) as error:
        preemption.restore_signal_handler()
        logger.error("%s", error)
        return 2
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        recipe.write_resolved(os.path.join(training_args.output_dir, "recipe.yaml"))

    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    finally:
        preemption.restore_signal_handler()
    if preemption.received:
        logger.warning("pre-empted: checkpoint saved at step %s in %s; continue with --resume_from_checkpoint true",
                       preemption.stopped_at_step, training_args.output_dir)  # fmt: skip
        return PREEMPTED_EXIT_CODE
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    if model_args.merge_lora and trainer.is_world_process_zero():
        merged_dir = os.path.join(training_args.output_dir, "merged")
        merge_lora(trainer.model).save_pretrained(merged_dir)
        trainer.processing_class.save_pretrained(merged_dir)
        logger.info("merged LoRA model written to %s", merged_dir)

    card_metrics = {}
    for prefix, dataset in (("eval", trainer.eval_dataset), ("test", trainer.test_dataset)):
        if dataset is None:
            continue
        metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        card_metrics[dataset.split.name] = metric_results(metrics, prefix)
        if trainer.is_world_process_zero():
            shutil.copyfile(
                os.path.join(trainer.evaluation_dir(prefix), "predictions.jsonl"),
                os.path.join(training_args.output_dir, f"{prefix}_predictions.jsonl"),
            )
    if not trainer.is_world_process_zero():
        return 0
    ciders = [(e["step"], e["eval_cider"]) for e in trainer.state.log_history if "eval_cider" in e]
    if len(ciders) > 1 and ciders[0][0] == 0:
        logger.info("eval CIDEr %.4f before training -> %.4f after", ciders[0][1], ciders[-1][1])
    return PUSH_FAILED_EXIT_CODE if not publish_run(recipe, card_metrics) else 0


if __name__ == "__main__":
    sys.exit(main())
