"""Stage 1, clean: read every source, normalise rows to one shape, drop what is broken, account for all.

Every input row ends either in `train.jsonl` / `eval.jsonl` or in `rejects.jsonl` with a reason code and its
origin (file and line, or index), and `report.json` counts both per source. Text files are split into documents
(by line, paragraph or file). For a task head, rows become labelled texts or tagged words (tasks/labels.py): the
label set is the train split's, and a held-out row with a label training never saw is rejected (`unseen_label`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from conf.schema import DataConfig
from tasks.clean.dedup import NearDuplicates
from tasks.clean.normalise import normalise_row, plain_text, row_messages
from tasks.clean.preference import normalise_preference_row
from tasks.clean.readers import RowRejected, read_source
from tasks.clean.report import (
    HINTS, held_out_labels_seen_in_training, label_report, reject_line, source_layouts, write_lines,
)
from tasks.context import RunContext
from tasks.labels import label_order
from tasks.results import PREFERENCE_KINDS, CleanResult


# Rows are normalised and near-duplicate signed a chunk at a time; the character bound keeps a chunk's
# signature arrays (4 bytes x permutations per 3-gram) near 64 MB however long the rows are.
CHUNK_ROWS, CHUNK_CHARS = 1024, 1_000_000


def in_eval_split(key: str, fraction: float) -> bool:
    """Stable by content: a row's split depends on its own hash only, so new rows never move old ones."""
    return int(key[:8], 16) / 0x1_0000_0000 < fraction


def _normalised(pairs: Iterable[tuple[str, object]], data: DataConfig, values: dict[str, str],
                near: NearDuplicates | None, task: str
                ) -> Iterator[tuple[str, object, str, dict | RowRejected, tuple[str, str], np.ndarray | None]]:
    """(origin, raw, format, clean row or its rejection, (its JSON line, that line's hash), near-duplicate signature)
    for each pair, in order. Clean rows are built with a fixed key order, so the JSON line is canonical: the line
    written out, and its hash the duplicate key.

    Rows are taken a chunk at a time so that the signatures of a chunk are computed together.
    """
    chunk, chars = [], 0
    normalise = normalise_preference_row if task in PREFERENCE_KINDS else normalise_row
    for origin, raw in pairs:
        line = ""
        try:
            row_format, row = normalise(raw, data, values, task)
            line = json.dumps(row, ensure_ascii=False)
            key = hashlib.sha256(line.encode()).hexdigest()  # a lone surrogate (JSON's \ud800) fails here
            chars += len(plain_text(row))
        except RowRejected as rejected:
            row_format, row, key = "", rejected, ""
        except UnicodeEncodeError:
            row_format, row, key = "", RowRejected("not_utf8"), ""
        except Exception:  # whatever a row holds (any structure, depth or size), its failure is its own reject
            row_format, row, key = "", RowRejected("malformed_row"), ""
        chunk.append((origin, raw, row_format, row, (line, key)))
        if len(chunk) >= CHUNK_ROWS or chars >= CHUNK_CHARS:
            yield from _signed(chunk, near)
            chunk, chars = [], 0
    yield from _signed(chunk, near)


def _signed(chunk: list[tuple[str, object, str, dict | RowRejected, tuple[str, str]]], near: NearDuplicates | None):
    clean_rows = [row for _, _, _, row, _ in chunk if not isinstance(row, RowRejected)]
    signatures = iter(near.signatures([plain_text(r) for r in clean_rows]) if near and clean_rows else ())
    for origin, raw, row_format, row, line_key in chunk:
        yield origin, raw, row_format, row, line_key, None if isinstance(row, RowRejected) else next(signatures, None)


def _prompt_key(row: dict) -> str:
    """A preference row's prompt (with the tools it offers), as the key that keeps held-out prompts out of training."""
    return hashlib.sha256(json.dumps([row["prompt"], row.get("tools")], ensure_ascii=False).encode()).hexdigest()


