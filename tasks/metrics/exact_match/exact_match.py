"""Exact match: the share of generated answers equal to their reference, after trimming and collapsing spaces.

A local `evaluate` metric module, loadable offline with `evaluate.load(<this folder>)`; it returns the key the
hub's `exact_match` returns.
"""

import evaluate

from tasks.metrics import text_pair_info

_DESCRIPTION = "Share of predictions equal to their reference (whitespace-normalised; optionally ignoring case)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
    ignore_case: compare lower-cased texts (default False).
Returns:
    exact_match: float in [0, 1].
"""


def _normalised(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, ignore_case=False):
        hits = [_normalised(p, ignore_case) == _normalised(r, ignore_case) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
