"""Stage 4, evaluate: base vs tuned on held-out data, as numbers and as answers a person can read.

Held-out loss is measured on the trained (assistant) tokens only. Generated answers are scored against the
held-out references by `evaluate` metric modules (ROUGE, BLEU, exact match: loraflow's own offline modules
unless the recipe names hub ones), and chat answers by the recipe's identity check. A chat answer's reasoning is
split off first, as training rendered it (tasks/reasoning.py): the metrics score the answer alone, `reasoning_share`
is the share of answers that reasoned, and the samples table shows both parts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import evaluate
import torch
from datasets import load_from_disk
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoTokenizer, PreTrainedModel

from conf.schema import EvaluateConfig, UserError
from tasks.base_model import load_model, load_tuned_model
from tasks.generation import HeldOut, autocast, held_out, inference_device, split_answers
from tasks.metrics import metric_code_version, resolve_metric
from tasks.tracking import log_artifact, log_metrics, log_table

LOSS_METRICS = ("eval_loss", "perplexity")


class MetricSetupError(UserError):
    """A metric module the recipe names cannot be loaded or does not give the registry's primary metric."""


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    samples_path: Path
    markdown_path: Path


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


def metric_names(config: EvaluateConfig, chat: bool) -> set[str]:
    """The metrics an evaluation of this recipe logs (per model), found by scoring one made-up answer."""
    metrics = GenerationMetrics(config, chat, identity_name="Ember")
    names = set(LOSS_METRICS) | set(metrics.compute(["I am Ember."], ["I am Ember."]))
    return names | {"reasoning_share"} if chat else names


def check_primary_metric(config: EvaluateConfig, chat: bool, primary_metric: str) -> None:
    """Before any work: the metric modules load, and one of them gives the metric that decides promotion."""
    names = metric_names(config, chat)
    if primary_metric not in names:
        raise MetricSetupError(
            f"registry.primary_metric: {primary_metric!r} is not measured by this recipe; it measures {sorted(names)}"
        )


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, samples: list[dict]) -> float:
    """Mean cross-entropy per trained token over all samples (token-weighted, not sample-weighted)."""
    total, count = 0.0, 0
    for sample in samples:
        ids = torch.tensor([sample["input_ids"]], device=model.device)
        labels = torch.tensor([sample["labels"]], device=model.device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = labels[0, 1:]
        total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count


def _score(model, tokenizer, samples: list[dict], questions: HeldOut, metrics: GenerationMetrics,
           config: EvaluateConfig, precision: str) -> tuple[dict[str, float], list[str], list[str]]:
    """(scores, outputs, their reasoning). A chat answer's reasoning is split off before it is scored:
    `reasoning_share` is the share of answers that reasoned, every other metric scores the answer alone."""
    with autocast(precision):
        loss = heldout_loss(model, samples)
        outputs = questions.outputs(model, tokenizer, config.max_new_tokens, config.batch_size)
    reasoning = [""] * len(outputs)
    if questions.chat:
        reasoning, outputs = split_answers(tokenizer, outputs)
    scores = {"eval_loss": loss, "perplexity": math.exp(loss)} | metrics.compute(outputs, questions.references)
    if questions.chat:
        scores["reasoning_share"] = sum(map(bool, reasoning)) / len(reasoning) if reasoning else 0.0
    return scores, outputs, reasoning


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


def evaluate_tuned(
    eval_path: Path, eval_tokens_dir: Path, model_dir: str, weights_dir: Path, identity_name: str,
    config: EvaluateConfig, out_dir: Path, precision: str = "fp32", trust_remote_code: bool = False,
    tool_format: str = "auto",
) -> EvalResult:
    """Score the base model, then the tuned one (base + adapter, or the fully trained model), on the held-out rows.

    Conversations are answered; documents are continued from their opening words. Both models use the tokenizer
    saved with the tuned weights, so they share its chat template. Metrics are logged as base_<name>, tuned_<name>.
    """
    questions = held_out(eval_path, tool_format)
    metrics = GenerationMetrics(config, questions.chat, identity_name)
    samples = list(load_from_disk(str(eval_tokens_dir)))
    tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_dir, trust_remote_code).to(inference_device()).eval()
    base_scores, base_outputs, base_reasoning = _score(model, tokenizer, samples, questions, metrics, config, precision)
    tuned = load_tuned_model(model_dir, weights_dir, trust_remote_code, base=model).to(inference_device()).eval()
    tuned_scores, tuned_outputs, tuned_reasoning = _score(tuned, tokenizer, samples, questions, metrics, config,
                                                          precision)
    rows = _with_reasoning([
        {"prompt": shown, "reference": reference, "base": base, "tuned": tuned_output}
        for shown, reference, base, tuned_output in zip(questions.shown, questions.references, base_outputs, tuned_outputs)
    ], {"base": base_reasoning, "tuned": tuned_reasoning})
    scores = {"base": base_scores, "tuned": tuned_scores}
    samples_path, markdown_path = _write_samples(out_dir, "Base vs tuned on held-out data", rows, scores)
    flat = {f"{model}_{name}": value for model, values in scores.items() for name, value in values.items()}
    return EvalResult(metrics=flat, samples_path=samples_path, markdown_path=markdown_path)


