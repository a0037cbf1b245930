"""What this machine can run on, turned into training-argument defaults (kept out of recipe parsing)."""

import os


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
