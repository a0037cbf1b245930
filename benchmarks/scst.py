"""Self-critical training speed: SCST steps per second against cross-entropy steps, same images per step.

    python benchmarks/scst.py --quick                 # the tiny builtin model on builtin:shapes, CPU, ~1 min
    python benchmarks/scst.py --model DIR --json FILE  # any captioning model (e.g. a BLIP-base run) on a GPU

An SCST step on B images samples B x K captions (multinomial, or the K beams of a beam search) and (greedy
baseline) B greedy captions without gradients, scores
them (CIDEr-D in process), then runs one teacher-forced pass with gradients over the B x K samples; a cross-entropy
step runs one pass over B (image, caption) pairs. Reported per configuration: steps/s, training images/s and, for
SCST, sampled captions/s, over `--steps` timed steps after `--warmup`.
"""

import argparse
import json
import os
import sys
import tempfile
import time

from report import write_report

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed_run(model: str, output_dir: str, objective: str, baseline: str, sampling: str, batch: int, samples: int,
              warmup: int, steps: int) -> dict:  # fmt: skip
    from transformers import TrainerCallback

    from blip_recipes.builders import build_trainer
    from blip_recipes.recipe_parser import parse_recipe

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    arguments = [os.path.join(repo, "recipes", "shapes", "full.yaml"), "--model_name_or_path", model,
                 "--output_dir", output_dir, "--max_steps", str(warmup + steps), "--per_device_train_batch_size",
                 str(batch), "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
                 "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1000",
                 "--dataloader_num_workers", "0", "--training_objective", objective]  # fmt: skip
    if objective == "scst":
        arguments += ["--scst_baseline", baseline, "--scst_sampling", sampling, "--scst_num_samples", str(samples)]
    trainer = build_trainer(parse_recipe(arguments))
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    seconds = stamps[-1] - stamps[warmup - 1]
    rate = steps / seconds
    result = {"objective": objective, "batch_images": batch, "steps_per_second": round(rate, 3),
              "images_per_second": round(rate * batch, 1)}  # fmt: skip
    if objective == "scst":
        result.update(baseline=baseline, sampling=sampling, samples_per_image=samples,
                      sampled_captions_per_second=round(rate * batch * samples, 1))  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny builtin model (trained briefly first)")
    parser.add_argument("--model", help="a captioning model directory (default with --quick: a tiny model)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as directory:
        model = args.model
        if model is None:
            if not args.quick:
                parser.error("give --model DIR, or --quick for the tiny builtin model")
            from blip_recipes.builders import build_trainer
            from blip_recipes.recipe_parser import parse_recipe

            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            model = os.path.join(directory, "ce")
            trainer = build_trainer(parse_recipe([os.path.join(repo, "recipes", "shapes", "full.yaml"),
                                                  "--output_dir", model, "--max_steps", "60", "--eval_strategy", "no",
                                                  "--eval_on_start", "false", "--save_strategy", "no",
                                                  "--disable_tqdm", "true"]))  # fmt: skip
            trainer.train()
            trainer.save_model()
        results = []
        configurations = [("cross_entropy", None, None), ("scst", "greedy", "multinomial"),
                          ("scst", "mean", "multinomial"), ("scst", "mean", "beam")]  # fmt: skip
        for objective, baseline, sampling in configurations:
            result = timed_run(model, os.path.join(directory, f"{objective}-{baseline}-{sampling}"), objective,
                               baseline, sampling, args.batch, args.samples, args.warmup, args.steps)  # fmt: skip
            results.append(result)
            print(json.dumps(result), flush=True)
    write_report(args.json, results, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 model=args.model or "builtin:tiny-blip (60 cross-entropy steps)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
