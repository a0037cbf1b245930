"""Caption metrics exactly as the coco-caption toolkit (pycocoevalcap) computes them, without its hazards.

The numbers come from pycocoevalcap's own scorers (BLEU, ROUGE-L, CIDEr-D) and its bundled jars (Stanford PTB
tokenizer, METEOR 1.5, SPICE). What changes is how the jars are driven:
- temp files live in a temp directory, never inside site-packages (which may be read-only);
- the JVMs run with UTF-8 and an English locale (a comma-decimal locale breaks METEOR's number parsing);
- METEOR is one JVM per process lifetime (each pycocoevalcap call pays ~7 s starting it), its requests are
  pipelined instead of one round trip per image, and every read has a timeout: a failure is an error, not a hang;
- line breaks of any kind inside a caption become spaces (the PTB tokenizer splits lines on \\r, U+2028, ...,
  which silently shifts every later caption onto the wrong image).
"""

import atexit
import contextlib
import io
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

# The names a recipe asks for (eval_metrics), the keys they produce, and how a model card shows each key: the one
# source for every module that names a metric.
METRIC_FAMILIES = ("bleu", "meteor", "rouge_l", "cider", "spice")
DEFAULT_METRICS = ("bleu", "meteor", "rouge_l", "cider")
METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
METRIC_ORDER = (*METRIC_KEYS, "spice")
METRIC_DISPLAY_NAMES = {
    "bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4",
    "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE",
}  # fmt: skip


def metric_keys(families) -> set[str]:
    """The result keys that asking for `families` (e.g. ["bleu", "cider"]) produces."""
    return {
        key
        for family in families
        for key in (("bleu_1", "bleu_2", "bleu_3", "bleu_4") if family == "bleu" else (family,))
    }


_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
JAVA_LOCALE_FLAGS = ["-Dfile.encoding=UTF-8", "-Dsun.stdout.encoding=UTF-8", "-Duser.language=en", "-Duser.country=US"]
METEOR_TIMEOUT_S = float(os.environ.get("BLIP_RECIPES_METEOR_TIMEOUT", "600"))


class MetricsError(RuntimeError):
    """A scorer could not run (missing Java, missing SPICE models, a METEOR failure)."""


def _package_dir(*parts: str) -> str:
    import pycocoevalcap  # a namespace package: no __init__.py, so no __file__

    return os.path.join(list(pycocoevalcap.__path__)[0], *parts)


def java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise MetricsError(
            "caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR are Java programs) and none is on "
            "PATH. Install it, e.g. `apt-get install default-jre-headless` or `conda install -c conda-forge openjdk`."
        )
    return java


