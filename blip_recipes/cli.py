"""`blip-recipes COMMAND ...`: train, evaluate, score, caption, serve, merge-lora."""

import json
import os
import sys

USAGE = """usage: blip-recipes COMMAND [ARGS]

commands:
  train RECIPE.yaml [--key value ...]
        fine-tune (same as: accelerate launch -m blip_recipes.train RECIPE.yaml ...)
  evaluate [RECIPE.yaml] --model PATH_OR_HUB_ID --dataset NAME_OR_PATH [--split test] [--num_beams 3]
           [--max_length 30] [--min_length 5] [--prompt TEXT] [--batch_size 64] [--output_dir DIR] [--key value ...]
        caption a dataset split with a full model or a LoRA adapter and score it (no training)
  score PREDICTIONS.jsonl [--metrics bleu,meteor,rouge_l,cider]
        score saved predictions ({"prediction", "references"} per line) against their references
  caption IMAGE_OR_DIR... --model PATH_OR_HUB_ID [--prompt TEXT] [--num_beams 3] [--output captions.jsonl]
        caption images with a full model or a LoRA adapter (batched; GPU when present)
  serve --model PATH_OR_HUB_ID [--host 127.0.0.1] [--port 8000] [--max_upload_mb 20]
        HTTP service: POST /caption (image upload) -> {"caption": ...}; GET /health (needs the serve extra)
  push OUTPUT_DIR --hub_model_id USER/NAME [--private] [--token TOKEN]
        upload a finished run (weights, processor, model card, results) to the Hub
  merge-lora ADAPTER_DIR OUTPUT_DIR
        fold a LoRA adapter into its base model and save a plain BLIP checkpoint
"""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

EVALUATE_ALIASES = {
    "--model": "--model_name_or_path",
    "--dataset": "--dataset_name",
    "--split": "--eval_split",
    "--num_beams": "--generation_num_beams",
    "--max_length": "--generation_max_length",
    "--min_length": "--generation_min_length",
    "--batch_size": "--per_device_eval_batch_size",
    "--metrics": "--eval_metrics",
}


def _expand_aliases(argv: list[str], aliases: dict) -> list[str]:
    expanded = []
    for token in argv:
        key, sep, value = token.partition("=")
        expanded.append(aliases.get(key, key) + sep + value if key in aliases else token)
    return expanded


