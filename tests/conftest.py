"""Shared fixtures. Everything is offline: the builtin tiny BLIP and shapes data are generated into a temp cache."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.preload import PRELOADED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Before anything imports huggingface_hub/datasets: the tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The usual umask, whatever the machine's: a file written 0600 (safetensors' temporary file) then stands out.
os.umask(0o022)


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """A private cache for builtin:* so tests neither depend on nor disturb ~/.cache."""
    path = str(tmp_path_factory.mktemp("blip_recipes_cache"))
    os.environ["BLIP_RECIPES_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(builtin_cache):
    from blip_recipes.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-blip")


@pytest.fixture(scope="session")
def shapes_dir(builtin_cache):
    from blip_recipes.builtin import resolve_builtin

    return resolve_builtin("builtin:shapes")


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from blip_recipes.model import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(scope="session", autouse=True)
def preloaded_interpreter():
    yield PRELOADED
    PRELOADED.stop()


def run_cli(args, cwd=REPO, timeout=600, env=None, launcher=None):
    """Run `python -m blip_recipes.cli ...` (or an accelerate launch line) and return the CompletedProcess. Without a
    launcher, in a child of the preloaded interpreter (tests/preload.py) when the environment allows."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    preloaded = PRELOADED.run(args, cwd, full_env, timeout) if launcher is None else None
    if preloaded is not None:
        return preloaded
    command = launcher or [sys.executable, "-m", "blip_recipes.cli"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_main(arguments, capfd, caplog) -> subprocess.CompletedProcess:
    """`blip-recipes ARGUMENTS` through blip_recipes.cli.main in this process, answered as run_cli answers, with the
    log records at the end of stderr. Without the 6 s a new interpreter takes to import torch and transformers; an
    exception that escapes fails the test, as a traceback would. Runs that depend on what huggingface_hub read from
    the environment at import (HF_ENDPOINT, HF_HUB_OFFLINE), on signals or on a launcher go through run_cli."""
    import logging

    import datasets
    import transformers

    from blip_recipes.cli import main

    arguments = [str(argument) for argument in arguments]
    # train sets these from its log_level; the next test starts from the defaults again.
    levels = (transformers.logging.get_verbosity(), datasets.logging.get_verbosity(),
              logging.getLogger("blip_recipes").level)  # fmt: skip
    caplog.clear()
    try:
        code = main(arguments)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    finally:
        transformers.logging.set_verbosity(levels[0])
        datasets.logging.set_verbosity(levels[1])
        logging.getLogger("blip_recipes").setLevel(levels[2])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(arguments, code, out, err + caplog.text)


def lines_until(process, marker: str, count: int, timeout: float = 300) -> tuple[list[str], int]:
    """Read `process`'s output until `count` lines contain `marker` (or it ends, or `timeout` s pass): (the lines
    read, how many of them contain it)."""
    import time

    lines, seen, deadline = [], 0, time.monotonic() + timeout
    while seen < count and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        seen += marker in line
    return lines, seen


def signal_at(args, marker, sig, count=1, env=None, process_group=False):
    """Run `python -m blip_recipes.cli ARGS` (in a child of the preloaded interpreter when the environment allows),
    send `sig` when the `count`-th line containing `marker` appears (to the whole process group with
    `process_group`, as a terminal sends Ctrl-C), and return (exit code, whole log).

    The command gets `sig`'s default disposition, as a foreground command of a terminal has it: a suite started in
    the background of a shell without job control (`make test &`) runs with SIGINT ignored, which its children
    inherit, and Ctrl-C would then be ignored by design, not by the code under test."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = PRELOADED.popen(args, REPO, full_env, session=process_group, default_signal=sig)
    if process is None:  # an environment the preloaded interpreter cannot take: a new one
        process = subprocess.Popen(
            [sys.executable, "-m", "blip_recipes.cli", *args], cwd=REPO, text=True, start_new_session=process_group,
            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
        )  # fmt: skip
    lines, seen = lines_until(process, marker, count)
    if seen == count:
        os.killpg(process.pid, sig) if process_group else process.send_signal(sig)
    rest, _ = process.communicate(timeout=300)
    return process.returncode, "".join(lines) + rest


def encoder_calls(model) -> list[int]:
    """Images per run of the model's vision encoder (its patch embedding), appended as the encoder runs: a feature
    lookup or a shared image is not a run."""
    from blip_recipes.adapt import unwrap_blip

    calls = []

    def count(module, args, kwargs):
        calls.append(len(kwargs.get("pixel_values", args[0] if args else None)))

    unwrap_blip(model).vision_model.embeddings.register_forward_pre_hook(count, with_kwargs=True)
    return calls


def assert_readable_by_everyone(folder):
    """Under umask 022 every file a run writes is 0644 and every folder 0755, so another user (or `serve` in a
    container built as root) can read the model, as they can its config.json."""
    modes = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, folder)] = (os.stat(path).st_mode & 0o777, 0o755 if name in folders else 0o644)
    wrong = {path: f"{mode:o}" for path, (mode, expected) in modes.items() if mode != expected}
    assert any(path.endswith(".safetensors") for path in modes) and not wrong, wrong


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# Short, fast training settings shared by the tests that run the shapes recipes.
QUICK = [
    "--per_device_train_batch_size", "16",
    "--logging_steps", "1",
    "--eval_on_start", "false",
    "--eval_strategy", "no",
    "--save_strategy", "no",
    "--dataloader_num_workers", "0",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip


def hub_cache_with(cache, repo_id, folder) -> dict:
    """A Hub cache holding `folder`'s files as `repo_id`'s main revision, as a download leaves it, and the
    environment that reads it offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
