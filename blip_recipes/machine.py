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
