"""Classification scores: accuracy, macro-averaged precision, recall and F1, and F1 per class (scikit-learn's).

A local `evaluate` metric module, loadable offline with `evaluate.load(<this folder>)`. Labels are names (strings);
the hub's `accuracy` and `f1` modules take integer ids and download their scripts, which cannot happen here.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

_DESCRIPTION = "Accuracy, macro precision/recall/F1 and per-class F1 of predicted labels against gold labels."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted label names.
    references: list of gold label names, one per prediction.
Returns:
    accuracy, precision, recall, f1: floats in [0, 1] (precision, recall and f1 macro-averaged over the classes
    in references or predictions); f1_<label>: F1 of each class in references.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        classes = sorted(set(references) | set(predictions))
        precision, recall, f1, _ = precision_recall_fscore_support(
            references, predictions, labels=classes, average="macro", zero_division=0)
        per_class = precision_recall_fscore_support(references, predictions, labels=classes, zero_division=0)[2]
        return {"accuracy": float(accuracy_score(references, predictions)), "precision": float(precision),
                "recall": float(recall), "f1": float(f1)} | {
            f"f1_{label}": float(score) for label, score in zip(classes, per_class) if label in set(references)}
