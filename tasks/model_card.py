"""The model card of a registered version: what it is, what it was trained on, how it scored and how to load it.

Written with huggingface_hub's ModelCard (Hugging Face's format: YAML metadata, then Markdown) as README.md in the
weights folder, where it travels with the logged model and a merged export, and set as the MLflow model version's
description, which the registry UI shows. It replaces the empty template PEFT writes there.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from pydantic import BaseModel

CARD_FILE = "README.md"
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


class CardFacts(BaseModel):
    """What a run knows of itself that its card shows (the flow gathers it; sync replays it from the record)."""

    recipe: str
    config_hash: str
    method: str
    objective: str
    adapter: str  # "LoRA r=16, alpha 32, on all-linear", or "every weight (full training)"
    steps: int
    max_length: int
    train_tokens: int
    sources: dict[str, dict]  # the clean stage's report per source: format, read, kept, rejected by reason
    train_rows: int
    eval_rows: int
    rejected_rows: int
    data_hash: str
    eval_hash: str


def _metrics_table(metrics: dict[str, float], primary: str, champion: tuple[str, float] | None) -> list[str]:
    names = sorted(name.removeprefix("tuned_") for name in metrics
                   if name.startswith("tuned_") and f"base_{name.removeprefix('tuned_')}" in metrics)
    names.sort(key=lambda name: name != primary)  # the metric that decides promotion first
    header = "| metric | base | tuned |" + (f" champion (version {champion[0]}) |" if champion else "")
    rows = [header, "|---|---|---|" + ("---|" if champion else "")]
    for name in names:
        cells = [f"{metrics[f'base_{name}']:.4f}", f"{metrics[f'tuned_{name}']:.4f}"]
        if champion:
            cells.append(f"{champion[1]:.4f}" if name == primary else "")
        rows.append(f"| {name}{' (decides promotion)' if name == primary else ''} | " + " | ".join(cells) + " |")
    return rows


def _data_section(facts: CardFacts) -> list[str]:
    lines = [f"{facts.train_rows} rows trained, {facts.eval_rows} held out, {facts.rejected_rows} rejected by the "
             f"clean stage (each with its reason, in the run's `clean/rejects.jsonl`). Data hash `{facts.data_hash}`, "
             f"held-out rows `{facts.eval_hash}`.", "", "| source | format | read | kept | rejected |",
             "|---|---|---|---|---|"]
    for source, report in facts.sources.items():
        rejected = ", ".join(f"{reason} {count}" for reason, count in report.get("rejected", {}).items()) or "0"
        lines.append(f"| `{source}` | {report.get('format', '?')} | {report.get('read', 0)} | {report.get('kept', 0)} "
                     f"| {rejected} |")
    return lines


def _guards_table(guards: list) -> list[str]:
    rows = ["", "Guard suites (`registry.guards`): the candidate may not score more than the allowed regression worse "
            "than the base model or the champion.", "", "| guard | metric | base | tuned | allowed regression |",
            "|---|---|---|---|---|"]
    return rows + [f"| `{g.label}` | {g.metric} | {g.base:.4f} | {g.tuned:.4f} | {g.max_regression} |" for g in guards]


def model_card(*, base_model: str, run_id: str, model_name: str, artifact: str, metrics: dict[str, float],
               primary_metric: str, facts: CardFacts | None, champion: tuple[str, float] | None = None,
               guards: list | None = None) -> ModelCard:
    """The card of the model `run_id` logged as `artifact` for registered model `model_name`: base vs tuned on every
    metric both have, beside the champion's score of the primary metric when there is a champion."""
    is_adapter = facts is None or facts.method != "full"
    data = ModelCardData(base_model=base_model if "/" in base_model and not base_model.startswith("/") else None,
                         library_name="peft" if is_adapter else "transformers", pipeline_tag="text-generation",
                         tags=["loraflow", "mlflow", *(["lora"] if is_adapter else [])], model_name=model_name)
    body = [f"# {model_name}", "",
            f"Tuned from `{base_model}` by loraflow, in MLflow run `{run_id}`."]
    if facts is not None:
        body += ["", "## Training", "",
                 f"- recipe `{facts.recipe}` (hash `{facts.config_hash}`)",
                 f"- method {facts.method}, objective {facts.objective}: {facts.adapter}",
                 f"- {facts.steps} steps over {facts.train_tokens:,} training tokens, samples of at most "
                 f"{facts.max_length} tokens", "", "## Data", "", *_data_section(facts)]
    body += ["", "## Evaluation", "", "On the held-out rows, the base model and this one alike:", "",
             *_metrics_table(metrics, primary_metric, champion), *(_guards_table(guards) if guards else [])]
    body += ["", "## Intended use and limits", "",
             "A model tuned on the data above, for prompts like its held-out rows. It was evaluated on those rows "
             "only" + (f", with samples of at most {facts.max_length} tokens: longer inputs were never trained"
                       if facts is not None else "") + ". Read the answers in the run's `eval/samples.md` before "
             "relying on it elsewhere."]
    load = (["```python", "from peft import AutoPeftModelForCausalLM",
             f'model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")  # base: {base_model}', "```"]
            if is_adapter else ["```python", "from transformers import AutoModelForCausalLM",
                                'model = AutoModelForCausalLM.from_pretrained("<this folder>")', "```"])
    body += ["", "## How to load it", "", *load, "",
             "```python", "import mlflow", f'model = mlflow.pyfunc.load_model("runs:/{run_id}/{artifact}")',
             'model.predict({"messages": [{"role": "user", "content": "Hello"}]})', "```", "",
             f"`loraflow chat {run_id}` talks to it; `loraflow export {run_id} --merged OUT` writes a plain "
             "transformers model with this card."]
    return ModelCard.from_template(data, template_str=TEMPLATE, body="\n".join(body))


def write_card(card: ModelCard, weights_dir: Path) -> Path:
    path = Path(weights_dir) / CARD_FILE
    card.save(path)
    return path


def merged_card(adapter_card: Path) -> ModelCard:
    """An adapter's card for its merged export (`loraflow export --merged`): the same facts, loaded without PEFT."""
    card = ModelCard.load(adapter_card)
    card.data.library_name = "transformers"
    card.data.tags = [tag for tag in card.data.tags or [] if tag != "lora"]
    note = ("This folder is the adapter merged into its base by `loraflow export --merged`: load it with "
            "`AutoModelForCausalLM.from_pretrained(\"<this folder>\")`, no PEFT needed.")
    title, _, rest = card.text.strip().partition("\n")
    return ModelCard.from_template(card.data, template_str=TEMPLATE, body=f"{title}\n\n{note}\n{rest}")


LOAD_LINE = ". Load it as "


def version_description(card: ModelCard, model_name: str, version: str, decision: str) -> str:
    """The card's Markdown (no metadata) for the registry, with the version's own URIs and its promotion decision."""
    return (f"**{model_name} version {version}**: {decision}{LOAD_LINE}`models:/{model_name}/{version}` "
            f"(`loraflow chat models:/{model_name}/{version}`).\n\n{card.text.strip()}\n")


def redecided(description: str, model_name: str, version: str, decision: str) -> str:
    """A version's description with its promotion decision replaced (a person decided on it after it was written)."""
    _, found, rest = description.partition(LOAD_LINE)
    return f"**{model_name} version {version}**: {decision}{LOAD_LINE}{rest}" if found else description
