"""Stage 1, clean: read every source, normalise rows to one shape, drop what is broken, account for all.

Every input row ends either in `train.jsonl` / `eval.jsonl` or in `rejects.jsonl` with a reason code and its
origin (file and line, or index), and `report.json` counts both per source. Rows become a conversation
(`{"messages": [{role, content}, ...]}`) or a text document (`{"text": ...}`).

Files are parsed row by row here rather than through `datasets.load_dataset`, which stops at the first broken
row: a broken row must be counted and rejected, never fatal. Parquet and saved `datasets` folders are read
with pyarrow / `datasets` themselves.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import string
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix  # private, so datasketch is pinned; a test compares with MinHash
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import DataConfig, UserError
from tasks.builtin_data import BUILTIN_SOURCES
from tasks.tracking import log_artifact, log_inputs, log_metrics, set_tags

ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}
# Control characters other than newline and tab (NUL and ESC among them) and the BOM.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
PUNCTUATION_TO_SPACE = str.maketrans(dict.fromkeys(string.punctuation, " "))
SPACES = re.compile(r"[ \t\u00a0]+")
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
ROW_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
SUPPORTED_SUFFIXES = ROW_SUFFIXES + tuple(s + ".gz" for s in ROW_SUFFIXES if s != ".parquet")
NEAR_DUPLICATE_PERMUTATIONS = 32
GRAM_MIX = (0x9E3779B1, 0x85EBCA77)  # odd multipliers that make a 3-gram's hash depend on word order
# Rows are normalised and near-duplicate signed a chunk at a time; the character bound keeps a chunk's
# signature arrays (4 bytes x permutations per 3-gram) near 64 MB however long the rows are.
CHUNK_ROWS, CHUNK_CHARS = 1024, 1_000_000


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
    data_hash: str  # of the train and eval rows together: what a run trained and was scored on
    eval_hash: str  # of the eval rows alone: two scores compare only when measured on the same held-out rows


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").exists()


def check_source(source: str) -> None:
    """Fail before any work when a data source is missing or of an unsupported kind."""
    if source.startswith("builtin:"):
        if source.removeprefix("builtin:") not in BUILTIN_SOURCES:
            raise DataError(f"{source}: unknown builtin data set (known: {', '.join(sorted(BUILTIN_SOURCES))})")
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    if path.is_dir():
        if not _is_saved_dataset(path) and not _files_in(path):
            raise DataError(f"{source}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
    elif _suffix(path) not in SUPPORTED_SUFFIXES:
        raise DataError(f"{source}: unsupported file type {_suffix(path) or '(none)'} (use {', '.join(SUPPORTED_SUFFIXES)})")


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _suffix(p) in SUPPORTED_SUFFIXES)


def _read_bytes(path: Path) -> bytes:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (gzip.BadGzipFile, EOFError, OSError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if not data.strip():
        raise DataError(f"{path}: empty file")
    return data


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{what}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _rows_of_file(path: Path) -> Iterator[tuple[str, object]]:
    """(origin, raw row) pairs of one file; a row that cannot even be parsed comes as a RowRejected."""
    suffix = _suffix(path).removesuffix(".gz")
    if suffix == ".parquet":
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path)
        except Exception as error:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({error})") from None
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(table.to_pylist()))
        return
    data = _read_bytes(path)
    if suffix == ".txt":
        yield f"{path}", {"text": _decode(data, str(path))}
    elif suffix == ".jsonl":
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError:
                yield f"{path}:{number}", RowRejected("not_utf8")
            except json.JSONDecodeError:
                yield f"{path}:{number}", RowRejected("invalid_json")
    else:
        try:
            rows = json.loads(_decode(data, str(path)))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))


def read_source(source: str) -> Iterator[tuple[str, object]]:
    """(origin, raw row) pairs of a builtin set, a file, a folder of files or a saved `datasets` folder."""
    check_source(source)
    if source.startswith("builtin:"):
        rows = BUILTIN_SOURCES[source.removeprefix("builtin:")]()
        yield from ((f"{source}#{i}", row) for i, row in enumerate(rows))
        return
    path = Path(source)
    if _is_saved_dataset(path):
        from datasets import load_from_disk

        yield from ((f"{path}[{i}]", row) for i, row in enumerate(load_from_disk(str(path))))
    elif path.is_dir():
        for file in _files_in(path):
            yield from _rows_of_file(file)
    else:
        yield from _rows_of_file(path)


def check_readable(sources: list[str]) -> None:
    """Read every source through once, so a file that is unreadable as a whole stops a run before any work.

    Broken rows are not errors here (they are counted by clean); only whole-file problems raise DataError.
    """
    for source in sources:
        for _ in read_source(source):
            pass


def _clean_text(text: object, data: DataConfig, values: dict[str, str]) -> str:
    if isinstance(text, list):  # OpenAI content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in text):
            raise RowRejected("unsupported_content")
        text = "\n".join(str(p.get("text", "")) for p in text)
    if not isinstance(text, str):
        raise RowRejected("wrong_type")
    if data.normalize:
        text = unicodedata.normalize("NFC", CONTROL_CHARS.sub("", text))
        if "  " in text or "\t" in text or "\u00a0" in text:  # most text has nothing to collapse: skip the regex
            text = SPACES.sub(" ", text)
        text = "\n".join(line.strip() for line in text.split("\n")).strip()
    if "{{" in text:
        text = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)
    if not text.strip():
        raise RowRejected("empty_turn")
    return text


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise RowRejected("unknown_format")


def _turns(row: dict, row_format: str) -> list[tuple[object, object]]:
    """The row's raw (role, content) turns in its own format."""
    if row_format in ("openai", "sharegpt"):
        turns = row["messages"] if row_format == "openai" else row["conversations"]
        role_key, content_key = ("role", "content") if row_format == "openai" else ("from", "value")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RowRejected("wrong_type")
        return [(t.get(role_key), t.get(content_key)) for t in turns]
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list | tuple) and len(h) == 2 for h in history):
        raise RowRejected("wrong_type")
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    if not isinstance(prompt, str):
        raise RowRejected("wrong_type")
    turns = [("system", row["system"])] if row.get("system") else []
    for question, answer in history:
        turns += [("user", question), ("assistant", answer)]
    return turns + [("user", prompt), ("assistant", row["output"])]


