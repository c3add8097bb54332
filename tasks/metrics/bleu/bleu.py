"""Corpus BLEU of generated answers against references, computed by `sacrebleu` (13a tokenisation).

A local `evaluate` metric module, loadable offline with `evaluate.load(<this folder>)`. Like the hub's `bleu`
it returns `bleu` in [0, 1] (sacrebleu prints the same score times 100).
"""

import evaluate
import sacrebleu

from tasks.metrics import text_pair_info

_DESCRIPTION = "Corpus BLEU (sacrebleu, one reference per prediction), scaled to [0, 1]."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
Returns:
    bleu: float in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS_DESCRIPTION, "Post, A Call for Clarity in Reporting BLEU Scores, 2018")

    def _compute(self, predictions, references):
        return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100}
