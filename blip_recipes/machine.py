"""What this machine can run on, turned into training-argument defaults (kept out of recipe parsing)."""

import os


def launcher_precision(environ=os.environ) -> str:
    """The mixed precision `accelerate launch` asks for (its config file's mixed_precision, or --mixed_precision):
    no, bf16, fp16 or fp8. The Trainer would train in it even when the recipe says fp32 (bf16/fp16 false)."""
    return environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"


def launcher_compile(environ=os.environ) -> dict:
    """The torch.compile `accelerate launch` asks for (its config file's dynamo_config, or --dynamo_backend), as
    recipe keys; {} when none. accelerate compiles the model with it even when the recipe says torch_compile: false."""
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower() or "no"
    if backend == "no":
        return {}
    mode = environ.get("ACCELERATE_DYNAMO_MODE", "").strip()
    return {"torch_compile": True, "torch_compile_backend": backend, **({"torch_compile_mode": mode} if mode else {})}


def launcher_processes_dropped(environ=os.environ, launcher_command: list[str] | None = None) -> int | None:
    """The process count `accelerate launch` was asked for when it started this process alone, else None.

    Without --multi_gpu on a machine without GPUs (or with --cpu), accelerate's simple launcher runs one process and
    drops --num_processes (or its config file's num_processes) without a word. This process is its child: it has
    the launcher's environment (ACCELERATE_USE_CPU) and no WORLD_SIZE, and the count is in the launcher's own command
    line, read from /proc (Linux; elsewhere nothing is said)."""
    if "ACCELERATE_USE_CPU" not in environ or int(environ.get("WORLD_SIZE", "1")) > 1:
        return None
    if launcher_command is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
                launcher_command = handle.read().decode(errors="replace").split("\0")
        except OSError:
            return None
    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`: the launcher's options come after
    starts = [
        index for index, token in enumerate(launcher_command) if token in ("launch", "accelerate.commands.launch")
    ]
    if not starts:
        return None
    options: dict[str, str] = {}
    tokens = iter(launcher_command[starts[0] + 1 :])
    for token in tokens:
        if token == "-m" or token.endswith(".py"):
            break  # the training script and its own arguments follow
        name, _, value = token.partition("=")
        if name.replace("-", "_") in ("__num_processes", "__config_file"):
            options[name.replace("-", "_")] = value or next(tokens, "")
    count = options.get("__num_processes")
    if count is None and options.get("__config_file"):
        import yaml

        try:
            with open(options["__config_file"], encoding="utf-8") as handle:
                config = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError):
            return None
        if str(config.get("distributed_type", "NO")).upper() != "NO":
            return None
        count = config.get("num_processes")
    try:
        count = int(count)
    except (TypeError, ValueError):
        return None
    return count if count > 1 else None


def machine_defaults(environ=os.environ) -> dict:
    """No GPU/XPU/MPS here: run on the CPU explicitly (several processes become one gloo data-parallel job).

    Without use_cpu the Trainer finds no distributed backend for CPU ranks and silently trains every rank alone
    on its own copy of the model, and a GPU recipe's `bf16: true` is refused instead of running CPU autocast.
    A recipe or command line that sets these keys wins.
    """
    import torch

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return {}
    if torch.backends.mps.is_available():
        return {}
    defaults = {"use_cpu": True}
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        defaults["ddp_backend"] = "gloo"
    return defaults