def normalise_row(raw: object, data: DataConfig, values: dict[str, str]) -> tuple[str, dict]:
    """(format, clean row) for one raw row, or RowRejected with the reason code."""
    if isinstance(raw, RowRejected):
        raise raw
    if not isinstance(raw, dict):
        raise RowRejected("not_an_object")
    row = dict(raw)
    for ours, theirs in data.columns.items():  # LLaMA-Factory-style mapping of odd field names
        if theirs in row:
            row[ours] = row.pop(theirs)
    row_format = detect_format(row)
    if data.format != "auto" and row_format != data.format:
        raise RowRejected("wrong_format")
    if row_format == "text":
        clean = {"text": _clean_text(row["text"], data, values)}
    else:
        messages = []
        for role, content in _turns(row, row_format):
            normal_role = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
            if normal_role is None:
                raise RowRejected("unknown_role")
            messages.append({"role": normal_role, "content": _clean_text(content, data, values)})
        if not any(m["role"] == "assistant" for m in messages):
            raise RowRejected("no_assistant_turn")
        if messages[-1]["role"] != "assistant":
            raise RowRejected("ends_on_user_turn")
        clean = {"messages": messages}
    if len(_plain_text(clean)) > data.max_chars:
        raise RowRejected("too_long")
    return row_format, clean


def _plain_text(row: dict) -> str:
    return row["text"] if "text" in row else "\n".join(m["content"] for m in row["messages"])


def in_eval_split(key: str, fraction: float) -> bool:
    """Stable by content: a row's split depends on its own hash only, so new rows never move old ones."""
    return int(key[:8], 16) / 0x1_0000_0000 < fraction


class _WordHashes(dict):
    """crc32 of each word, computed once per distinct word (deterministic across runs, unlike hash())."""

    def __missing__(self, word: str) -> int:
        self[word] = value = zlib.crc32(word.encode())
        return value


