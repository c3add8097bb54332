"""loraflow's own `evaluate` metric modules: one folder each, loadable offline with `evaluate.load(<folder>)` where
loraflow is installed (they share `text_pair_info` from here)."""

import datasets
import evaluate


def text_pair_info(description: str, inputs_description: str, citation: str = "") -> evaluate.MetricInfo:
    """What each module here declares: it scores predicted strings against one reference string each."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
    )