def evaluate_command(argv: list[str]) -> int:
    """Score a finished model on one split, with the same generation, files and metrics as training runs."""
    from .config import RecipeError, parse_recipe
    from .data import DataError
    from .metrics import MetricsError, check_metric_requirements
    from .train import build_trainer, setup_logging

    argv = _expand_aliases(argv, EVALUATE_ALIASES)
    if "--model_name_or_path" not in " ".join(argv):
        print("error: evaluate needs --model PATH_OR_HUB_ID", file=sys.stderr)
        return 2
    model = next(argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--model_name_or_path")
    defaults = ["--output_dir", os.path.join("evaluations", os.path.basename(os.path.normpath(model)) or "model")]
    try:
        recipe = parse_recipe(_with_defaults(argv, defaults))
        setup_logging(recipe.training)
        check_metric_requirements(recipe.training.eval_metrics)
        trainer = build_trainer(recipe, for_training=False)
    except (RecipeError, DataError, MetricsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    trainer.flat_evaluation_dir = True
    split = trainer.eval_dataset.split.name
    metrics = trainer.evaluate(metric_key_prefix=split.replace("[held-out]", ""))
    if trainer.is_world_process_zero():
        with open(os.path.join(recipe.training.output_dir, "eval_results.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
        print(json.dumps(metrics, indent=2))
    return 0


def _with_defaults(argv: list[str], defaults: list[str]) -> list[str]:
    """Append `--key value` defaults the user did not give (after a leading recipe path, if any)."""
    given = {token.partition("=")[0] for token in argv if token.startswith("--")}
    extra = []
    for index in range(0, len(defaults), 2):
        if defaults[index] not in given:
            extra += defaults[index : index + 2]
    return argv + extra


def score_command(argv: list[str]) -> int:
    from .evaluation import read_predictions, write_jsonl
    from .metrics import DEFAULT_METRICS, MetricsError, score_captions

    if not argv or argv[0].startswith("--"):
        print("error: score needs a predictions JSONL file", file=sys.stderr)
        return 2
    path, rest = argv[0], _expand_aliases(argv[1:], {"--metrics": "--metrics"})
    metrics = list(DEFAULT_METRICS)
    for index, token in enumerate(rest):
        if token.startswith("--metrics"):
            value = token.partition("=")[2] or (rest[index + 1] if index + 1 < len(rest) else "")
            metrics = [name.strip() for name in value.split(",") if name.strip()]
    try:
        image_ids, predictions, references = read_predictions(path)
        corpus, per_image = score_captions(predictions, references, metrics)
    except (OSError, ValueError, MetricsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stem = os.path.splitext(path)[0]
    write_jsonl(
        f"{stem}.scored.jsonl",
        (
            {"image_id": i, "prediction": p, "references": r, "scores": s}
            for i, p, r, s in zip(image_ids, predictions, references, per_image)
        ),
    )
    with open(f"{stem}.metrics.json", "w", encoding="utf-8") as handle:
        json.dump(corpus, handle, indent=2)
    print(json.dumps(corpus, indent=2))
    return 0


def _captioner_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="fine-tuned model directory or Hub id (full or LoRA adapter)")
    parser.add_argument("--prompt", default="", help="decoder prompt used in training, e.g. 'a picture of '")
    parser.add_argument("--num_beams", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--min_length", type=int, default=None)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


def _image_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(
                os.path.join(root, name)
                for root, _dirs, names in os.walk(path)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            files.append(path)
    return files


def caption_command(argv: list[str]) -> int:
    import argparse

    from .evaluation import Captioner, write_jsonl
    from .transforms import BadImageError, open_image

    parser = argparse.ArgumentParser(prog="blip-recipes caption")
    parser.add_argument("images", nargs="+", help="image files or directories")
    _captioner_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", default=None, help="write JSONL ({image, caption}) here instead of printing")
    args = parser.parse_args(argv)
    files = _image_files(args.images)
    if not files:
        print("error: no images found", file=sys.stderr)
        return 2
    captioner = Captioner(args.model, args.prompt, args.num_beams, args.max_length, args.min_length, args.device)
    rows, failed = [], 0
    for start in range(0, len(files), args.batch_size):
        batch, names = [], []
        for path in files[start : start + args.batch_size]:
            try:
                batch.append(open_image(path))
                names.append(path)
            except BadImageError as error:
                print(f"{path}: skipped, {error}", file=sys.stderr)
                failed += 1
        if batch:
            for path, text in zip(names, captioner.caption(batch)):
                rows.append({"image": path, "caption": text})
                if not args.output:
                    print(f"{path}\t{text}", flush=True)
    if args.output:
        write_jsonl(args.output, rows)
        print(f"{len(rows)} captions written to {args.output}")
    return 1 if failed else 0


def serve_command(argv: list[str]) -> int:
    import argparse

    from .evaluation import Captioner
    from .serve import serve

    parser = argparse.ArgumentParser(prog="blip-recipes serve")
    _captioner_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_upload_mb", type=float, default=20.0)
    args = parser.parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: serving needs the serve extra: pip install 'blip-recipes[serve]'", file=sys.stderr)
        return 2
    captioner = Captioner(args.model, args.prompt, args.num_beams, args.max_length, args.min_length, args.device)
    serve(captioner, args.host, args.port, int(args.max_upload_mb * 2**20))
    return 0


def push_command(argv: list[str]) -> int:
    import argparse

    from .hub import PushError, push_folder

    parser = argparse.ArgumentParser(prog="blip-recipes push")
    parser.add_argument("output_dir")
    parser.add_argument("--hub_model_id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the saved login")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.output_dir, "README.md")):
        print(f"error: {args.output_dir} has no README.md model card; is it a finished run?", file=sys.stderr)
        return 2
    try:
        print(push_folder(args.output_dir, args.hub_model_id, args.token, args.private or None))
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


def merge_lora_command(argv: list[str]) -> int:
    from .model import is_lora_adapter, load_model, load_processor, merge_lora

    if len(argv) != 2 or not is_lora_adapter(argv[0]):
        print("usage: blip-recipes merge-lora ADAPTER_DIR OUTPUT_DIR (ADAPTER_DIR holds adapter_config.json)",
              file=sys.stderr)  # fmt: skip
        return 2
    adapter, output_dir = argv
    merge_lora(load_model(adapter)).save_pretrained(output_dir)
    load_processor(adapter).save_pretrained(output_dir)
    print(f"merged model written to {output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    commands = {
        "evaluate": evaluate_command,
        "score": score_command,
        "caption": caption_command,
        "serve": serve_command,
        "push": push_command,
        "merge-lora": merge_lora_command,
    }
    if command in commands:
        return commands[command](rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