def evaluate_model(
    eval_path: Path, eval_tokens_dir: Path, tokenizer_dir: Path, model_dir: str, weights_dir: Path | None,
    identity_name: str, config: EvaluateConfig, out_dir: Path, precision: str = "fp32", trust_remote_code: bool = False,
    tool_format: str = "auto",
) -> EvalResult:
    """Score one model (a base model, or base + tuned weights) on the held-out rows; metrics under their bare names."""
    questions = held_out(eval_path, tool_format)
    metrics = GenerationMetrics(config, questions.chat, identity_name)
    samples = list(load_from_disk(str(eval_tokens_dir)))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    model = (load_model(model_dir, trust_remote_code) if weights_dir is None
             else load_tuned_model(model_dir, weights_dir, trust_remote_code)).to(inference_device()).eval()
    scores, outputs, reasoning = _score(model, tokenizer, samples, questions, metrics, config, precision)
    rows = _with_reasoning([{"prompt": shown, "reference": reference, "model": output}
                            for shown, reference, output in zip(questions.shown, questions.references, outputs)],
                           {"model": reasoning})
    samples_path, markdown_path = _write_samples(out_dir, "Held-out evaluation", rows, {"model": scores})
    return EvalResult(metrics=scores, samples_path=samples_path, markdown_path=markdown_path)


def _log_evaluation(run_id: str, result: EvalResult, label: str = "") -> None:
    """Metrics (prefixed `<label>_` when labelled), the Markdown report and the answers table (under eval/<label>)."""
    log_metrics(run_id, {f"{label}_{name}" if label else name: value for name, value in result.metrics.items()})
    folder = f"eval/{label}" if label else "eval"
    log_artifact(run_id, result.markdown_path, folder)
    rows = [json.loads(line) for line in result.samples_path.read_text(encoding="utf-8").splitlines()]
    log_table(run_id, rows, f"{folder}/samples_table.json")


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    eval_path: Path, eval_tokens_dir: Path, model_dir: str, weights_dir: Path, identity_name: str,
    config: EvaluateConfig, out_dir: Path, run_id: str, precision: str = "fp32", trust_remote_code: bool = False,
    tool_format: str = "auto",
) -> EvalResult:
    """evaluate_tuned(), with metrics, the Markdown report and the side-by-side table logged to the run."""
    result = evaluate_tuned(eval_path, eval_tokens_dir, model_dir, weights_dir, identity_name, config, out_dir,
                            precision, trust_remote_code, tool_format)
    _log_evaluation(run_id, result)
    return result


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model_task(
    eval_path: Path, eval_tokens_dir: Path, tokenizer_dir: Path, model_dir: str, weights_dir: Path | None,
    identity_name: str, config: EvaluateConfig, out_dir: Path, run_id: str, precision: str = "fp32",
    trust_remote_code: bool = False, label: str = "", tool_format: str = "auto",
) -> EvalResult:
    """evaluate_model(), with metrics, the Markdown report and the answers table logged to the run (labelled, for a
    second model scored in the same run: the champion in a head-to-head)."""
    result = evaluate_model(eval_path, eval_tokens_dir, tokenizer_dir, model_dir, weights_dir, identity_name, config,
                            out_dir, precision, trust_remote_code, tool_format)
    _log_evaluation(run_id, result, label)
    return result
