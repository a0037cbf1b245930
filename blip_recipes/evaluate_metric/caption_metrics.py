"""`evaluate` wrapper of blip_recipes.metrics.compute_caption_metrics, loaded by path (no Hub access needed):

import evaluate
from blip_recipes.metrics import EVALUATE_MODULE_PATH
caption_metrics = evaluate.load(EVALUATE_MODULE_PATH)
caption_metrics.compute(predictions=["a dog"], references=[["a dog runs", "a brown dog"]])
"""

import datasets
import evaluate

from blip_recipes.metrics import DEFAULT_METRICS, compute_caption_metrics

_DESCRIPTION = (
    "coco-caption metrics (pycocoevalcap: PTB tokenization, BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D, optional "
    "SPICE) of one caption per image against all of that image's references. Scores are fractions."
)
_KWARGS = """
Args:
    predictions: list of generated captions, one per image.
    references: list of lists of reference captions, one list per image.
    metrics: optional subset of ("bleu", "meteor", "rouge_l", "cider", "spice").
Returns:
    dict with bleu_1..bleu_4, meteor, rouge_l, cider (and spice when asked for).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class CaptionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Chen et al., Microsoft COCO Captions: Data Collection and Evaluation Server, 2015",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, metrics=None):
        return compute_caption_metrics(list(predictions), [list(r) for r in references], metrics or DEFAULT_METRICS)
