"""loraflow's own `evaluate` metric modules: one folder each, loadable offline with `evaluate.load(<folder>)` where
loraflow is installed (they share `text_pair_info` from here). Also where the evaluation stages find a module a
recipe names, and the version of the code that measures a score."""

import hashlib
from pathlib import Path

import datasets
import evaluate

BUILTIN_METRICS = Path(__file__).parent


def resolve_metric(name: str) -> str:
    """`builtin:<name>` is a module shipped here; anything else goes to `evaluate.load` as given."""
    if name.startswith("builtin:"):
        return str(BUILTIN_METRICS / name.removeprefix("builtin:"))
    return name


def metric_code_version(names: list[str]) -> str:
    """The version of the code behind these metric modules: the `evaluate` library's, and each local module's source
    hash (a hub module by its name). Scores measured by different versions do not compare."""
    parts = [f"evaluate {evaluate.__version__}"]
    for name in names:
        module = Path(resolve_metric(name))
        sources = sorted(module.rglob("*.py")) if module.is_dir() else [module] if module.is_file() else []
        digest = hashlib.sha256(b"".join(source.read_bytes() for source in sources)).hexdigest()[:12]
        parts.append(f"{name}={digest}" if sources else name)
    return "; ".join(parts)


def text_pair_info(description: str, inputs_description: str, citation: str = "") -> evaluate.MetricInfo:
    """What each module here declares: it scores predicted strings against one reference string each."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
    )