def spice_jars() -> list[str]:
    lib = _package_dir("spice", "lib")
    return [os.path.join(lib, name) for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")]


def check_metric_requirements(metrics) -> None:
    """Fail at start-up, not after training, when a requested metric cannot be computed here."""
    java_executable()
    if "spice" in metrics:
        missing = [path for path in spice_jars() if not os.path.isfile(path)]
        if missing:
            raise MetricsError(
                "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads at first use; this machine has "
                f"no copy ({', '.join(missing)} missing) and cannot download it offline. Run "
                "`python -m pycocoevalcap.spice.get_stanford_models` with network access (or copy the two jars "
                "there), or drop spice from eval_metrics."
            )


def _java_env() -> dict:
    return {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


def clean_caption(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text)


def ptb_tokenize(texts: list[str], timeout: float = 600.0) -> list[str]:
    """pycocoevalcap's PTBTokenizer: Stanford PTB tokens, lowercased, punctuation tokens removed."""
    if not texts:
        return []
    jar = _package_dir("tokenizer", "stanford-corenlp-3.4.1.jar")
    with tempfile.TemporaryDirectory(prefix="ptb-") as workdir:
        path = os.path.join(workdir, "captions.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(clean_caption(text) for text in texts))
        command = [java_executable(), *JAVA_LOCALE_FLAGS, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer"]
        command += ["-preserveLines", "-lowerCase", path]
        try:
            result = subprocess.run(
                command, cwd=workdir, env=_java_env(), capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise MetricsError(f"PTB tokenizer did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise MetricsError(f"PTB tokenizer failed ({result.returncode}): {result.stderr.decode()[-500:]}")
    lines = result.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts):
        raise MetricsError(f"PTB tokenizer returned {len(lines)} lines for {len(texts)} captions")
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS  # the tokens its scorers drop

    punctuation = set(PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(texts)]]


class MeteorScorer:
    """One METEOR 1.5 JVM, reused for every call in this process (pycocoevalcap's protocol, pipelined)."""

    def __init__(self, timeout: float = METEOR_TIMEOUT_S):
        self.timeout = timeout
        self.lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()
        command = [java_executable(), "-Xmx2G", *JAVA_LOCALE_FLAGS, "-jar", "meteor-1.5.jar"]
        command += ["-", "-", "-stdio", "-l", "en", "-norm"]
        self.process = subprocess.Popen(
            command,
            cwd=_package_dir("meteor"),  # METEOR reads data/paraphrase-en.gz relative to here; it writes nothing
            env=_java_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.decode("utf-8").strip())
        self._lines.put(None)

    def alive(self) -> bool:
        return self.process.poll() is None

    def _read(self, count: int, deadline: float) -> list[str]:
        lines = []
        for _ in range(count):
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise MetricsError(f"METEOR did not answer within {self.timeout:.0f} s; its JVM was stopped") from None
            if line is None:
                self._stderr.seek(0)
                detail = self._stderr.read().decode(errors="replace")[-500:]
                raise MetricsError(f"METEOR exited unexpectedly: {detail}")
            lines.append(line)
        return lines

    def _write(self, text: str) -> None:
        try:
            self.process.stdin.write(text.encode("utf-8"))
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as error:
            raise MetricsError(f"METEOR is not running ({error})") from None

    def score(self, hypotheses: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
        """(corpus METEOR, per-caption METEOR) for PTB-tokenized text, as pycocoevalcap's Meteor.compute_score."""
        score_lines = []
        for hypothesis, refs in zip(hypotheses, references):
            hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
            refs = [ref.replace("|||", "") for ref in refs]
            score_lines.append(" ||| ".join(("SCORE", " ||| ".join(refs), hypothesis)) + "\n")
        with self.lock:
            deadline = time.monotonic() + self.timeout
            writer = threading.Thread(target=self._write, args=("".join(score_lines),), daemon=True)
            writer.start()  # written from a thread: a large batch would otherwise fill both pipes and deadlock
            stats = self._read(len(score_lines), deadline)
            writer.join()
            self._write("EVAL" + "".join(f" ||| {stat}" for stat in stats) + "\n")
            values = self._read(len(score_lines) + 1, deadline)
        try:
            numbers = [float(value) for value in values]
        except ValueError:
            raise MetricsError(f"METEOR returned unparsable scores, e.g. {values[:3]}") from None
        return numbers[-1], numbers[:-1]

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            self.process.kill()
            self.process.wait()


_METEOR: MeteorScorer | None = None
_METEOR_LOCK = threading.Lock()


def shared_meteor() -> MeteorScorer:
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or not _METEOR.alive():
            _METEOR = MeteorScorer()
            atexit.register(_METEOR.close)
        return _METEOR


def start_metrics(metrics) -> None:
    """Start now what scoring needs and is slow to start: METEOR's JVM loads its paraphrase table (~60 MB) for ~10 s
    on one core before it answers. Started before the model loads, that overlaps with loading and training (or, for
    `evaluate`, with generating the captions) instead of adding to the first evaluation. It waits on its pipe."""
    if "meteor" in metrics:
        shared_meteor()


def _spice(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """SPICE on PTB-tokenized text, as pycocoevalcap's Spice.compute_score (temp and cache outside the package)."""
    check_metric_requirements(["spice"])
    jar = _package_dir("spice", "spice-1.0.jar")
    payload = [
        {"image_id": i, "test": pred, "refs": refs} for i, (pred, refs) in enumerate(zip(predictions, references))
    ]
    with tempfile.TemporaryDirectory(prefix="spice-") as workdir:
        in_file, out_file = os.path.join(workdir, "input.json"), os.path.join(workdir, "output.json")
        with open(in_file, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
        cache = os.path.join(tempfile.gettempdir(), "blip_recipes_spice_cache")
        os.makedirs(cache, exist_ok=True)
        command = [java_executable(), "-Xmx8G", *JAVA_LOCALE_FLAGS, "-jar", jar, in_file]
        command += ["-cache", cache, "-out", out_file, "-subset", "-silent"]
        subprocess.run(command, cwd=_package_dir("spice"), env=_java_env(), check=True, capture_output=True)
        with open(out_file, encoding="utf-8") as handle:
            results = json.load(handle)
    per_image = [float(item["scores"]["All"]["f"]) for item in results]
    return float(sum(per_image) / len(per_image)), per_image


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's BLEU prints its internals
        yield


def score_captions(
    predictions: list[str], references: list[list[str]], metrics=DEFAULT_METRICS
) -> tuple[dict, list[dict]]:
    """Corpus metrics and per-image metrics. Inputs are raw text; PTB tokenization happens here."""

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    for index, refs in enumerate(references):
        if not refs:
            raise ValueError(f"image {index} has no reference captions")
    flat_refs = [ref for refs in references for ref in refs]
    tokens = ptb_tokenize([*predictions, *flat_refs])
    preds_tok, refs_flat_tok = tokens[: len(predictions)], tokens[len(predictions) :]
    refs_tok, offset = [], 0
    for refs in references:
        refs_tok.append(refs_flat_tok[offset : offset + len(refs)])
        offset += len(refs)
    gts = {index: refs for index, refs in enumerate(refs_tok)}
    res = {index: [pred] for index, pred in enumerate(preds_tok)}
    corpus: dict[str, float] = {}
    per_image: list[dict] = [{} for _ in predictions]

    def record(name, value, values):
        corpus[name] = float(value)
        for item, score in zip(per_image, values):
            item[name] = float(score)

    # METEOR runs in its own JVM: ask it first and score the Python metrics while it works.
    with ThreadPoolExecutor(max_workers=1) as pool:
        meteor = pool.submit(shared_meteor().score, preds_tok, refs_tok) if "meteor" in metrics else None
        _python_scores(metrics, gts, res, len(predictions), record)
        if meteor is not None:
            record("meteor", *meteor.result())
    if "spice" in metrics:
        record("spice", *_spice(preds_tok, refs_tok))
    return {name: corpus[name] for name in METRIC_ORDER if name in corpus}, per_image


def _python_scores(metrics, gts: dict, res: dict, images: int, record) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if "bleu" in metrics:
        with _quiet():
            bleu, bleu_per_image = Bleu(4).compute_score(gts, res)
        for n in range(4):
            record(f"bleu_{n + 1}", bleu[n], bleu_per_image[n])
    if "rouge_l" in metrics:
        record("rouge_l", *Rouge().compute_score(gts, res))
    if "cider" in metrics:
        if images == 1:
            logger.warning("CIDEr of a single image is 0 by construction (its IDF term degenerates)")
        record("cider", *Cider().compute_score(gts, res))


def compute_caption_metrics(predictions: list[str], references: list[list[str]], metrics=DEFAULT_METRICS) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (fractions, as pycocoevalcap reports them) of captions vs references."""
    return score_captions(predictions, references, metrics)[0]


EVALUATE_MODULE_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "evaluate_metric", "caption_metrics.py"
)


def load_evaluate_metric():
    """The caption metrics as an `evaluate` module, loaded from this package's file (evaluate.load("bleu") needs
    the Hub; a local path does not)."""
    import evaluate

    return evaluate.load(EVALUATE_MODULE_PATH)
