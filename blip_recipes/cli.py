"""`blip-recipes COMMAND ...`: train, evaluate, score, caption, serve, merge-lora."""

import sys

USAGE = """usage: blip-recipes COMMAND [ARGS]

commands:
  train RECIPE.yaml [--key value ...]   fine-tune (same as: python -m blip_recipes.train)
  score PREDICTIONS.jsonl               score saved predictions against their references
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
