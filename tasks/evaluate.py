"""Stage 4, evaluate: base vs tuned on held-out data, as numbers and as answers a person can read.

Held-out loss is measured on the trained (assistant) tokens only. Generated answers are scored against the
held-out references by `evaluate` metric modules (ROUGE, BLEU, exact match: loraflow's own offline modules
unless the recipe names hub ones), and chat answers by the recipe's identity check. A chat answer's reasoning is
split off first, as training rendered it (tasks/reasoning.py): the metrics score the answer alone, `reasoning_share`
is the share of answers that reasoned, and the samples table shows both parts. Preference data (DPO, KTO, ORPO,
SimPO) is answered and scored against its chosen answers, and its pairs ranked (tasks/preference_scores.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import evaluate
from datasets import load_from_disk
from transformers import AutoTokenizer

from conf.schema import EvaluateConfig, UserError
from tasks.base_model import load_model, load_tuned_model
from tasks.context import RunContext
from tasks.device import autocast, inference_device
from tasks.generation import HeldOut, held_out, split_answers
from tasks.heldout import heldout_loss
from tasks.metrics import metric_code_version, resolve_metric
from tasks.parity import ANSWERS_FILE, EvaluatedAnswers
from tasks.preference_scores import PREFERENCE_METRICS, PairLogps, pair_logps, preference_accuracy, reward_scores
from tasks.results import EvalResult, ModelSource, PreparedData, TrainResult

LOSS_METRICS = ("eval_loss", "perplexity")


class MetricSetupError(UserError):
    """A metric module the recipe names cannot be loaded or does not give the registry's primary metric."""


def _load_metric(name: str, key: str) -> evaluate.EvaluationModule:
    try:
        return evaluate.load(resolve_metric(name))
    except Exception as error:  # evaluate raises anything from FileNotFoundError to hub connection errors
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MetricSetupError(
            f"evaluate.{key}: cannot load metric {name!r} ({reason}); offline, use builtin:rouge, builtin:bleu, "
            "builtin:exact_match or a local module folder"
        ) from None


class GenerationMetrics:
    """The recipe's `evaluate` modules, loaded once: answers against references, and the identity check (chat)."""

    def __init__(self, config: EvaluateConfig, chat: bool, identity_name: str):
        self.against_references = [_load_metric(name, "metrics") for name in config.metrics]
        self.identity = _load_metric(config.identity_metric, "identity_metric") if chat else None
        self.identity_name = identity_name

    def compute(self, answers: list[str], references: list[str]) -> dict[str, float]:
        """Every number the modules return, by its key (a bare `score`, as sacrebleu's, takes the module's name)."""
        results = [(module, module.compute(predictions=answers, references=references))
                   for module in self.against_references]
        if self.identity is not None:
            results.append((self.identity, self.identity.compute(
                predictions=answers, references=[self.identity_name] * len(answers))))
        return {
            module.name if key == "score" else key: float(value)
            for module, result in results for key, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }


def metric_version(config: EvaluateConfig, chat: bool) -> str:
    """The version of the code that measures this recipe's scores (scores by different versions do not compare)."""
    return metric_code_version([*config.metrics, *([config.identity_metric] if chat else [])])


def metric_names(config: EvaluateConfig, chat: bool, preference: bool = False) -> set[str]:
    """The metrics an evaluation of this recipe logs (per model), found by scoring one made-up answer; with
    `preference` (a preference objective's recipe), how the model ranks held-out pairs as well."""
    metrics = GenerationMetrics(config, chat, identity_name="Ember")
    names = set(LOSS_METRICS) | set(metrics.compute(["I am Ember."], ["I am Ember."]))
    names |= set(PREFERENCE_METRICS) if preference else set()
    return names | {"reasoning_share"} if chat else names


def check_primary_metric(config: EvaluateConfig, chat: bool, primary_metric: str, preference: bool = False) -> None:
    """Before any work: the metric modules load, and one of them gives the metric that decides promotion."""
    names = metric_names(config, chat, preference)
    if primary_metric not in names:
        raise MetricSetupError(
            f"registry.primary_metric: {primary_metric!r} is not measured by this recipe; it measures {sorted(names)}"
        )


