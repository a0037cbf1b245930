"""The unmodified coco-caption toolkit (pycocoevalcap), run the way its example runs it, for cross-checking.

`official_scores` copies pycocoevalcap's Python files into a scratch directory (its jars and data are linked, not
copied; its scorers write temp files next to themselves) and runs PTBTokenizer, Bleu(4), Meteor(), Rouge() and
Cider() there in a subprocess. blip_recipes.metrics must give the same numbers to the last digit.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from blip_recipes.metrics import _package_dir

_SCRIPT = r"""
import json, sys, time
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.cider.cider import Cider
import pycocoevalcap.tokenizer.ptbtokenizer as located
assert located.__file__.startswith(sys.argv[1]), located.__file__
cases = json.load(open(sys.argv[2]))
meteor = None
out = {}
for name, (predictions, references) in cases.items():
    start = time.perf_counter()
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": p}] for i, p in enumerate(predictions)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    scores = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        scores["bleu_%d" % (n + 1)] = bleu[n]
    meteor = meteor or Meteor()  # its JVM start-up is part of the first case's time, as in every pycocoevalcap run
    scores["meteor"] = meteor.compute_score(gts, res)[0]
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    out[name] = {"scores": scores, "seconds": time.perf_counter() - start}
print("RESULT" + json.dumps(out))
"""


def official_scores(cases: dict[str, tuple[list[str], list[list[str]]]], timeout: float = 1800) -> dict:
    """{case: (predictions, references)} -> {case: {"scores": {...}, "seconds": wall time of that case}}.

    One METEOR JVM serves all cases, so only the first case's time includes its start-up.
    """
    work = tempfile.mkdtemp(prefix="coco-caption-")
    try:
        source = _package_dir()
        copy = os.path.join(work, "official", "pycocoevalcap")
        for root, _dirs, files in os.walk(source):
            target = os.path.join(copy, os.path.relpath(root, source))
            os.makedirs(target, exist_ok=True)
            for name in files:
                origin = os.path.join(root, name)
                (shutil.copy if name.endswith(".py") else os.symlink)(origin, os.path.join(target, name))
        with open(os.path.join(work, "cases.json"), "w", encoding="utf-8") as handle:
            json.dump(cases, handle)
        with open(os.path.join(work, "official.py"), "w", encoding="utf-8") as handle:
            handle.write(_SCRIPT)
        official_root = os.path.dirname(copy)
        result = subprocess.run(
            [sys.executable, os.path.join(work, "official.py"), official_root, os.path.join(work, "cases.json")],
            env={**os.environ, "PYTHONPATH": official_root}, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pycocoevalcap failed: {result.stderr[-3000:]}")
        return json.loads(result.stdout.split("RESULT", 1)[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