class NearDuplicates:
    """MinHash LSH (datasketch) over word 3-grams, case and ASCII punctuation ignored: is a kept row this close?

    Signatures are made for a chunk of rows at once. datasketch's `MinHash.update_batch` spends most of its
    time on per-row numpy overhead, so `signatures` applies the same steps (its fmix32 pre-mix, its affine32
    permutations, the column minimum) to a whole chunk's 3-grams in one array operation; a test checks that
    each row's signature equals datasketch's own MinHash of the same 3-grams. The index itself is datasketch's.
    """

    def __init__(self, threshold: float):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NEAR_DUPLICATE_PERMUTATIONS)
        self.permutations = MinHash(num_perm=NEAR_DUPLICATE_PERMUTATIONS, scheme="affine32").permutations
        self.word_hashes = _WordHashes()
        self.count = 0

    def signatures(self, texts: list[str]) -> np.ndarray:
        """One MinHash signature row per text, computed for all texts together.

        A text's 3-grams are hashed from its words' crc32 values: (h1 * GRAM_MIX[0] ^ h2 * GRAM_MIX[1] ^ h3)
        mod 2**32; a text of fewer than three words counts as one 3-gram padded with zeros.
        """
        word_hashes, lengths = [], []
        for text in texts:
            words = text.lower().translate(PUNCTUATION_TO_SPACE).split() or [""]
            word_hashes += map(self.word_hashes.__getitem__, words)
            word_hashes += (0, 0)  # padding: a text of one or two words still has one 3-gram of its own
            lengths.append(len(words))
        hashes = np.array(word_hashes, dtype=np.uint32)
        grams = hashes[:-2] * np.uint32(GRAM_MIX[0]) ^ hashes[1:-1] * np.uint32(GRAM_MIX[1]) ^ hashes[2:]
        slots = np.array(lengths) + 2
        counts = np.maximum(slots - 4, 1)  # 3-grams per text
        firsts = np.cumsum(counts) - counts  # each text's first row in the selected 3-grams
        selected = grams[np.repeat(np.cumsum(slots) - slots - firsts, counts) + np.arange(counts.sum())]
        a, b = self.permutations
        return np.minimum.reduceat(_fmix(selected, 32)[:, None] * a + b, firsts, axis=0)

    def matches(self, signature: np.ndarray) -> list[int]:
        """The ids of the added rows this close to `signature`."""
        return self.lsh.query(LeanMinHash(seed=1, hashvalues=signature, scheme="affine32"))

    def add(self, signature: np.ndarray) -> int:
        self.lsh.insert(self.count, LeanMinHash(seed=1, hashvalues=signature, scheme="affine32"), check_duplication=False)
        self.count += 1
        return self.count - 1


def _normalised(pairs: Iterable[tuple[str, object]], data: DataConfig, values: dict[str, str],
                near: NearDuplicates | None) -> Iterator[tuple[str, object, str, dict | RowRejected, np.ndarray | None]]:
    """(origin, raw, format, clean row or its rejection, near-duplicate signature) for each pair, in order.

    Rows are taken a chunk at a time so that the signatures of a chunk are computed together.
    """
    chunk, chars = [], 0
    for origin, raw in pairs:
        try:
            row_format, row = normalise_row(raw, data, values)
            chars += len(_plain_text(row))
        except RowRejected as rejected:
            row_format, row = "", rejected
        chunk.append((origin, raw, row_format, row))
        if len(chunk) >= CHUNK_ROWS or chars >= CHUNK_CHARS:
            yield from _signed(chunk, near)
            chunk, chars = [], 0
    yield from _signed(chunk, near)


def _signed(chunk: list[tuple[str, object, str, dict | RowRejected]], near: NearDuplicates | None):
    clean_rows = [row for *_, row in chunk if not isinstance(row, RowRejected)]
    signatures = iter(near.signatures([_plain_text(r) for r in clean_rows]) if near and clean_rows else ())
    for origin, raw, row_format, row in chunk:
        yield origin, raw, row_format, row, None if isinstance(row, RowRejected) else next(signatures, None)


def _write_lines(path: Path, lines: list[str]) -> None:
    """Written beside the target and renamed into place, so a failed run leaves no half-written file."""
    staging = path.with_suffix(".partial")
    staging.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    staging.replace(path)


