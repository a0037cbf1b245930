"""`blip-recipes COMMAND ...`: train, evaluate, score, caption, serve, push, merge-lora.

Every command is an argparse parser with its own `--help`. train and evaluate take a recipe and/or any recipe key
(recipe_parser.py); the others take their own few options.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import traceback

from .choices import MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

EVALUATE_ALIASES = {
    "model_name_or_path": ["--model"],
    "dataset_name": ["--dataset"],
    "eval_split": ["--split"],
    "generation_num_beams": ["--num_beams"],
    "generation_max_length": ["--max_length"],
    "generation_min_length": ["--min_length"],
    "per_device_eval_batch_size": ["--batch_size"],
    "eval_metrics": ["--metrics"],
}
EVALUATE_DESCRIPTION = """Caption a dataset split with a finished model (full or LoRA adapter) and score it, with the
same generation, files and metrics as training runs. Decoding (beams, lengths, prompt) defaults to the settings
saved with the model; data keys can come from a recipe, whose extra_eval_datasets are scored too (each into
OUTPUT_DIR/NAME/) unless --dataset names what to score. Results go to --output_dir (default evaluations/MODEL, never
the recipe's output_dir, where its training run writes)."""


def train_command(argv: list[str]) -> int:
    from .train import main as train_main

    return train_main(argv)


def evaluate_command(argv: list[str]) -> int:
    """Score a finished model on one split (and a recipe's extra_eval_datasets), with the same generation, files and
    metrics as training runs."""
    from .adapt import AdaptationError
    from .builders import build_evaluator
    from .config import RecipeError
    from .data import DataError
    from .metrics import MetricsError, check_metric_requirements, start_metrics
    from .model import ModelError
    from .recipe_parser import parse_recipe, recipe_argument_parser
    from .train import setup_logging

    usage = "blip-recipes evaluate [RECIPE.yaml] --model PATH_OR_HUB_ID --dataset NAME [--split S] [--key value ...]"
    parser = recipe_argument_parser("blip-recipes evaluate", EVALUATE_DESCRIPTION, EVALUATE_ALIASES, usage)

    def output_dir(values: dict) -> dict:
        model = str(values.get("model_name_or_path", "model"))
        return {"output_dir": os.path.join("evaluations", os.path.basename(os.path.normpath(model)) or "model")}

    try:
        recipe = parse_recipe(argv, parser, defaults=output_dir)
        if "output_dir" in recipe.values and "output_dir" not in recipe.overrides:  # where the recipe's run trains
            recipe = parse_recipe([*argv, "--output_dir", output_dir(recipe.values)["output_dir"]], parser)
        if "model_name_or_path" not in recipe.overrides:
            raise RecipeError("evaluate needs --model PATH_OR_HUB_ID")
        if "dataset_name" not in recipe.explicit_keys:  # its default is the offline demo's synthetic shapes
            raise RecipeError("evaluate needs --dataset NAME (or a recipe that sets dataset_name)")
        if recipe.data.streaming and (recipe.data.eval_dataset_name is None or "dataset_name" in recipe.overrides):
            # a streaming run's recipe: dataset_name is its training stream, eval_dataset_name what it scores
            raise RecipeError("this recipe streams its training data (streaming: true): name the dataset to score "
                              "with --eval_dataset_name NAME")  # fmt: skip
        if "dataset_name" in recipe.overrides and "eval_dataset_name" not in recipe.overrides:
            # --dataset names what to score, over the recipe's eval_dataset_name and extra_eval_datasets
            recipe.data = dataclasses.replace(recipe.data, eval_dataset_name=None)
        if "dataset_name" in recipe.overrides and "extra_eval_datasets" not in recipe.overrides:
            recipe.data = dataclasses.replace(recipe.data, extra_eval_datasets=None)
        output = recipe.training.output_dir
        held = model_files_in(output)
        if held:  # a run's folder: its eval_results.json and predictions (what its model card reports) would go
            raise RecipeError(
                f"--output_dir {output} holds a model ({', '.join(held)}), whose own evaluation files this would "
                "overwrite; give another folder (default: evaluations/MODEL)"
            )
        setup_logging(recipe.training)
        check_metric_requirements(recipe.training.eval_metrics)
        if recipe.training.process_index == 0:
            start_metrics(recipe.training.eval_metrics)
        trainer = build_evaluator(recipe)
        split_name = trainer.eval_dataset.split.name
        if split_name in trainer.extra_eval_datasets:  # both would write {split_name}_cider, ...
            raise RecipeError(f"extra_eval_datasets: {split_name!r} is the name of the split evaluate scores; name "
                              "that dataset otherwise ({dataset_name: ..., name: ...})")  # fmt: skip
    except (RecipeError, DataError, MetricsError, AdaptationError, ModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = trainer.evaluate(metric_key_prefix=split_name)
    for name, dataset in trainer.extra_eval_datasets.items():  # each into OUTPUT_DIR/NAME/ (evaluation_dir)
        metrics.update(trainer.evaluate(dataset, metric_key_prefix=name))
    if trainer.is_world_process_zero():
        with open(os.path.join(recipe.training.output_dir, "eval_results.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
        print(json.dumps(metrics, indent=2))
    return 0


def score_command(argv: list[str]) -> int:
    from .evaluation import read_predictions, write_jsonl
    from .metrics import DEFAULT_METRICS, METRIC_FAMILIES, MetricsError, score_captions

    parser = argparse.ArgumentParser(
        prog="blip-recipes score",
        description="Score saved predictions (one {image_id, prediction, references} JSON object per line) against "
        "their references; writes PREDICTIONS.scored.jsonl and PREDICTIONS.metrics.json beside them.",
    )
    parser.add_argument("predictions", help="predictions JSONL, e.g. OUTPUT_DIR/eval_predictions.jsonl")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help=f"comma-separated subset of {', '.join(METRIC_FAMILIES)}"
    )
    args = parser.parse_args(argv)
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in METRIC_FAMILIES]
    if unknown or not metrics:
        parser.error(f"--metrics: unknown {unknown or 'empty list'}; choose from {', '.join(METRIC_FAMILIES)}")
    path = args.predictions
    try:
        image_ids, predictions, references = read_predictions(path)
        corpus, per_image = score_captions(predictions, references, metrics)
    except (OSError, ValueError, MetricsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stem = os.path.splitext(path)[0]
    rows = zip(image_ids, predictions, references, per_image)
    write_jsonl(f"{stem}.scored.jsonl", ({"image_id": i, "prediction": p, "references": r, "scores": s}
                                         for i, p, r, s in rows))  # fmt: skip
    with open(f"{stem}.metrics.json", "w", encoding="utf-8") as handle:
        json.dump(corpus, handle, indent=2)
    print(json.dumps(corpus, indent=2))
    return 0


def _captioner_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=True, help="fine-tuned model directory or Hub id (full or LoRA adapter)")
    parser.add_argument("--revision", default="main", help="with a Hub id: its branch, tag or commit (default: main)")
    parser.add_argument("--prompt", default=None, help="decoder prompt; default: the one the model was trained with")
    parser.add_argument("--num_beams", type=int, default=None, help="default: the beams saved with the model")
    parser.add_argument("--max_length", type=int, default=None, help="default: the max length saved with the model")
    parser.add_argument("--min_length", type=int, default=None, help="default: the min length saved with the model")
    parser.add_argument("--device", type=_device, default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--max_image_pixels", type=_positive_int, default=MAX_IMAGE_PIXELS,
        help="images declaring more pixels are refused before decoding (default: %(default)s)",
    )  # fmt: skip
    return parser


def _bounded(kind: type, low, high=None, above: bool = False):
    """An argparse type: a finite `kind` (int or float) >= low (> low with `above`), and <= high when given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        fits = value > low if above else value >= low
        if not (fits and math.isfinite(value) and (high is None or value <= high)):
            bound = f"in {low}..{high}" if high is not None else f"{'above' if above else 'at least'} {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


_positive_int = _bounded(int, 1)


def _device(text: str) -> str:
    """A device this machine has: `cuda` on a CPU-only machine is an argument error, not a traceback at load."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cpu":
        return text
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if accelerator is None or accelerator.type != device.type or (device.index or 0) >= count:
        here = f"{count} {accelerator.type} device(s)" if accelerator is not None else "no accelerator, only cpu"
        raise argparse.ArgumentTypeError(f"{text}: this machine has {here}")
    return text


def _unwritable(path: str) -> str | None:
    """Why a file cannot be written at `path` (None when it can): a directory there, or a folder that cannot be
    created or written to (tried by writing: permission bits say nothing for root or on /proc)."""
    import tempfile

    if os.path.isdir(path):
        return "is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".blip-recipes-probe-"):
            pass
    except OSError as error:
        return f"{folder} is not writable ({error.strerror or error})"
    return None


def _captioner(args):
    """The Captioner, or None after printing why the model cannot be used."""
    from .evaluation import Captioner
    from .model import ModelError

    try:
        return Captioner(args.model, args.prompt, args.num_beams, args.max_length, args.min_length, args.device,
                         args.revision)  # fmt: skip
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _image_files(paths: list[str]) -> list[str]:
    """Files as given; directories walked for image extensions, leaving out hidden files and folders (macOS's
    `._photo.jpg` beside every copied photo is no image, `.thumbnails/` no photo of the folder's)."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            found += [
                os.path.join(root, name)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            ]
        files += sorted(found)
    return files


def caption_command(argv: list[str]) -> int:
    from .transforms import BadImageError, open_image

    parser = _captioner_parser(
        "blip-recipes caption",
        "Caption images with a fine-tuned model (full or LoRA adapter), batched, on a GPU when present. Decoding "
        "defaults to the settings saved with the model.",
    )
    parser.add_argument("images", nargs="+", help="image files or directories")
    parser.add_argument("--batch_size", type=_positive_int, default=16)
    parser.add_argument(
        "--output", default=None, help="write JSONL ({image, caption}) here, batch by batch, instead of printing"
    )
    args = parser.parse_args(argv)
    files = _image_files(args.images)
    if not files:
        print("error: no images found", file=sys.stderr)
        return 2
    problem = args.output and _unwritable(args.output)
    if problem:  # before the model loads and the images are captioned, not after
        print(f"error: --output {args.output}: {problem}", file=sys.stderr)
        return 2
    captioner = _captioner(args)
    if captioner is None:
        return 2
    # Each batch's rows reach OUTPUT.partial as the batch finishes (one write of whole lines), renamed to OUTPUT at
    # the end: a run stopped after hours (Ctrl-C, a killed job, a full disk) keeps every caption made so far, and
    # an OUTPUT from an earlier run stays as it was until this one is complete.
    partial = f"{args.output}.partial" if args.output else None
    output = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666) if args.output else None
    written, failed = 0, 0
    try:
        for start in range(0, len(files), args.batch_size):
            batch, names = [], []
            for path in files[start : start + args.batch_size]:
                try:
                    batch.append(open_image(path, max_pixels=args.max_image_pixels))
                    names.append(path)
                except BadImageError as error:
                    print(f"{path}: skipped, {error}", file=sys.stderr)
                    failed += 1
            rows = list(zip(names, captioner.caption(batch) if batch else []))
            if output is None:
                print("".join(f"{path}\t{text}\n" for path, text in rows), end="", flush=True)
                continue
            data = "".join(
                json.dumps({"image": path, "caption": text}, ensure_ascii=False) + "\n" for path, text in rows
            )
            _append_whole(output, data.encode("utf-8"))
            written += len(rows)
    except KeyboardInterrupt:
        where = f": the {written} captions made so far are in {partial}" if output is not None else ""
        print(f"\ninterrupted (Ctrl-C){where}", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk or quota while writing --output
        from .checkpoints import WRITE_FAILED_EXIT_CODE

        print(f"error: could not write to {partial} ({error.strerror or error}): the {written} captions made "
              "before are in it", file=sys.stderr)  # fmt: skip
        return WRITE_FAILED_EXIT_CODE
    finally:
        if output is not None:
            os.close(output)
    if output is not None:
        os.replace(partial, args.output)
        print(f"{written} captions written to {args.output}")
    return 1 if failed else 0


def _append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the file, or, when the disk fills up halfway, nothing of it (no half line is left)."""
    start = os.lseek(fd, 0, os.SEEK_CUR)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
        raise


def serve_command(argv: list[str]) -> int:
    parser = _captioner_parser(
        "blip-recipes serve",
        'HTTP captioning: POST /caption (multipart image upload, field "file") -> {"caption": ...}; GET /health. '
        "Needs the serve extra: pip install 'blip-recipes[serve]'.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_bounded(int, 0, 65_535), default=8000)
    parser.add_argument("--max_upload_mb", type=_bounded(float, 0, above=True), default=20.0,
                        help="larger uploads get 413")  # fmt: skip
    parser.add_argument("--max_batch_size", type=_bounded(int, 1), default=8,
                        help="most images captioned in one generation: requests that arrive while one runs go "
                        "together in the next")  # fmt: skip
    parser.add_argument("--max_waiting", type=_bounded(int, 1), default=64,
                        help="most decoded images waiting for a generation; more get 503 with Retry-After (bounded "
                        "memory and an answer at once under overload); GET /health reports the count")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: serving needs the serve extra: pip install 'blip-recipes[serve]'", file=sys.stderr)
        return 2
    from .serve import listening_socket, serve

    try:
        sock = listening_socket(args.host, args.port)
    except OSError as error:  # before the model loads, which takes a while for BLIP-large
        print(f"error: cannot listen on {args.host} port {args.port} ({error.strerror or error})", file=sys.stderr)
        return 2
    captioner = _captioner(args)
    if captioner is None:
        sock.close()
        return 2
    serve(captioner, sock, int(args.max_upload_mb * 2**20), args.max_image_pixels, args.max_batch_size,
          args.max_waiting)  # fmt: skip
    return 0


def push_command(argv: list[str]) -> int:
    from .hub import CARD_INPUTS, PushError, push_folder, repo_id_problem, retarget_model_card, revision_problem

    def accepted(problem_of):  # an argparse type: the text as given, unless problem_of(text) names a problem
        def parse(text: str) -> str:
            problem = problem_of(text)
            if problem:
                raise argparse.ArgumentTypeError(problem)
            return text

        return parse

    parser = argparse.ArgumentParser(
        prog="blip-recipes push",
        description="Upload a finished run's allow-listed files (weights, configs, processor, model card, results, "
        "recipe) to the Hub; checkpoints, logs and dotfiles never are.",
    )
    parser.add_argument("output_dir", help="a finished run's output_dir (it holds README.md, the model card)")
    parser.add_argument("--hub_model_id", required=True, type=accepted(repo_id_problem), help="USER/NAME")
    parser.add_argument(
        "--revision",
        default=None,
        type=accepted(revision_problem),
        help="branch to push to, created when missing (default: main)",
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the saved login")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.output_dir, "README.md")):
        print(f"error: {args.output_dir} has no README.md model card; is it a finished run?", file=sys.stderr)
        return 2
    try:
        retargeted = retarget_model_card(args.output_dir, args.hub_model_id, args.revision)
    except OSError as error:
        print(f"error: cannot write the model card for {args.hub_model_id} into {args.output_dir} ({error}); make "
              f"the folder writable, or push to the repo id its README.md names", file=sys.stderr)  # fmt: skip
        return 2
    if not retargeted:
        print(f"warning: {args.output_dir} keeps no model card inputs ({CARD_INPUTS}): its README.md is pushed as "
              f"written, naming the repo id the run was trained for", file=sys.stderr)  # fmt: skip
    try:
        print(push_folder(args.output_dir, args.hub_model_id, args.token, args.private or None, args.revision))
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors")


def model_files_in(folder: str) -> list[str]:
    """The files that make `folder` a model (or adapter) folder, which no command writes into but training."""
    return [name for name in MODEL_FILES if os.path.isfile(os.path.join(folder, name))]


def merge_lora_command(argv: list[str]) -> int:
    from .model import ModelError, adapter_base, check_model_source, load_model, load_processor, save_merged

    parser = argparse.ArgumentParser(
        prog="blip-recipes merge-lora",
        description="Fold a LoRA adapter into its base model and save a plain BLIP checkpoint, with the adapter's "
        "processor and decoding settings.",
    )
    parser.add_argument("adapter_dir", help="a LoRA run's output_dir (holds adapter_config.json), or its Hub repo")
    parser.add_argument("output_dir", help="where the merged model is written")
    args = parser.parse_args(argv)
    held = model_files_in(args.output_dir)
    if held:  # the adapter's own folder, or another model: writing there would overwrite or mix them
        parser.error(f"{args.output_dir} already holds a model ({', '.join(held)}); give a new or empty folder")
    try:
        check_model_source(args.adapter_dir)
        if adapter_base(args.adapter_dir) is None:
            parser.error(f"{args.adapter_dir} holds no adapter_config.json: not a LoRA adapter")
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problem = _unwritable(os.path.join(args.output_dir, "config.json"))
    if problem:
        parser.error(f"{args.output_dir}: {problem}")
    try:
        adapter = load_model(args.adapter_dir)
        processor = load_processor(args.adapter_dir)
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_merged(adapter, processor, args.output_dir)
    print(f"merged model written to {args.output_dir}")
    return 0


COMMANDS = {
    "train": (train_command, "fine-tune from a YAML recipe (same as: accelerate launch -m blip_recipes.train ...)"),
    "evaluate": (evaluate_command, "caption a dataset split with a finished model and score it (no training)"),
    "score": (score_command, "score saved predictions against their references"),
    "caption": (caption_command, "caption images with a full model or a LoRA adapter"),
    "serve": (serve_command, "HTTP captioning service (POST /caption, GET /health)"),
    "push": (push_command, "upload a finished run to the Hub"),
    "merge-lora": (merge_lora_command, "fold a LoRA adapter into its base model"),
}


def top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip-recipes",
        description="Fine-tune, evaluate, publish and serve BLIP image-captioning models. "
        "`blip-recipes COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_run, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def quiet_upstream_noise() -> None:
    """Warnings about library code calling library code, which nothing in a recipe or command line changes, and the
    traceback of a DataLoader worker's hang-up (below)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator is found.*")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 calls torch.set_vital
    # peft 0.21 reads model.is_gradient_checkpointing, which transformers 5 deprecates, on every LoRA load
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Installed, DeepSpeed is imported in every run (accelerate's unwrap_model looks for its engine); without a GPU its
    # accelerator probe then says "Setting accelerator to CPU. If you have GPU ... we were unable to detect it" in
    # runs that do not use it (the run's own log names its device and engine).
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if _without_cpu_probe not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_without_cpu_probe)
    if not getattr(sys.excepthook, "quiet_worker_hangups", False):
        sys.excepthook = _without_worker_hangups(sys.excepthook)


def _without_cpu_probe(record) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def _without_worker_hangups(excepthook):
    """sys.excepthook without the connection errors of multiprocessing's resource_sharer thread, which hands
    DataLoader workers' tensors to this process and reports its errors through sys.excepthook: Ctrl-C (sent to the
    whole process group) or an OOM kill can end a worker mid-handover, and a ConnectionResetError traceback was
    printed beside the run's own message. The DataLoader itself reports a worker that died while training needs it."""

    def hook(kind, error, trace):
        sharer = os.path.join("multiprocessing", "resource_sharer.py")
        if issubclass(kind, (ConnectionError, EOFError)) and any(
            frame.filename.endswith(sharer) for frame in traceback.extract_tb(trace)
        ):
            return
        excepthook(kind, error, trace)

    hook.quiet_worker_hangups = True
    return hook


def main(argv: list[str] | None = None) -> int:
    """Dispatch to COMMAND's own parser: it owns every argument after the command name, --help included."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_level_parser().parse_args(argv[:1])  # --help: the commands, exit 0; else the error and choices, exit 2
        return 2
    run, _help = COMMANDS[argv[0]]
    quiet_upstream_noise()
    try:
        return run(argv[1:])
    except KeyboardInterrupt:  # train says more itself (where to resume from)
        print(f"\ninterrupted (Ctrl-C): blip-recipes {argv[0]} stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
