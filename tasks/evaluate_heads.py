"""Stage 4 for task heads: the base model under its new, untrained head vs the tuned one, on the held-out rows.

Each model is scored by held-out loss and the recipe's head metric, an `evaluate` module (builtin:classification:
accuracy, macro-F1 and F1 per class; builtin:seqeval: entity-level precision/recall/F1 in strict IOB2, F1 per
entity type). The tuned model's confusion matrix is drawn to an image, and the predictions sit in a table a person
can read (text, gold, base, tuned). The base head is drawn with the run's seed, as training drew it: the base score
is what training started from.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import evaluate
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, DataCollatorForTokenClassification, DataCollatorWithPadding, set_seed

from conf.schema import EvaluateConfig, UserError
from tasks.base_model import load_head_model, load_tuned_head
from tasks.context import RunContext
from tasks.device import autocast, inference_device
from tasks.labels import Head, entity_spans, joined_words
from tasks.metrics import metric_code_version, resolve_metric
from tasks.results import EvalResult, ModelSource, PreparedData

DEFAULT_HEAD_METRICS = {"sequence_classification": "builtin:classification", "token_classification": "builtin:seqeval"}
SHOWN_ROWS = 20  # predictions shown in the Markdown report (the table holds them all)


def head_metric_name(config: EvaluateConfig, task_name: str) -> str:
    return config.head_metric or DEFAULT_HEAD_METRICS[task_name]


def load_head_metric(config: EvaluateConfig, task_name: str) -> evaluate.EvaluationModule:
    name = head_metric_name(config, task_name)
    try:
        return evaluate.load(resolve_metric(name))
    except Exception as error:  # evaluate raises anything from FileNotFoundError to hub connection errors
        raise UserError(f"evaluate.head_metric: cannot load metric {name!r} ({str(error).splitlines()[0]}); offline, "
                        "use builtin:classification, builtin:seqeval or a local module folder") from None


def head_metric_version(config: EvaluateConfig, task_name: str) -> str:
    """The version of the code that measures a head's scores (scores by different versions do not compare)."""
    return metric_code_version([head_metric_name(config, task_name)])


def check_head_metric(config: EvaluateConfig, task_name: str, primary_metric: str) -> None:
    """Before any work: the head metric module loads and gives the metric that decides promotion (per-class scores
    depend on the data, so only the overall ones count here)."""
    metric = load_head_metric(config, task_name)
    example = ["B-X", "O"] if task_name == "token_classification" else "x"
    scores = metric.compute(predictions=[example], references=[example])
    names = {"eval_loss", *(name for name, value in scores.items()
                            if isinstance(value, int | float) and not name.startswith("f1_"))}
    if primary_metric not in names:
        raise UserError(f"registry.primary_metric: {primary_metric!r} is not measured for task {task_name}; "
                        f"it measures {sorted(names)}")


