"""Caption metrics: hand-computed values, exact agreement with the coco-caption toolkit, and its hazards fixed."""

import math
import os
import time
from collections import Counter

import pytest

from blip_recipes import metrics
from blip_recipes.metrics import MetricsError, compute_caption_metrics, score_captions

CASES = {
    "several_images": (
        ["a man riding a wave on top of a surfboard", "two dogs play in the grass", "a plate of food", "a red bus",
         "a cat sleeping on a couch"],
        [["a surfer rides a large wave", "a man on a surfboard riding a wave", "surfer in the ocean on a board",
          "a person surfing a wave", "a man surfing in the ocean"],
         ["two dogs running on grass", "a pair of dogs playing outside", "dogs chase each other on a lawn",
          "two brown dogs in a field", "dogs playing in the grass"],
         ["a plate with meat and vegetables", "food on a white plate", "a dinner plate with rice",
          "a meal served on a plate", "vegetables and rice on a plate"],
         ["a red double decker bus", "a bus driving down the street", "a red bus on a city road",
          "a large red bus parked", "a city bus in traffic"],
         ["a cat asleep on a sofa", "a grey cat sleeping on the couch", "a cat lying on a couch",
          "a kitten napping on furniture", "a cat curled up on a sofa"]],
    ),
    "empty_prediction": (["", "a red bus", "a cat on a couch"],
                         [["a red bus", "a bus"], ["a red double decker bus"], ["a cat asleep on a sofa"]]),
    "newline_and_separator": (["a red\nbus ||| on a road", "a cat|||on a couch"],
                              [["a red bus on a road", "a bus"], ["a cat on a couch"]]),
    "non_ascii": (["un café près de la gare", "ein Hund läuft über die Straße", "一只猫"],
                  [["le café à côté de la gare", "un café"], ["ein Hund auf der Straße"], ["一只猫在沙发上"]]),
    "one_vs_five_references": (["a dog", "a man riding a horse"],
                               [["a brown dog"], ["a man on a horse", "a rider", "a horse and rider",
                                                  "a person riding", "a man riding a brown horse"]]),
    "single_image": (["a dog runs on the beach"], [["a dog running on a beach", "a dog at the sea"]]),
    "duplicates": (["a dog", "a dog", "a dog"], [["a dog"], ["a dog"], ["a brown dog", "a dog"]]),
}  # fmt: skip


