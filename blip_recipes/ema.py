"""`ema_decay`: an exponential moving average of the trainable weights, evaluated and saved in their place.

After every optimizer step, average = decay x average + (1 - decay) x weights (for the parameters that train: all
of them, the text side, or the LoRA adapters). Evaluations and the final saved model use the average; training
goes on from the raw weights. Each checkpoint holds the raw weights (as always) and the average (`ema.safetensors`),
so a resume continues both exactly.
"""

import contextlib
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .adapt import unwrap_blip
from .checkpoints import share_as_umask_allows

EMA_FILE = "ema.safetensors"


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unwrap_blip(model).named_parameters() if p.requires_grad}


class WeightAverage(TrainerCallback):
    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.average: dict[str, torch.Tensor] | None = None
        self._resumed: dict[str, torch.Tensor] | None = None

    def load(self, checkpoint: str) -> None:
        """The average saved in `checkpoint`, taken up when training starts."""
        path = os.path.join(checkpoint, EMA_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint {checkpoint}: no {EMA_FILE} (the run had no ema_decay)")
        self._resumed = load_file(path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        parameters = trainable_parameters(model)
        if self._resumed is not None:
            if set(self._resumed) != set(parameters):
                raise ValueError(f"{EMA_FILE}: its tensors are not this model's trainable parameters")
            self.average = {name: self._resumed[name].to(p.device) for name, p in parameters.items()}
            self._resumed = None
        elif self.average is None:
            self.average = {name: p.detach().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, p in trainable_parameters(model).items():
            self.average[name].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and self.average is not None and os.path.isdir(checkpoint):
            save_file({name: t.detach().cpu().contiguous() for name, t in self.average.items()},
                      os.path.join(checkpoint, EMA_FILE))  # fmt: skip
            share_as_umask_allows(checkpoint)

    @contextlib.contextmanager
    def applied(self, model):
        """The model holds the average inside the block, its raw weights again after it."""
        if self.average is None:
            yield
            return
        parameters = trainable_parameters(model)
        raw = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(raw[name])
