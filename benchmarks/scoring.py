"""Caption scoring time: pycocoevalcap as people call it vs blip_recipes.metrics, on identical inputs.

    python benchmarks/scoring.py                 # 5,000 images x 5 references (synthetic text), ~1-2 min

"before": pycocoevalcap's PTBTokenizer, Bleu(4), a new Meteor() (its own JVM), Rouge(), Cider(), as the
coco-caption example runs them per evaluation. "after": compute_caption_metrics, first call (starts the shared
METEOR JVM) and second call (what every later evaluation in a training run pays). Both give the same numbers.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip_recipes import metrics  # noqa: E402
from tests.reference_metrics import official_scores  # noqa: E402

WORDS = ("a man woman dog cat red blue green small large sitting standing on the in at of with near top riding "
         "table street grass water beach plate food bus train car bike horse two three people").split()  # fmt: skip


def synthetic(images: int, references: int, seed: int = 0):
    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))

    return [sentence() for _ in range(images)], [[sentence() for _ in range(references)] for _ in range(images)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--references", type=int, default=5)
    args = parser.parse_args()
    predictions, references = synthetic(args.images, args.references)
    before = official_scores({"synthetic": (predictions, references)})["synthetic"]
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        ours = metrics.compute_caption_metrics(predictions, references)
        timings.append(time.perf_counter() - start)
    for key, value in before["scores"].items():
        assert ours[key] == value, (key, ours[key], value)
    print(f"{args.images} images x {args.references} references")
    print(f"pycocoevalcap (new METEOR JVM per call):   {before['seconds']:6.2f} s")
    print(f"blip_recipes.metrics, first call:          {timings[0]:6.2f} s")
    print(f"blip_recipes.metrics, later calls:         {timings[1]:6.2f} s")
    print(f"speedup (later calls): {before['seconds'] / timings[1]:.1f}x; identical scores: {before['scores']}")


if __name__ == "__main__":
    main()
