"""The one Trainer every recipe uses: Seq2SeqTrainer + a token-level caption loss + caption-generating evaluation."""

import contextlib
import functools
import hashlib
import logging
import math
import os
import time
import typing

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list
from transformers import EarlyStoppingCallback, Seq2SeqTrainer, TrainerCallback
from transformers.trainer_utils import speed_metrics
from transformers.training_args import ParallelMode

from .adapt import record_upstream_base_class, unwrap_blip
from .checkpoints import share_as_umask_allows
from .choices import GENERATION_DEFAULTS
from .data import CaptionTrainDataset, ImageGroupedSampler
from .distributed import gather_from_all
from .evaluation import decode_captions, generate_caption_ids, score_and_write

logger = logging.getLogger(__name__)


def caption_loss(outputs, labels, num_items_in_batch=None, label_smoothing: float = 0.0):
    """Next-token cross-entropy summed over caption tokens and divided by the caption tokens of the whole step.

    BLIP's own loss is a per-micro-batch mean while it declares that it takes `num_items_in_batch`, so the stock
    Trainer neither rescales it for gradient accumulation nor for token averaging across processes: gradients come
    out `gradient_accumulation_steps` (and world size) times too large. Normalising by the step's token count here
    makes the loss the same whether a batch is split across micro-batches, processes, or neither.
    """
    logits = outputs["logits"][:, :-1, :]
    targets = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    count = num_items_in_batch if num_items_in_batch is not None else targets.ne(-100).sum()
    return loss / count


class EvaluationInterrupted(Exception):
    """`stop_requested` said stop (SIGTERM) during an evaluation; nothing of it was written."""


class TrainingStoppedInEvaluation(Exception):
    """SIGTERM during an evaluation in training: the evaluation is left unfinished, the checkpoint of the step it
    was scoring is saved (none at step 0), and training stops."""

    def __init__(self, step: int):
        super().__init__(f"stopped during the evaluation at step {step}")
        self.step = step


