"""ROUGE F-measures (rouge1, rouge2, rougeL, rougeLsum) between generated answers and references.

A local `evaluate` metric module over Google's `rouge_score` package, loadable offline with
`evaluate.load(<this folder>)`; it returns the keys the hub's `rouge` returns, so a recipe can switch between
them. Scores are plain means over the predictions (the hub's bootstrap aggregate is omitted).
"""

import evaluate
from rouge_score import rouge_scorer

from tasks.metrics import text_pair_info

_DESCRIPTION = "Mean ROUGE F-measure of each prediction against its reference (rouge_score, with stemming)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
    rouge_types: which ROUGE variants to score (default rouge1, rouge2, rougeL, rougeLsum).
Returns:
    one float in [0, 1] per ROUGE type.
"""
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004")

    def _compute(self, predictions, references, rouge_types=ROUGE_TYPES):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)
        scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
        return {kind: sum(s[kind].fmeasure for s in scores) / len(scores) if scores else 0.0 for kind in rouge_types}