def test_hand_computed_bleu_and_rouge():
    result = compute_caption_metrics(["a red circle on the left"], [["a red circle at the left"]], ["bleu", "rouge_l"])
    # unigrams 5/6 match, bigrams 3/5 (a red, red circle, the left), equal lengths so no brevity penalty.
    assert result["bleu_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert result["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    # LCS "a red circle the left" = 5 of 6 tokens on both sides: P = R = F = 5/6.
    assert result["rouge_l"] == pytest.approx(5 / 6, abs=1e-9)


def reference_cider_d(predictions, references, sigma=6.0):
    """An independent CIDEr-D (Vedantam et al. 2015, as coco-caption implements it) over PTB-tokenized text."""

    def ngrams(words, n):
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    document_frequency = Counter()
    for refs in references:
        document_frequency.update({g for ref in refs for n in range(1, 5) for g in ngrams(ref.split(), n)})
    log_images = math.log(float(len(references)))

    def vector(sentence):
        words = sentence.split()
        vectors, norms = [], []
        for n in range(1, 5):
            counts = ngrams(words, n)
            vec = {g: c * (log_images - math.log(max(1.0, document_frequency[g]))) for g, c in counts.items()}
            vectors.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vectors, norms, len(words)

    scores = []
    for prediction, refs in zip(predictions, references):
        hyp, hyp_norms, hyp_len = vector(prediction)
        total = [0.0] * 4
        for ref in refs:
            rvec, rnorms, rlen = vector(ref)
            for n in range(4):
                value = sum(min(hyp[n][g], rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g in hyp[n])
                if hyp_norms[n] and rnorms[n]:
                    value /= hyp_norms[n] * rnorms[n]
                total[n] += value * math.exp(-((hyp_len - rlen) ** 2) / (2 * sigma**2))
        scores.append(sum(total) / 4 / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def test_cider_matches_an_independent_implementation():
    predictions, references = CASES["several_images"]
    ours = compute_caption_metrics(predictions, references, ["cider"])["cider"]
    tokenized = metrics.ptb_tokenize(predictions + [r for refs in references for r in refs])
    preds, flat = tokenized[: len(predictions)], tokenized[len(predictions) :]
    refs = [flat[i * 5 : (i + 1) * 5] for i in range(len(predictions))]
    expected, _ = reference_cider_d(preds, refs)
    assert ours == pytest.approx(expected, rel=1e-9)
    assert compute_caption_metrics(*CASES["single_image"], ["cider"])["cider"] == 0.0  # IDF degenerates


def test_identical_captions_get_top_scores():
    result = compute_caption_metrics(["a dog runs on the beach", "a cat"], [["a dog runs on the beach"], ["a cat"]])
    assert result["bleu_1"] == pytest.approx(1.0, abs=1e-6) and result["rouge_l"] == pytest.approx(1.0)
    assert result["meteor"] == pytest.approx(1.0, abs=1e-6)
    assert set(result) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}


def test_exactly_the_coco_caption_toolkit_numbers():
    from tests.reference_metrics import official_scores

    official = official_scores(CASES)
    for name, (predictions, references) in CASES.items():
        ours = compute_caption_metrics(predictions, references)
        assert ours == official[name]["scores"], name  # exact, not approximate


def test_line_breaks_inside_a_caption_cannot_shift_other_captions():
    predictions = ["a red\rbus", "a dog\u2028on grass", "a cat"]
    references = [["a red bus"], ["a dog on grass"], ["a cat"]]
    corpus, per_image = score_captions(predictions, references, ["bleu", "cider"])
    clean, clean_per_image = score_captions(["a red bus", "a dog on grass", "a cat"], references, ["bleu", "cider"])
    assert corpus == clean and per_image == clean_per_image
    assert per_image[2]["bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_scoring_writes_nothing_into_site_packages():
    package = metrics._package_dir()

    def snapshot():
        return {root: (sorted(files), os.stat(root).st_mtime_ns) for root, _dirs, files in os.walk(package)}

    before = snapshot()
    compute_caption_metrics(*CASES["several_images"])
    assert snapshot() == before


def test_meteor_jvm_is_started_once_and_reused():
    compute_caption_metrics(*CASES["empty_prediction"], ["meteor"])
    scorer = metrics.shared_meteor()
    pid = scorer.process.pid
    start = time.monotonic()
    for _ in range(3):
        compute_caption_metrics(*CASES["several_images"], ["meteor"])
    assert metrics.shared_meteor().process.pid == pid
    assert time.monotonic() - start < 6.0  # three calls: ~3 PTB runs, no JVM start-up (pycocoevalcap: ~7 s each)


def test_meteor_is_locale_safe(monkeypatch):
    expected = compute_caption_metrics(*CASES["several_images"], ["meteor"])["meteor"]
    # A comma-decimal JVM locale makes METEOR's own number parsing fail (pycocoevalcap then hangs or crashes).
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Duser.language=de -Duser.country=DE")
    scorer = metrics.MeteorScorer(timeout=120)
    try:
        tokenized = metrics.ptb_tokenize(CASES["several_images"][0])
        refs = [metrics.ptb_tokenize(r) for r in CASES["several_images"][1]]
        assert scorer.score(tokenized, refs)[0] == expected
    finally:
        scorer.close()


def test_a_meteor_that_never_answers_is_an_error_not_a_hang(tmp_path, monkeypatch):
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\nexec sleep 600\n")
    fake_java.chmod(0o755)
    monkeypatch.setattr(metrics, "java_executable", lambda: str(fake_java))
    scorer = metrics.MeteorScorer(timeout=2)
    start = time.monotonic()
    with pytest.raises(MetricsError, match="METEOR did not answer within 2 s"):
        scorer.score(["a dog"], [["a dog"]])
    assert time.monotonic() - start < 10 and not scorer.alive()


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(MetricsError, match="need Java.*apt-get install default-jre-headless"):
        metrics.check_metric_requirements(["bleu"])


def test_spice_without_its_models_fails_at_start_up():
    if all(os.path.isfile(path) for path in metrics.spice_jars()):
        pytest.skip("Stanford CoreNLP for SPICE is installed here")
    with pytest.raises(MetricsError, match="SPICE needs Stanford CoreNLP 3.6.0"):
        metrics.check_metric_requirements(["bleu", "spice"])


def test_evaluate_module_loads_by_path_offline():
    module = metrics.load_evaluate_metric()
    predictions, references = CASES["one_vs_five_references"]
    assert module.compute(predictions=predictions, references=references) == compute_caption_metrics(
        predictions, references
    )


def test_input_mismatch_is_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        compute_caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 0 has no reference captions"):
        compute_caption_metrics(["a"], [[]])


@pytest.mark.parametrize(
    "command, arguments, starts",
    [
        ("train", [], True),
        ("train", ["--eval_metrics", "bleu,cider"], False),
        ("train", ["--eval_strategy", "no", "--eval_on_start", "false"], False),
        ("train", ["--eval_strategy", "no", "--eval_on_start", "false", "--test_split", "test"], True),
        ("evaluate", [], True),
    ],
)
def test_meteors_jvm_starts_before_the_model_loads_in_a_run_that_scores(
    command, arguments, starts, tmp_path, monkeypatch, capfd, caplog
):
    """METEOR's JVM loads its paraphrase table for ~10 s before it answers: started before the model loads, that
    overlaps with loading and training instead of adding to the first evaluation. Not started by a run that never
    scores METEOR (it holds ~1 GB)."""
    from blip_recipes import builders, train
    from tests.conftest import run_main

    events = []
    monkeypatch.setattr(metrics, "shared_meteor", lambda: events.append("meteor"))

    def stop_at_the_model_load(*_, **__):
        events.append("load")
        raise ValueError("stopped where the model would load")

    monkeypatch.setattr(train, "build_trainer", stop_at_the_model_load)
    monkeypatch.setattr(builders, "build_evaluator", stop_at_the_model_load)
    if command == "train":
        arguments = ["recipes/shapes/full.yaml", "--output_dir", tmp_path / "run", *arguments]
    else:
        arguments = ["--model", "builtin:tiny-blip", "--dataset", "builtin:shapes", "--output_dir", tmp_path / "ev"]
    result = run_main([command, *arguments], capfd, caplog)
    assert result.returncode == 2 and "stopped where the model would load" in result.stderr, result.stderr[-2000:]
    assert events == (["meteor", "load"] if starts else ["load"])
