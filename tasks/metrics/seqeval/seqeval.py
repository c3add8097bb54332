"""Entity-level precision, recall and F1 of IOB2-tagged sequences, by seqeval in strict mode: an entity counts only
when its type and exact extent (B- then I- tags) match. Plus word accuracy and F1 per entity type.

A local `evaluate` metric module, loadable offline with `evaluate.load(<this folder>)`; the hub's `seqeval` module
has the same maths but downloads its script, and defaults to the lenient (conlleval) reading.
"""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from seqeval.scheme import IOB2

_DESCRIPTION = "Entity-level precision/recall/F1 (seqeval, strict IOB2), word accuracy and per-type F1."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted tag sequences (IOB2: O, B-TYPE, I-TYPE), one tag per word.
    references: list of gold tag sequences, each as long as its prediction.
Returns:
    precision, recall, f1: entity-level, micro-averaged over entities; accuracy: share of words tagged right;
    f1_<TYPE>: F1 of each entity type in references.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        strict = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
        report = classification_report(references, predictions, output_dict=True, **strict)
        return {"precision": float(precision_score(references, predictions, **strict)),
                "recall": float(recall_score(references, predictions, **strict)),
                "f1": float(f1_score(references, predictions, **strict)),
                "accuracy": float(accuracy_score(references, predictions))} | {
            f"f1_{kind}": float(scores["f1-score"]) for kind, scores in report.items()
            if not kind.endswith(" avg") and scores["support"] > 0}
