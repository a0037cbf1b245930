"""The JSON file every benchmark script writes with `--json FILE`: the machine, torch's version, the script's own
fields and its result rows. Scripts run as `python benchmarks/NAME.py`, so this directory is on their import path."""

import json
import os
import platform


def write_report(path: str | None, results: list, **fields) -> None:
    """Write (or rewrite: a script may save after every row) the report to `path`; nothing when `path` is None."""
    if not path:
        return
    import torch

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, **fields, "results": results}  # fmt: skip
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
