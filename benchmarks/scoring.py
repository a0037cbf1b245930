"""Caption scoring time: pycocoevalcap as people call it vs blip_recipes.metrics, on identical inputs.

    python benchmarks/scoring.py                 # 5,000 images x 5 references (synthetic text), ~1-2 min

"before": pycocoevalcap's PTBTokenizer, Bleu(4), a new Meteor() (its own JVM), Rouge(), Cider(), as the
coco-caption example runs them per evaluation. "after": compute_caption_metrics, first call (starts the shared
METEOR JVM) and second call (what every later evaluation in a training run pays). Both give the same numbers.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip_recipes import metrics  # noqa: E402

WORDS = ("a man woman dog cat red blue green small large sitting standing on the in at of with near top riding "
         "table street grass water beach plate food bus train car bike horse two three people").split()  # fmt: skip

OFFICIAL = r"""
import json, sys, time
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.cider.cider import Cider
predictions, references = json.load(open(sys.argv[1]))
start = time.perf_counter()
gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
res = {i: [{"caption": p}] for i, p in enumerate(predictions)}
tokenizer = PTBTokenizer()
gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
scores = {}
bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
scores["bleu_4"] = bleu[3]
scores["meteor"] = Meteor().compute_score(gts, res)[0]
scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
scores["cider"] = float(Cider().compute_score(gts, res)[0])
print("RESULT" + json.dumps({"seconds": time.perf_counter() - start, "scores": scores}))
"""


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
    work = tempfile.mkdtemp(prefix="scoring-")
    # pycocoevalcap writes temp files into its own folder: run it from a scratch copy (jars linked, not copied).
    source = metrics._package_dir()
    copy = os.path.join(work, "official", "pycocoevalcap")
    for root, _dirs, files in os.walk(source):
        target = os.path.join(copy, os.path.relpath(root, source))
        os.makedirs(target, exist_ok=True)
        for name in files:
            origin = os.path.join(root, name)
            (shutil.copy if name.endswith(".py") else os.symlink)(origin, os.path.join(target, name))
    data = os.path.join(work, "data.json")
    with open(data, "w") as handle:
        json.dump([predictions, references], handle)
    script = os.path.join(work, "official.py")
    with open(script, "w") as handle:
        handle.write(OFFICIAL)
    result = subprocess.run([sys.executable, script, data], env={**os.environ, "PYTHONPATH": os.path.dirname(copy)},
                            capture_output=True, text=True, check=True)  # fmt: skip
    before = json.loads(result.stdout.split("RESULT", 1)[1])
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
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