def clean(data: DataConfig, ctx: RunContext, *, values: dict[str, str] | None = None, task: str = "causal_lm"
          ) -> CleanResult:
    """Read the train and eval sources into clean JSONL files (under ctx.work_dir/clean) plus rejects and a
    per-source report; `values` fill the identity placeholders of the builtin data. `task` says what rows are kept:
    conversations and documents (causal_lm), a task head's labelled rows, or preference rows (tasks/clean/
    preference.py).

    The held-out rows stay fixed as training data grows: eval sources are read first, and a train row that
    duplicates or nearly duplicates a held-out row is the one dropped (`in_eval`). With `eval_fraction`, a row the
    split holds out evicts the train rows already kept that it nearly duplicates. Preference rows are split by their
    prompt, and a train row asking a held-out prompt is dropped (`in_eval`) however its answers differ.
    """
    out_dir, values = ctx.work_dir / "clean", values or {}
    near = NearDuplicates(data.near_duplicate_threshold) if data.near_duplicate_threshold < 1 else None
    split_of: dict[str, str] = {}  # exact key of each kept row -> its split
    near_rows: dict[int, tuple[str, int]] = {}  # near-duplicate id -> (split, index in kept[split])
    kept: dict[str, list[str | None]] = {"train": [], "eval": []}  # None: a train row evicted by a held-out one
    kept_from: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}  # (source, origin) of each kept row
    rejects: list[dict] = []
    counts: dict[str, Counter] = {}
    formats: dict[str, Counter] = {}
    documents: dict[str, Counter] = {}  # per source: text documents kept and their characters
    held_out_prompts: set[str] = set()  # preference rows: the prompts of the held-out rows

    def reject(source: str, origin: str, reason: str, row: object) -> None:
        counts[source][reason] += 1
        rejects.append({"origin": origin, "reason": reason, "row": row})

    for split, sources in (("eval", data.eval), ("train", data.train)):
        for source in sources:
            counts[source], formats[source], documents[source] = Counter(), Counter(), Counter()
            rows = read_source(source, data.text_split)
            for origin, raw, row_format, row, (line, key), signature in _normalised(rows, data, values, near, task):
                counts[source]["read"] += 1
                if isinstance(row, RowRejected):
                    reject(source, origin, str(row), None if isinstance(raw, RowRejected) else raw)
                    continue
                prompt_key = _prompt_key(row) if task in PREFERENCE_KINDS else None
                split_by = prompt_key or key
                target = "eval" if split == "eval" or in_eval_split(split_by, data.eval_fraction) else "train"
                close = near.matches(signature) if near is not None else []
                if data.dedup and key in split_of:
                    reject(source, origin, "in_eval" if split_of[key] == "eval" != target else "duplicate", raw)
                    continue
                if target == "train" and prompt_key in held_out_prompts:
                    reject(source, origin, "in_eval", raw)
                    continue
                if target == "eval" and prompt_key is not None:
                    held_out_prompts.add(prompt_key)
                if any(near_rows[match][0] == "eval" for match in close):
                    reject(source, origin, "in_eval" if target == "train" else "near_duplicate", raw)
                    continue
                if close and target == "train":
                    reject(source, origin, "near_duplicate", raw)
                    continue
                for match in close:  # a held-out row takes the place of the train rows it nearly duplicates
                    _, index = near_rows[match]
                    near_rows[match] = ("eval", -1)  # what nearly repeats the evicted row is held out as well
                    evicted, kept["train"][index] = kept["train"][index], None
                    evicted_source, evicted_origin = kept_from["train"][index]
                    split_of[hashlib.sha256(evicted.encode()).hexdigest()] = "eval"  # its copies are held out too
                    counts[evicted_source]["kept"] -= 1
                    reject(evicted_source, evicted_origin, "in_eval", json.loads(evicted))
                split_of[key] = target
                if near is not None:
                    near_rows[near.add(signature)] = (target, len(kept[target]))
                kept_from[target].append((source, origin))
                kept[target].append(line)
                counts[source]["kept"] += 1
                formats[source][row_format] += 1
                if row_format == "text":
                    documents[source].update(documents=1, characters=len(row["text"]))
                elif " with " in row_format:  # a row saying more than role and content: reasoning, weights
                    turns = [m for m in row_messages(row) if len(m) > 2]
                    documents[source].update(reasoning_rows=any("reasoning_content" in m for m in turns),
                                             untrained_turns=sum(m.get("weight") == 0 for m in turns))
    heads = task not in ("causal_lm", *PREFERENCE_KINDS)
    labels = held_out_labels_seen_in_training(kept, kept_from, reject, counts) if heads else None
    report = {
        source: {"format": "+".join(sorted({f.split(" with ")[0] for f in formats[source]})) or "none",
                 "read": counts[source].pop("read", 0), "kept": counts[source].pop("kept", 0),
                 "rejected": dict(sorted((reason, n) for reason, n in counts[source].items() if n))}
        | source_layouts(source, data.text_split, formats[source], documents[source])
        for source in [*data.train, *data.eval]
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = {split: [line for line in rows if line is not None] for split, rows in kept.items()}
    paths = {split: out_dir / f"{split}.jsonl" for split in lines}
    for split, split_lines in lines.items():
        write_lines(paths[split], split_lines)
    rejects_path = out_dir / "rejects.jsonl"
    write_lines(rejects_path, [reject_line(r) for r in rejects])
    data_hash = hashlib.sha256(paths["train"].read_bytes() + b"\0" + paths["eval"].read_bytes()).hexdigest()
    eval_hash = hashlib.sha256(paths["eval"].read_bytes()).hexdigest()
    reasons = {reason for counts_of in report.values() for reason in counts_of["rejected"]}
    summary = {"sources": report, "train_rows": len(lines["train"]), "eval_rows": len(lines["eval"]),
               "rejected_rows": len(rejects), "data_hash": data_hash, "eval_hash": eval_hash,
               "reasoning_rows": sum(counts.get("reasoning_rows", 0) for counts in report.values()),
               "max_chars": f"{data.max_chars} characters, for chat rows only; text documents are never rejected for "
                            "length (tokenize cuts them into blocks)",
               "hints": {reason: hint for reason, hint in HINTS.items() if reason in reasons}}
    if labels is not None:
        summary |= label_report(labels, data.min_class_rows)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return CleanResult(
        train_path=paths["train"], eval_path=paths["eval"], rejects_path=rejects_path, report_path=report_path,
        train_rows=len(lines["train"]), eval_rows=len(lines["eval"]), rejected_rows=len(rejects), data_hash=data_hash,
        eval_hash=eval_hash, labels=tuple(label_order(set(labels["train"]))) if labels is not None else (), task=task,
    )