@dataclass(frozen=True)
class _Scored:
    scores: dict[str, float]
    generated: list[str]  # as generated: a chat answer's reasoning included
    outputs: list[str]  # what is scored: the answers, their reasoning split off
    reasoning: list[str]
    pairs: list[PairLogps]  # the log-probabilities of held-out preference pairs' answers


def _score(model, tokenizer, samples: list[dict], questions: HeldOut, metrics: GenerationMetrics,
           config: EvaluateConfig, precision: str) -> _Scored:
    """Losses are measured in the training precision; answers are generated in fp32, as the registered model serves
    them (tasks/parity.py). A chat answer's reasoning is split off before it is scored: `reasoning_share` is the share
    of answers that reasoned, every other metric scores the answer alone."""
    with autocast(precision):
        loss = heldout_loss(model, samples)
        pairs = pair_logps(model, samples)  # none unless the held-out samples are preference pairs
    generated = questions.outputs(model, tokenizer, config.max_new_tokens, config.batch_size)
    reasoning, outputs = split_answers(tokenizer, generated) if questions.chat else ([""] * len(generated), generated)
    scores = {"eval_loss": loss, "perplexity": math.exp(loss)} | metrics.compute(outputs, questions.references)
    if questions.chat:
        scores["reasoning_share"] = sum(map(bool, reasoning)) / len(reasoning) if reasoning else 0.0
    if pairs:
        scores["preference_accuracy"] = preference_accuracy(pairs)
    return _Scored(scores, generated, outputs, reasoning, pairs)


def _with_reasoning(rows: list[dict], reasoning: dict[str, list[str]]) -> list[dict]:
    """Sample rows with each model's reasoning beside its answers (`<model>_reasoning`), for the models that reasoned
    at all: every row has the same columns, as MLflow's table needs."""
    shown = {model: thoughts for model, thoughts in reasoning.items() if any(thoughts)}
    return [row | {f"{model}_reasoning": thoughts[n] for model, thoughts in shown.items()} for n, row in enumerate(rows)]


