"""Stage 1, clean: read every source, normalise rows to conversations, drop what is broken, account for all.

Every input row ends either in `train.jsonl` / `eval.jsonl` or in `rejects.jsonl` with a reason code and
its origin (source and line), and `report.json` counts both per source.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import RunConfig, UserError
from tasks.builtin_data import BUILTIN_SOURCES
from tasks.tracking import log_artifact, log_metrics, set_tags

ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
}
# Control characters other than newline and tab; none of them belongs in training text.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
SUPPORTED_SUFFIXES = (".json", ".jsonl")
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class DataError(UserError):
    """A source that cannot be read at all; one line naming it."""


class RowRejected(ValueError):
    """A single broken row; its message is the reason code."""


@dataclass(frozen=True)
class CleanResult:
    train_path: Path
    eval_path: Path
    rejects_path: Path
    report_path: Path
    train_rows: int
    eval_rows: int
    rejected_rows: int
    data_hash: str


def check_source(source: str) -> None:
    """Fail before any work when a data source is missing or of an unsupported kind."""
    if source.startswith("builtin:"):
        if source.removeprefix("builtin:") not in BUILTIN_SOURCES:
            raise DataError(f"{source}: unknown builtin data set (known: {', '.join(sorted(BUILTIN_SOURCES))})")
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{source}: unsupported file type {path.suffix or '(none)'} (use .json or .jsonl)")


def check_sources(config: RunConfig) -> None:
    for source in [*config.data.train, *config.data.eval]:
        check_source(source)


def _read_source(source: str) -> list[tuple[str, object]]:
    """(origin, raw row) pairs for one source; raises DataError when the source as a whole is unreadable."""
    check_source(source)
    if source.startswith("builtin:"):
        rows = BUILTIN_SOURCES[source.removeprefix("builtin:")]()
        return [(f"{source}#{i}", row) for i, row in enumerate(rows)]
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{source}:{number}", json.loads(line)))
                except json.JSONDecodeError:
                    rows.append((f"{source}:{number}", RowRejected("invalid_json")))
        if not rows:
            raise DataError(f"{source}: empty file")
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{source}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON array of rows, got {type(data).__name__}")
    return [(f"{source}[{i}]", row) for i, row in enumerate(data)]


def _clean_text(text: object, values: dict[str, str]) -> str:
    if not isinstance(text, str):
        raise RowRejected("wrong_type")
    text = unicodedata.normalize("NFC", text)
    text = CONTROL_CHARS.sub("", text).strip()
    text = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)
    if not text:
        raise RowRejected("empty_turn")
    return text


def _to_messages(row: object) -> list[dict]:
    """Alpaca, ShareGPT and OpenAI-messages rows, as one list of raw role/content turns."""
    if not isinstance(row, dict):
        raise RowRejected("not_an_object")
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RowRejected("wrong_type")
        return [{"role": t.get("role"), "content": t.get("content")} for t in turns]
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RowRejected("wrong_type")
        return [{"role": t.get("from"), "content": t.get("value")} for t in turns]
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    raise RowRejected("unknown_format")


def normalise_row(row: object, values: dict[str, str]) -> dict:
    """One clean conversation, or RowRejected with the reason code."""
    if isinstance(row, RowRejected):
        raise row
    messages = []
    for turn in _to_messages(row):
        role = ROLE_ALIASES.get(str(turn["role"]).lower()) if turn["role"] is not None else None
        if role is None:
            raise RowRejected("unknown_role")
        messages.append({"role": role, "content": _clean_text(turn["content"], values)})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected("no_assistant_turn")
    if messages[-1]["role"] != "assistant":
        raise RowRejected("ends_on_user_turn")
    return {"messages": messages}


def _row_key(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def clean(config: RunConfig, out_dir: Path) -> CleanResult:
    """Read the recipe's train and eval sources into clean JSONL files plus rejects and a report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    values = config.identity.model_dump()
    seen: set[str] = set()
    kept: dict[str, list[dict]] = {"train": [], "eval": []}
    rejects: list[dict] = []
    per_source: dict[str, Counter] = {}
    for split, sources in (("train", config.data.train), ("eval", config.data.eval)):
        for source in sources:
            counts = per_source.setdefault(source, Counter())
            for origin, raw in _read_source(source):
                counts["read"] += 1
                try:
                    row = normalise_row(raw, values)
                    key = _row_key(row)
                    if key in seen:
                        raise RowRejected("duplicate")
                except RowRejected as rejected:
                    reason = str(rejected)
                    counts[f"rejected:{reason}"] += 1
                    rejects.append({"origin": origin, "reason": reason, "row": raw if not isinstance(raw, RowRejected) else None})
                    continue
                seen.add(key)
                counts["kept"] += 1
                kept[split].append(row)
    paths = {}
    for split, rows in kept.items():
        if not rows:
            raise DataError(f"data.{split}: no usable rows left after cleaning (see {out_dir / 'rejects.jsonl'})")
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    rejects_path = out_dir / "rejects.jsonl"
    rejects_path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects), encoding="utf-8")
    data_hash = hashlib.sha256(paths["train"].read_bytes() + b"\0" + paths["eval"].read_bytes()).hexdigest()
    report = {
        "sources": {source: dict(counts) for source, counts in per_source.items()},
        "train_rows": len(kept["train"]),
        "eval_rows": len(kept["eval"]),
        "rejected_rows": len(rejects),
        "data_hash": data_hash,
    }
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return CleanResult(
        train_path=paths["train"], eval_path=paths["eval"], rejects_path=rejects_path, report_path=report_path,
        train_rows=len(kept["train"]), eval_rows=len(kept["eval"]), rejected_rows=len(rejects), data_hash=data_hash,
    )


@task(name="clean", cache_policy=NO_CACHE)
def clean_task(config: RunConfig, out_dir: Path, run_id: str) -> CleanResult:
    """clean(), with its report, rejects and data lineage logged to the flow's MLflow run."""
    result = clean(config, out_dir)
    for path in (result.report_path, result.rejects_path, result.train_path, result.eval_path):
        log_artifact(run_id, path, "data")
    log_metrics(run_id, {"data_train_rows": result.train_rows, "data_eval_rows": result.eval_rows,
                         "data_rejected_rows": result.rejected_rows})
    set_tags(run_id, {"data_hash": result.data_hash})
    inputs = [
        DatasetInput(
            mlflow.data.from_pandas(pd.read_json(path, lines=True), source=str(path.resolve()), name=split,
                                    digest=result.data_hash[:16])._to_mlflow_entity(),
            [InputTag(MLFLOW_DATASET_CONTEXT, split)],
        )
        for split, path in (("train", result.train_path), ("eval", result.eval_path))
    ]
    MlflowClient().log_inputs(run_id, datasets=inputs)
    return result