@torch.no_grad()
def predict_labels(model, tokenizer, samples, head: Head, batch_size: int, precision: str
                   ) -> tuple[float, list, list[float]]:
    """Held-out loss (mean over labels: texts, or words), and each sample's predicted label (or per-word tags) with
    its probability (for tags, the mean over the sample's words)."""
    collate = (DataCollatorForTokenClassification(tokenizer) if head.task == "token_classification"
               else DataCollatorWithPadding(tokenizer))
    features = [{key: sample[key] for key in ("input_ids", "attention_mask", "labels")} for sample in samples]
    total, count, predictions, confidences = 0.0, 0, [], []
    with autocast(precision):
        for start in range(0, len(features), batch_size):
            batch = collate(features[start : start + batch_size]).to(model.device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
            probabilities = logits.softmax(-1)
            best, chosen = probabilities.max(-1)
            for row in range(len(labels)):
                if head.task == "token_classification":
                    words = labels[row] != -100
                    predictions.append([head.labels[i] for i in chosen[row][words].tolist()])
                    confidences.append(float(best[row][words].mean()) if words.any() else 0.0)
                else:
                    predictions.append(head.labels[int(chosen[row])])
                    confidences.append(float(best[row]))
    return total / max(count, 1), predictions, confidences


def gold_labels(samples, head: Head) -> list:
    """Each sample's gold label, or its words' gold tags, read from the sample's label ids."""
    if head.task == "token_classification":
        return [[head.labels[i] for i in sample["labels"] if i != -100] for sample in samples]
    return [head.labels[sample["labels"]] for sample in samples]


def _shown(text_or_words, tags: list[str] | str) -> str:
    """A prediction as a person reads it: the label, or the entities found in the sentence (`text` (TYPE); ...)."""
    if isinstance(tags, str):
        return tags
    text, words = joined_words(text_or_words)
    spans = entity_spans(words, tags, [1.0] * len(tags), text)
    return "; ".join(f"{span['text']} ({span['entity']})" for span in spans) or "(none)"


def confusion_image(gold: list, predicted: list, labels: tuple[str, ...], path: Path, title: str) -> Path:
    """The confusion matrix of gold vs predicted labels (per word for tags), drawn by scikit-learn to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    flat_gold = [tag for tags in gold for tag in tags] if gold and isinstance(gold[0], list) else gold
    flat_predicted = ([tag for tags in predicted for tag in tags] if predicted and isinstance(predicted[0], list)
                      else predicted)
    size = max(4.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(flat_gold, flat_predicted, labels=list(labels), ax=axes, colorbar=False,
                                            xticks_rotation=45)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _markdown(rows: list[dict], scores: dict[str, dict[str, float]]) -> str:
    lines = ["# Base head vs tuned on held-out data", "", "| metric | base | tuned |", "|---|---|---|"]
    lines += [f"| {name} | {scores['base'][name]:.4f} | {scores['tuned'][name]:.4f} |" for name in sorted(scores["tuned"])]
    lines += ["", f"## Predictions (the first {min(SHOWN_ROWS, len(rows))} of {len(rows)})", "",
              "| text | gold | base | tuned |", "|---|---|---|---|"]
    lines += [f"| {row['text']} | {row['gold']} | {row['base']} | {row['tuned']} |".replace("\n", " ")
              for row in rows[:SHOWN_ROWS]]
    return "\n".join(lines) + "\n"


def evaluate_head(data: PreparedData, source: ModelSource, config: EvaluateConfig, ctx: RunContext, *,
                  precision: str = "fp32") -> EvalResult:
    """Score the base model under a new head (drawn with ctx.seed, as training drew it) and the tuned model on the
    held-out samples. Metrics come as base_<name> and tuned_<name>; the report lands in ctx.work_dir/eval."""
    model_dir, weights_dir, trust_remote_code, seed = source.model_dir, source.weights_dir, ctx.trust_remote_code, ctx.seed
    eval_tokens_dir, out_dir = data.tokens.eval_dir, ctx.work_dir / "eval"
    head = Head.of(weights_dir)
    if head is None:
        raise UserError(f"{weights_dir}: no head.json; these weights were not trained with a task head")
    samples = list(load_from_disk(str(eval_tokens_dir)))
    tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
    metric = load_head_metric(config, head.task)
    gold = gold_labels(samples, head)
    set_seed(seed)
    model = load_head_model(model_dir, head, trust_remote_code).to(inference_device()).eval()
    scores, predicted = {}, {}
    for name in ("base", "tuned"):
        if name == "tuned":
            model = load_tuned_head(model_dir, weights_dir, head, trust_remote_code, base=model)
            model = model.to(inference_device()).eval()
        loss, predicted[name], _ = predict_labels(model, tokenizer, samples, head, config.batch_size, precision)
        measured = metric.compute(predictions=predicted[name], references=gold)
        scores[name] = {"eval_loss": loss} | {key: float(value) for key, value in measured.items()
                                              if isinstance(value, int | float) and math.isfinite(value)}
    shown_text = [sample.get("tokens") or sample.get("text") for sample in samples]
    rows = [{"text": text if isinstance(text, str) else " ".join(text), "gold": _shown(text, gold_tags),
             "base": _shown(text, base), "tuned": _shown(text, tuned)}
            for text, gold_tags, base, tuned in zip(shown_text, gold, predicted["base"], predicted["tuned"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path, markdown_path = out_dir / "predictions.jsonl", out_dir / "predictions.md"
    samples_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    markdown_path.write_text(_markdown(rows, scores), encoding="utf-8")
    confusion_path = confusion_image(gold, predicted["tuned"], head.labels, out_dir / "confusion_matrix.png",
                                     "tuned: gold (rows) vs predicted (columns)")
    flat = {f"{name}_{metric_key(key)}": value for name, values in scores.items() for key, value in values.items()}
    return EvalResult(flat, samples_path, markdown_path, confusion_path)


def metric_key(name: str) -> str:
    """A metric name MLflow takes (per-class names carry the label, which may hold any character)."""
    return re.sub(r"[^\w\-. /]", "_", name)

