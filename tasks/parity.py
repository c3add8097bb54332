"""Train/serve parity: the registered model, loaded as it is served (its pyfunc) and as it is exported (merged into
its base), must answer the held-out prompts exactly as the evaluate stage's model did, greedy, with the same
settings. A served or merged model that answers otherwise (a lost adapter, another chat template, a broken merge:
LLaMA-Factory #10596, unsloth #1832) is not promoted, and `loraflow deploy` does not switch to it.

The evaluate stage generates in fp32, as the pyfunc serves: in bf16 the same weights answer differently with the
batch a prompt lands in (bench/generate.py), so no check could be exact there.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoTokenizer

from tasks.base_model import load_model
from tasks.device import inference_device
from tasks.generation import generate_chat

ANSWERS_FILE = "evaluated_answers.json"  # in the run's eval folder, and inside each registered version


@dataclass(frozen=True)
class EvaluatedAnswers:
    """The tuned model's greedy answers to held-out chat prompts, with the settings they were generated with."""

    prompts: list[list[dict]]
    tools: list[list[dict] | None] | None
    tool_format: str
    max_new_tokens: int
    batch_size: int
    answers: list[str]

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path | str) -> EvaluatedAnswers:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def first(self, count: int) -> EvaluatedAnswers:
        return EvaluatedAnswers(self.prompts[:count], self.tools[:count] if self.tools else None, self.tool_format,
                                self.max_new_tokens, self.batch_size, self.answers[:count])


@dataclass(frozen=True)
class Parity:
    """The share of prompts answered exactly as evaluated, and the first that was not (its index and both texts)."""

    share: float
    first_difference: tuple[int, str, str] | None

    @classmethod
    def of(cls, evaluated: EvaluatedAnswers, answers: list[str]) -> Parity:
        differing = [(n, want, got) for n, (want, got) in enumerate(zip(evaluated.answers, answers)) if want != got]
        total = len(evaluated.answers)
        return cls((total - len(differing)) / total if total else 1.0, differing[0] if differing else None)

    def describe(self, what: str) -> str:
        if self.first_difference is None:
            return f"{what} {self.share:.2f}"
        index, want, got = self.first_difference
        return f"{what} {self.share:.2f} (prompt {index}: evaluated {want[:60]!r}, got {got[:60]!r})"


def served_answers(chat_model, evaluated: EvaluatedAnswers) -> list[str]:
    """The prompts answered by a loaded pyfunc chat model (tasks/chat_model.py), through its own `answer`."""
    answers = chat_model.answer(evaluated.prompts, evaluated.max_new_tokens, 0.0, tools=evaluated.tools,
                                batch_size=evaluated.batch_size)
    return [answer.text for answer in answers]


def merged_answers(source: str, evaluated: EvaluatedAnswers, trust_remote_code: bool = False) -> list[str]:
    """The prompts answered by the model `loraflow export --merged` writes for `source`, loaded as a user would
    (plain transformers, no PEFT)."""
    from tasks.export import export_merged

    with tempfile.TemporaryDirectory(prefix="loraflow-parity-") as scratch:
        folder = export_merged(source, Path(scratch) / "merged", trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = load_model(folder, trust_remote_code).to(inference_device()).eval()
        answers = generate_chat(model, tokenizer, evaluated.prompts, evaluated.max_new_tokens, evaluated.batch_size,
                                evaluated.tools, evaluated.tool_format)
    return [answer.text for answer in answers]


def check_parity(model_uri: str, evaluated: EvaluatedAnswers, trust_remote_code: bool = False
                 ) -> dict[str, Parity]:
    """{"pyfunc": ..., "merged": ...}: the registered model at `model_uri` served and exported, against `evaluated`."""
    import mlflow

    chat_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    served = Parity.of(evaluated, served_answers(chat_model, evaluated))
    del chat_model
    return {"pyfunc": served, "merged": Parity.of(evaluated, merged_answers(model_uri, evaluated, trust_remote_code))}