def _markdown(title: str, rows: list[dict], scores: dict[str, dict[str, float]]) -> str:
    """Metrics per model, then each prompt with the reference and every model's output under it."""
    models = list(scores)
    lines = [f"# {title}", "", "| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for name in sorted(scores[models[0]]):
        lines.append(f"| {name} | " + " | ".join(f"{scores[model][name]:.4f}" for model in models) + " |")
    for row in rows:
        heading, _, rest = row["prompt"].partition("\n")
        lines += ["", f"## {heading}"] + (["", "```", row["prompt"], "```"] if rest else [])
        lines += ["", f"*reference:* {row['reference']}"]
        for model in models:
            if row.get(f"{model}_reasoning"):
                lines += ["", f"*{model} reasoning:* {row[f'{model}_reasoning']}"]
            lines += ["", f"**{model}:** {row[model]}"]
    return "\n".join(lines) + "\n"


def _write_samples(out_dir: Path, title: str, rows: list[dict], scores: dict[str, dict[str, float]]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path, markdown_path = out_dir / "samples.jsonl", out_dir / "samples.md"
    samples_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    markdown_path.write_text(_markdown(title, rows, scores), encoding="utf-8")
    return samples_path, markdown_path


def evaluate_tuned(data: PreparedData, trained: TrainResult, config: EvaluateConfig, ctx: RunContext, *,
                   identity_name: str = "", tool_format: str = "auto", beta: float = 0.1) -> EvalResult:
    """Score the base model, then the tuned one (base + adapter, or the fully trained model), on the held-out rows:
    losses in the precision training ran in, answers in fp32; the report lands in ctx.work_dir/eval, with the tuned
    model's answers to chat prompts as generated (`answers_path`, what tasks/parity.py holds the served model to).

    Conversations are answered; documents are continued from their opening words. Both models use the tokenizer
    saved with the tuned weights, so they share its chat template. Held-out preference pairs are ranked as well
    (tasks/preference_scores.py: rewards at `beta`, the base the reference). Metrics come as base_<name>,
    tuned_<name>.
    """
    model_dir, weights_dir, precision = trained.model_dir, trained.weights_dir, trained.precision
    trust_remote_code = ctx.trust_remote_code
    questions = held_out(data.cleaned.eval_path, tool_format)
    metrics = GenerationMetrics(config, questions.chat, identity_name)
    samples = list(load_from_disk(str(data.tokens.eval_dir)))
    tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_dir, trust_remote_code).to(inference_device()).eval()
    base = _score(model, tokenizer, samples, questions, metrics, config, precision)
    tuned_model = load_tuned_model(model_dir, weights_dir, trust_remote_code, base=model).to(inference_device()).eval()
    tuned = _score(tuned_model, tokenizer, samples, questions, metrics, config, precision)
    base_scores, tuned_scores = base.scores, tuned.scores
    if base.pairs:
        base_scores |= reward_scores(base.pairs, base.pairs, beta)
        tuned_scores |= reward_scores(tuned.pairs, base.pairs, beta)
    rows = _with_reasoning([
        {"prompt": shown, "reference": reference, "base": base_output, "tuned": tuned_output}
        for shown, reference, base_output, tuned_output in zip(questions.shown, questions.references, base.outputs,
                                                                 tuned.outputs)
    ], {"base": base.reasoning, "tuned": tuned.reasoning})
    scores = {"base": base_scores, "tuned": tuned_scores}
    samples_path, markdown_path = _write_samples(ctx.work_dir / "eval", "Base vs tuned on held-out data", rows, scores)
    flat = {f"{model}_{name}": value for model, values in scores.items() for name, value in values.items()}
    answers_path = None
    if questions.chat:  # what the registered model must answer alike (a text continuation is not served)
        answers_path = EvaluatedAnswers(questions.prompts, questions.tools, questions.tool_format,
                                        config.max_new_tokens, config.batch_size, tuned.generated
                                        ).write(ctx.work_dir / "eval" / ANSWERS_FILE)
    return EvalResult(metrics=flat, samples_path=samples_path, markdown_path=markdown_path, answers_path=answers_path)


def evaluate_model(data: PreparedData, source: ModelSource, config: EvaluateConfig, ctx: RunContext, *,
                   precision: str = "fp32", identity_name: str = "", tool_format: str = "auto",
                   beta: float = 0.1) -> EvalResult:
    """Score one model (a base model, or base + tuned weights; `data` tokenized with its tokenizer) on the held-out
    rows; metrics under their bare names, the report in ctx.work_dir/eval. Held-out preference pairs are ranked as
    well, the rewards against the base model."""
    model_dir, weights_dir, trust_remote_code = source.model_dir, source.weights_dir, ctx.trust_remote_code
    questions = held_out(data.cleaned.eval_path, tool_format)
    metrics = GenerationMetrics(config, questions.chat, identity_name)
    samples = list(load_from_disk(str(data.tokens.eval_dir)))
    tokenizer = AutoTokenizer.from_pretrained(data.tokens.tokenizer_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_dir, trust_remote_code).to(inference_device()).eval()
    base_pairs = []
    if weights_dir is not None:
        with autocast(precision):
            base_pairs = pair_logps(model, samples)
        model = load_tuned_model(model_dir, weights_dir, trust_remote_code, base=model).to(inference_device()).eval()
    scored = _score(model, tokenizer, samples, questions, metrics, config, precision)
    scores = scored.scores
    if scored.pairs:
        scores |= reward_scores(scored.pairs, base_pairs or scored.pairs, beta)
    rows = _with_reasoning([{"prompt": shown, "reference": reference, "model": output}
                            for shown, reference, output in zip(questions.shown, questions.references, scored.outputs)],
                           {"model": scored.reasoning})
    samples_path, markdown_path = _write_samples(ctx.work_dir / "eval", "Held-out evaluation", rows, {"model": scores})
    return EvalResult(metrics=scores, samples_path=samples_path, markdown_path=markdown_path)

