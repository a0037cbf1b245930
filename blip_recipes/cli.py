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
"""

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    if command == "evaluate":
        return evaluate_command(rest)
    if command == "score":
        return score_command(rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