class CaptionTrainer(Seq2SeqTrainer):
    """Evaluation generates one caption per image (sharded over processes), gathers them, scores them once on
    the main process against all references, writes predictions / per-image scores / caption grids, and gives
    every process the same metrics.

    `test_dataset`: a split scored once after training. `extra_eval_datasets`: {name: dataset} scored with the
    evaluation split at every evaluation, as eval_NAME_*. `evaluation_layout`: "per_step" writes each evaluation to
    output_dir/evaluations/<prefix>-step-N (training); "flat" writes straight into output_dir (standalone evaluate).
    """

    def __init__(self, *args, caption_collator, test_dataset=None, evaluation_layout: str = "per_step", scst=None,
                 extra_eval_datasets=None, **kwargs):  # fmt: skip
        if evaluation_layout not in ("per_step", "flat"):
            raise ValueError(f"evaluation_layout must be per_step or flat, got {evaluation_layout!r}")
        training_args = kwargs["args"]
        kwargs.setdefault(
            "compute_loss_func", functools.partial(caption_loss, label_smoothing=training_args.label_smoothing_factor)
        )
        super().__init__(*args, data_collator=caption_collator, **kwargs)
        self.caption_collator = caption_collator
        self.test_dataset = test_dataset
        self.extra_eval_datasets = dict(extra_eval_datasets or {})
        self.evaluation_layout = evaluation_layout
        self.shared_images = [0, 0]  # caption rows, images encoded for them (group_captions_by_image)
        self.stream_position = None  # a streaming run's position to resume from (checkpoints.load_stream_position)
        # training_objective scst: compute_loss is the self-critical loss (scst.py); it averages over the step's
        # samples itself, so the Trainer divides by gradient_accumulation_steps.
        self.scst = scst
        if scst is not None:
            self.loss_is_scaled_for_ga = False
        self.ema = None
        if training_args.ema_decay is not None:
            from .ema import WeightAverage

            self.ema = WeightAverage(training_args.ema_decay)
            self.add_callback(self.ema)
        # Polled between caption batches and before scoring; True stops the evaluation (EvaluationInterrupted).
        self.stop_requested = lambda: False
        self.training_now = False
        self.add_callback(ReplicaCheckCallback())
        logger.info(
            "processes: world_size=%d (%s, device %s, engine %s)",
            self.args.world_size,
            self.args.parallel_mode.value,
            self.args.device,
            engine_name(self.accelerator),
        )

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Resuming also restores what the Trainer does not checkpoint: the weight average and a stream's
        position."""
        if isinstance(resume_from_checkpoint, str):
            if self.ema is not None:
                self.ema.load(resume_from_checkpoint)
            from .data.streaming import CaptionStream

            if isinstance(self.train_dataset, CaptionStream):
                from .checkpoints import load_stream_position

                self.stream_position = load_stream_position(resume_from_checkpoint, self.args.process_index)
        self.training_now = True
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.training_now = False
        captions, images = self.shared_images
        if images:
            logger.info("group_captions_by_image: %d caption rows trained on %d image encodings (%.2f per image) on "
                        "process %d", captions, images, captions / images, self.args.process_index)  # fmt: skip
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "image_index" in inputs:  # group_captions_by_image: shapes only, known on the host (no GPU sync)
            self.shared_images[0] += inputs["image_index"].numel()
            self.shared_images[1] += inputs["pixel_values"].shape[0]
        if self.scst is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.scst(model, inputs, self.accelerator.autocast)

    def _track_num_input_tokens(self, inputs):
        """include_num_input_tokens_seen counts caption tokens: the Trainer counts the model's main input, which for
        BLIP is pixel_values (every channel value of every pixel a "token"). `all`: the caption rows as padded;
        `non_padding`: [DEC], prompt and caption tokens."""
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        tokens = inputs["attention_mask"].sum() if mode == "non_padding" else inputs["input_ids"].numel()
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def log(self, logs: dict, *args, **kwargs) -> None:
        """SCST's per-step statistics (mean reward, baseline, sampled length, share at max length) beside the loss."""
        if self.scst is not None and "loss" in logs:
            logs = {**logs, **self.scst.pop_statistics()}
        super().log(logs, *args, **kwargs)

    def ema_weights(self):
        """A block in which the model holds the weight average (ema_decay), else the raw weights."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    def _get_train_sampler(self, train_dataset=None):
        """group_captions_by_image: each image's captions next to each other, in batch-sized blocks of whole images
        where caption counts allow (ImageGroupedSampler), in a seeded order per epoch."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_captions_by_image and isinstance(dataset, CaptionTrainDataset):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return ImageGroupedSampler(dataset.image_positions, seed, self._train_batch_size)
        return super()._get_train_sampler(train_dataset)

    def get_eval_dataloader(self, eval_dataset=None):
        with self._keeping_the_last_batch():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._keeping_the_last_batch():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _keeping_the_last_batch(self):
        """Evaluation captions every image: dataloader_drop_last is a training setting, but the Trainer builds its
        evaluation loaders with it too, which left the last partial batch of images uncaptioned."""
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            yield
        finally:
            self.args.dataloader_drop_last = drop_last

    def get_train_dataloader(self):
        """A CaptionStream gets a StatefulDataLoader that accelerate does not wrap: the stream already splits itself
        over processes (accelerate would make every process read every sample), and its position is saved with
        each checkpoint (StreamPositionCallback) and restored here on resume."""
        from .data.streaming import CaptionStream

        if not isinstance(self.train_dataset, CaptionStream):
            return super().get_train_dataloader()
        from torchdata.stateful_dataloader import StatefulDataLoader

        args = self.args
        workers = args.dataloader_num_workers
        prefetch = args.dataloader_prefetch_factor if workers else None
        loader = StatefulDataLoader(
            self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator, num_workers=workers,
            pin_memory=args.dataloader_pin_memory, prefetch_factor=prefetch,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
        )  # fmt: skip
        if self.stream_position is not None:
            loader.load_state_dict(self.stream_position)
        return loader

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Weights and processor as the Trainer writes them (safetensors, readable as the umask allows), arguments as
        JSON instead of a pickle, and the decoding settings (generation_config.json) beside a LoRA adapter too.

        The Trainer also pickles TrainingArguments into training_args.bin, which only an unsafe (non weights-only)
        load can read, i.e. a file that can run code. recipe.yaml and training_args.json hold the same information
        as data. peft saves no generation config with an adapter; model.load_model reads this one.
        """
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            share_as_umask_allows(output_dir)
            if os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
                unwrap_blip(self.model).generation_config.save_pretrained(output_dir)
                record_upstream_base_class(output_dir)
            pickled = os.path.join(output_dir, "training_args.bin")
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
                handle.write(self.args.to_json_string())

    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer loads a checkpoint (a resume, load_best_model_at_end) with strict=False and warns of every key
        it lacks, and a checkpoint holds one copy of each tied tensor: every resume said "There were missing keys in
        the checkpoint model loaded" for BLIP's LM head, whose weight and bias the tie fills. Warn of the others."""
        if not hasattr(load_result, "_replace"):  # not torch's (missing_keys, unexpected_keys) named tuple
            return super()._issue_warnings_after_load(load_result)
        tensors = dict(self.model.named_parameters(remove_duplicate=False))
        missing = set(load_result.missing_keys)
        loaded = {id(tensor) for name, tensor in tensors.items() if name not in missing}
        untied = [key for key in load_result.missing_keys if key not in tensors or id(tensors[key]) not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=untied))

    def evaluation_dir(self, metric_key_prefix: str) -> str:
        if self.evaluation_layout == "flat":  # `evaluate`: an extra dataset's files in a folder of its name
            extra = metric_key_prefix in self.extra_eval_datasets
            return os.path.join(self.args.output_dir, metric_key_prefix) if extra else self.args.output_dir
        return os.path.join(self.args.output_dir, "evaluations", f"{metric_key_prefix}-step-{self.state.global_step}")

    @torch.no_grad()
    def generate_for_dataset(self, dataset) -> dict[int, list[int]]:
        """{dataset index: generated token ids} for every item, each exactly once, on every process."""
        # get_eval_dataloader caches one loader under "eval" when workers persist: any other split (test) gets its own.
        dataloader = self.get_eval_dataloader() if dataset is self.eval_dataset else self.get_test_dataloader(dataset)
        model = self.model
        was_training = model.training
        model.eval()
        args = self.args
        pad_id = self.caption_collator.tokenizer.pad_token_id
        generated: dict[int, list[int]] = {}
        progress = self.is_local_process_zero() and not args.disable_tqdm
        from tqdm.auto import tqdm

        for batch in tqdm(dataloader, desc="generating captions", disable=not progress, leave=False):
            if self.stop_requested():
                raise EvaluationInterrupted()
            pixel_values = batch["pixel_values"].to(args.device)
            prefix = self.caption_collator.prompt_ids(len(pixel_values), device=args.device)
            with self.accelerator.autocast():
                token_ids = generate_caption_ids(
                    model,
                    pixel_values,
                    prefix,
                    num_beams=args.generation_num_beams or 1,
                    max_length=args.generation_max_length or GENERATION_DEFAULTS.max_length,
                    min_length=args.generation_min_length,
                )
            token_ids = self.accelerator.pad_across_processes(token_ids.contiguous(), dim=1, pad_index=pad_id)
            indices, token_ids = self.accelerator.gather_for_metrics((batch["index"].to(args.device), token_ids))
            for index, ids in zip(indices.tolist(), token_ids.cpu().tolist()):
                generated.setdefault(index, ids)  # the distributed sampler repeats items to even out shards
        if was_training:
            model.train()
        missing = len(dataset) - len(generated)
        if missing:
            raise RuntimeError(f"evaluation generated {len(generated)} captions for {len(dataset)} images")
        return generated

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score `eval_dataset` (default: the evaluation split). The Trainer's own evaluations (no dataset given)
        score each of extra_eval_datasets too, as eval_NAME_*; the callbacks (early stopping, the best checkpoint)
        then see every dataset's metrics at once."""
        try:
            with self.ema_weights():
                metrics = self._generate_and_score(eval_dataset, metric_key_prefix)
                if eval_dataset is None and metric_key_prefix == "eval":
                    for name, dataset in self.extra_eval_datasets.items():
                        metrics.update(self._generate_and_score(dataset, f"eval_{name}"))
        except EvaluationInterrupted:
            if not self.training_now:
                raise
            self._stop_in_evaluation()
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _stop_in_evaluation(self) -> typing.NoReturn:
        """SIGTERM during an evaluation in training: the step it scores is complete, so its checkpoint is saved now,
        as the Trainer would save it after the evaluation, rather than after captioning and scoring every image,
        which can outlast the grace period of the scheduler or launcher (the weight average is back in place: the
        evaluation ran inside ema_weights)."""
        step = self.state.global_step
        if self.is_world_process_zero():
            logger.warning("SIGTERM during the evaluation at step %d: it is left unfinished (no metrics for it)%s",
                           step, "; saving that step's checkpoint now" if step else "")  # fmt: skip
        if step:
            self._save_checkpoint(self.model_wrapped, trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        raise TrainingStoppedInEvaluation(step)

    def _generate_and_score(self, eval_dataset, metric_key_prefix: str) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        self._memory_tracker.start()
        start_time = time.time()
        generated = self.generate_for_dataset(dataset)
        generation_seconds = time.time() - start_time
        metrics: dict = {}
        if self.stop_requested():
            raise EvaluationInterrupted()
        if self.is_world_process_zero():
            order = sorted(generated)
            predictions = decode_captions(self.caption_collator.tokenizer, [generated[i] for i in order])
            records = [dataset.record(i) for i in order]
            output_dir = self.evaluation_dir(metric_key_prefix)
            scores, paths = score_and_write(
                output_dir,
                [record.image_id for record in records],
                predictions,
                [record.captions for record in records],
                self.args.eval_metrics,
                load_image=lambda position: dataset.load_image(order[position]),
                grid_size=self.args.caption_grid_size,
                title=f"step {self.state.global_step}",
            )
            self._log_caption_grids(paths)
            metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
            metrics[f"{metric_key_prefix}_generation_runtime"] = round(generation_seconds, 4)
            logger.info(
                "scored %d captions of %s on process %d at step %d: %s (files in %s)",
                len(predictions),
                dataset.split.label,
                self.args.process_index,
                self.state.global_step,
                _brief(scores),
                output_dir,
            )
        if self.args.world_size > 1:
            metrics = broadcast_object_list([metrics])[0]
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=len(dataset)))
        self.log(metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def _log_caption_grids(self, paths: dict) -> None:
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
            if writer is None:
                continue
            import numpy as np
            from PIL import Image

            for name in ("caption_grid", "worst_captions"):
                if name in paths:
                    image = np.asarray(Image.open(paths[name]).convert("RGB"))
                    writer.add_image(f"eval/{name}", image, self.state.global_step, dataformats="HWC")
            writer.flush()


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping (evaluations in a row that do not improve metric_for_best_model), plus what it
    lacks here: its count continues on resume, as if the run had not stopped (the Trainer restarts it at 0 unless
    restore_callback_states_from_checkpoint, which would also put the checkpoint's patience over the recipe's), and
    the stop is logged."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = state.stateful_callbacks.get(type(self).__name__)  # the checkpoint's, when resuming
        saved = saved[0] if isinstance(saved, list) else saved
        if isinstance(saved, dict):
            self.early_stopping_patience_counter = saved.get("attributes", {}).get(
                "early_stopping_patience_counter", 0
            )

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        stopping = control.should_training_stop  # already: the last step, or the evaluation after training
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if control.should_training_stop and not stopping:
            logger.info(
                "early stopping at step %d: %s has not risen by more than %s above its best, %.4f at step %s, in %d "
                "evaluations (early_stopping_patience); the best checkpoint is loaded at the end",
                state.global_step, args.metric_for_best_model, self.early_stopping_threshold, state.best_metric,
                state.best_global_step, self.early_stopping_patience_counter,
            )  # fmt: skip


class ReplicaCheckCallback(TrainerCallback):
    """At the end of data-parallel training, prove every process holds bit-identical weights (by hashing them).

    Replicas that drift apart (a rank training alone, a non-deterministic all-reduce, a parameter outside DDP) are
    otherwise invisible: only process 0 saves. Sharded setups (FSDP, ZeRO-3) hold different shards by design.
    """

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        sharded = AcceleratorState().distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if args.world_size <= 1 or args.parallel_mode != ParallelMode.DISTRIBUTED or sharded or args.fsdp:
            return
        digest = hashlib.sha256()
        for name, parameter in sorted(unwrap_blip(model).named_parameters()):
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
        digests = gather_from_all(digest.hexdigest(), args.world_size)
        if len(set(digests)) != 1:
            raise RuntimeError(f"model replicas differ after training: {digests}")
        logger.info("weights identical on all %d processes (sha256 %s)", args.world_size, digests[0][:16])


def engine_name(accelerator) -> str:
    """What actually distributes the run, as accelerate set it up (a config asking for FSDP on a CPU gets DDP)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return {DistributedType.NO: "none", DistributedType.MULTI_CPU: "DDP", DistributedType.MULTI_GPU: "DDP"}.get(
        kind, str(kind.value)
    )


def _brief(scores: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float) and not math.isnan(v))
