"""What each stage hands the next: small typed values and paths, never live models. Their own module, so a stage
that takes another's result imports the value, not the stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


# CleanResult.task for preference rows (RunConfig.data_kind): pairs (DPO, ORPO, SimPO), or KTO's labelled answers.
PAIRED_PREFERENCE, UNPAIRED_PREFERENCE = "preference", "unpaired_preference"
PREFERENCE_KINDS = (PAIRED_PREFERENCE, UNPAIRED_PREFERENCE)


@dataclass(frozen=True)
class CleanResult:
    train_path: Path
    eval_path: Path
    rejects_path: Path
    report_path: Path
    train_rows: int
    eval_rows: int
    rejected_rows: int
    data_hash: str  # of the train and eval rows together: what a run trained and was scored on
    eval_hash: str  # of the eval rows alone: two scores compare only when measured on the same held-out rows
    labels: tuple[str, ...] = ()  # task heads: the train split's labels (or tags), in id order
    task: str = "causal_lm"

    @classmethod
    def of_files(cls, train_path: Path, eval_path: Path, task: str = "causal_lm",
                 labels: tuple[str, ...] = ()) -> CleanResult:
        """Rows already clean (a notebook's, a benchmark's), for the tokenize stage; no report, no hashes."""
        return cls(Path(train_path), Path(eval_path), Path(), Path(), 0, 0, 0, "", "", labels, task)


@dataclass(frozen=True)
class TokenizedData:
    train_dir: Path
    eval_dir: Path
    tokenizer_dir: Path
    train_samples: int
    train_rows: int
    eval_samples: int
    train_tokens: int
    rejected: dict[str, int]
    truncated: int
    cache_key: str
    cache_hit: bool
    labels: tuple[str, ...] = ()  # task heads: label (tag) names in id order; sample labels are their ids
    # chat: assistant turns with reasoning, and how many were rendered, dropped (`reasoning: drop`) or not rendered
    # (a template that shows only the last turns' reasoning)
    reasoning: dict[str, int] = field(default_factory=dict)
    task: str = "causal_lm"


@dataclass(frozen=True)
class PreparedData:
    """A recipe's data cleaned and tokenized (for one tokenizer): what training and evaluation read."""

    cleaned: CleanResult
    tokens: TokenizedData


@dataclass(frozen=True)
class ModelSource:
    """A model to load: `model_dir` alone (a base model), or `model_dir` + tuned `weights_dir` (adapter or whole model).
    The tokenizer comes from the tuned weights when there are some (they carry the chat template trained with)."""

    model_dir: str
    weights_dir: Path | None = None
    trust_remote_code: bool = False

    @property
    def tokenizer_dir(self) -> str:
        return str(self.weights_dir) if self.weights_dir is not None else self.model_dir


@dataclass(frozen=True)
class TrainResult:
    """What training produced. `weights_dir` is a PEFT adapter folder, or a whole model folder for method full;
    either holds the tokenizer it was trained with. `losses` are the steps this process ran (a resume runs fewer)."""

    weights_dir: Path
    model_dir: str  # the base model the weights were trained on
    steps: int
    train_seconds: float
    tokens_per_second: float
    losses: list[float]
    precision: str
    attn: str
    choices: dict[str, str] = field(default_factory=dict)  # each automatic setting: "value: why" (train.choices)

    @property
    def model(self) -> ModelSource:
        return ModelSource(self.model_dir, self.weights_dir)


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    samples_path: Path
    markdown_path: Path
    confusion_path: Path | None = None  # task heads: the tuned model's confusion matrix
    answers_path: Path | None = None  # chat: the tuned model's answers, for train/serve parity (tasks/parity.py)
