"""Identity match: the share of generated answers that state the expected identity (a name).

A local `evaluate` metric module, loadable offline with `evaluate.load(<this folder>)`.
"""

import re

import evaluate

from tasks.metrics import text_pair_info

_DESCRIPTION = "Share of predictions that mention the reference name as a whole word, ignoring case."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of names each answer should state.
Returns:
    identity_share: float in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class IdentityMatch(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references):
        hits = [
            re.search(rf"(?<!\w){re.escape(name)}(?!\w)", answer, flags=re.IGNORECASE) is not None
            for answer, name in zip(predictions, references)
        ]
        return {"identity_share": sum(hits) / len(hits) if hits else 0.0}