def clean(data: DataConfig, values: dict[str, str], out_dir: Path) -> CleanResult:
    """Read the train and eval sources into clean JSONL files plus rejects and a per-source report.

    The held-out rows stay fixed as training data grows: eval sources are read first, and a train row that
    duplicates or nearly duplicates a held-out row is the one dropped (`in_eval`). With `eval_fraction`, a row the
    split holds out evicts the train rows already kept that it nearly duplicates.
    """
    near = NearDuplicates(data.near_duplicate_threshold) if data.near_duplicate_threshold < 1 else None
    split_of: dict[str, str] = {}  # exact key of each kept row -> its split
    near_rows: dict[int, tuple[str, int]] = {}  # near-duplicate id -> (split, index in kept[split])
    kept: dict[str, list[str | None]] = {"train": [], "eval": []}  # None: a train row evicted by a held-out one
    kept_from: list[tuple[str, str]] = []  # (source, origin) of each kept train row, for eviction
    rejects: list[dict] = []
    counts: dict[str, Counter] = {}
    formats: dict[str, Counter] = {}

    def reject(source: str, origin: str, reason: str, row: object) -> None:
        counts[source][reason] += 1
        rejects.append({"origin": origin, "reason": reason, "row": row})

    for split, sources in (("eval", data.eval), ("train", data.train)):
        for source in sources:
            counts[source], formats[source] = Counter(), Counter()
            for origin, raw, row_format, row, signature in _normalised(read_source(source), data, values, near):
                counts[source]["read"] += 1
                if isinstance(row, RowRejected):
                    reject(source, origin, str(row), None if isinstance(raw, RowRejected) else raw)
                    continue
                # Clean rows are built with a fixed key order, so their JSON line is canonical: it is both
                # the duplicate key and the line written out.
                line = json.dumps(row, ensure_ascii=False)
                key = hashlib.sha256(line.encode()).hexdigest()
                target = "eval" if split == "eval" or in_eval_split(key, data.eval_fraction) else "train"
                close = near.matches(signature) if near is not None else []
                if data.dedup and key in split_of:
                    reject(source, origin, "in_eval" if split_of[key] == "eval" != target else "duplicate", raw)
                    continue
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
                    evicted_source, evicted_origin = kept_from[index]
                    split_of[hashlib.sha256(evicted.encode()).hexdigest()] = "eval"  # its copies are held out too
                    counts[evicted_source]["kept"] -= 1
                    reject(evicted_source, evicted_origin, "in_eval", json.loads(evicted))
                split_of[key] = target
                if near is not None:
                    near_rows[near.add(signature)] = (target, len(kept[target]))
                if target == "train":
                    kept_from.append((source, origin))
                kept[target].append(line)
                counts[source]["kept"] += 1
                formats[source][row_format] += 1
    report = {
        source: {"format": "+".join(sorted(formats[source])) or "none", "read": counts[source].pop("read", 0),
                 "kept": counts[source].pop("kept", 0),
                 "rejected": dict(sorted((reason, n) for reason, n in counts[source].items() if n))}
        for source in [*data.train, *data.eval]
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = {split: [line for line in rows if line is not None] for split, rows in kept.items()}
    paths = {split: out_dir / f"{split}.jsonl" for split in lines}
    for split, split_lines in lines.items():
        _write_lines(paths[split], split_lines)
    rejects_path = out_dir / "rejects.jsonl"
    _write_lines(rejects_path, [json.dumps(r, ensure_ascii=False, default=str) for r in rejects])
    data_hash = hashlib.sha256(paths["train"].read_bytes() + b"\0" + paths["eval"].read_bytes()).hexdigest()
    eval_hash = hashlib.sha256(paths["eval"].read_bytes()).hexdigest()
    summary = {"sources": report, "train_rows": len(lines["train"]), "eval_rows": len(lines["eval"]),
               "rejected_rows": len(rejects), "data_hash": data_hash, "eval_hash": eval_hash}
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return CleanResult(
        train_path=paths["train"], eval_path=paths["eval"], rejects_path=rejects_path, report_path=report_path,
        train_rows=len(lines["train"]), eval_rows=len(lines["eval"]), rejected_rows=len(rejects), data_hash=data_hash,
        eval_hash=eval_hash,
    )


@task(name="clean", cache_policy=NO_CACHE)
def clean_task(data: DataConfig, values: dict[str, str], out_dir: Path, run_id: str) -> CleanResult:
    """clean(), with its report, rejects and data lineage logged to the flow's MLflow run."""
    result = clean(data, values, out_dir)
    for path in (result.report_path, result.rejects_path, result.train_path, result.eval_path):
        log_artifact(run_id, path, "data")
    log_metrics(run_id, {"data_train_rows": result.train_rows, "data_eval_rows": result.eval_rows,
                         "data_rejected_rows": result.rejected_rows})
    set_tags(run_id, {"data_hash": result.data_hash})
    log_inputs(run_id, {"train": result.train_path, "eval": result.eval_path}, result.data_hash[:16])
    return result
