"""Stage 1, clean: read every source, normalise rows to one shape, drop what is broken, account for all.

Every input row ends either in `train.jsonl` / `eval.jsonl` or in `rejects.jsonl` with a reason code and its
origin (file and line, or index), and `report.json` counts both per source. Rows become a conversation
(`{"messages": [{role, content}, ...]}`, OpenAI's shape, tool calls and tool results included, with the row's
`tools`) or a text document (`{"text": ...}`). Text files are split into documents (by line, paragraph or file).
For a task head, rows become labelled texts or tagged words (tasks/labels.py; CSV/TSV and CoNLL files too): the
label set is the train split's, and a held-out row with a label training never saw is rejected (`unseen_label`).
Whatever a single row holds, a failure to read or normalise it is that row's reject, never the stage's.

Files are parsed row by row here rather than through `datasets.load_dataset`, which stops at the first broken
row: a broken row must be counted and rejected, never fatal. Parquet and saved `datasets` folders are read
with pyarrow / `datasets` themselves.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import string
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix  # private, so datasketch is pinned; a test compares with MinHash

from conf.schema import DataConfig, UserError
from tasks.builtin_data import BUILTIN_SOURCES
from tasks.context import RunContext
from tasks.labels import LabelRejected, conll_sentences, label_name, label_order, row_labels, token_row
from tasks.results import CleanResult

ROLE_ALIASES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system", "developer": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "function_response": "tool", "ipython": "tool",
}  # the last row: a tool's result
CALL_ROLES = ("function_call", "tool_call")  # ShareGPT: an assistant turn that calls tools (its value is JSON)
# Rows that cannot be trained as text: media they refer to (a field, or a placeholder in a message).
MEDIA_FIELDS = {"images": "has_images", "image": "has_images", "videos": "has_video", "video": "has_video",
                "audios": "has_audio", "audio": "has_audio"}
MEDIA_PLACEHOLDERS = {"<image>": "has_images", "<video>": "has_video", "<audio>": "has_audio"}
MEDIA_PARTS = {"image": "has_images", "image_url": "has_images", "input_image": "has_images",
               "video": "has_video", "video_url": "has_video", "audio": "has_audio", "input_audio": "has_audio"}
TEXT_PARTS = ("text", "input_text", "output_text")  # OpenAI's chat and Responses APIs
REASONING_PARTS = ("reasoning", "thinking")  # content parts that hold reasoning (keyed text, value, thinking, summary)
# An assistant message's reasoning: DeepSeek's and OpenAI-compatible APIs', some public sets', GPT-OSS's (Harmony).
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
# Whether an assistant turn is trained: OpenAI fine-tuning's `weight`, `loss_weight`, axolotl's `training`, `train`.
WEIGHT_FIELDS = ("weight", "loss_weight", "training", "train")
# A leading reasoning block in an answer: R1-style models' <think>, and the thought/solution markers of
# Bespoke-Stratos and OpenThoughts (whose answer then sits in solution markers, dropped with them).
THINK_OPENINGS = ("<think>", "<|begin_of_thought|>")
THINK_BLOCK = re.compile(r"\s*(?:<think>(.*?)</think>|<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>)\s*", re.DOTALL)
SOLUTION = re.compile(r"<\|begin_of_solution\|>(.*)<\|end_of_solution\|>\s*$", re.DOTALL)
THINK_STARTS = (*THINK_OPENINGS, " ", "\n", "\t")  # a quick test before the block is looked for
FORMAT_NAMES = {"openai": "openai messages", "sharegpt": "sharegpt conversations", "alpaca": "alpaca",
                "prompt_completion": "prompt/completion", "text": "text"}
HINTS = {"preference_pair": "chosen/rejected pairs need a preference-tuning recipe (DPO, ORPO); SFT cannot train them",
         "undesirable_answer": "rows labelled undesirable (label: false, KTO's layout) are answers to avoid: a "
                               "preference objective (KTO) learns from them; SFT would train them as good answers",
         "fractional_weight": "a turn's weight must be 0 (not trained) or 1 (trained): loraflow does not scale a "
                              "turn's loss, and does not round a weight",
         "partial_turn_weight": "content parts of one turn disagree on `train`: loraflow trains a turn whole or not "
                                "at all",
         "has_images": "multimodal rows need a vision-language model and its processor",
         "has_video": "multimodal rows need a video-language model and its processor",
         "has_audio": "multimodal rows need an audio-language model and its processor"}
# Control characters other than newline and tab (NUL and ESC among them) and the BOM.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
PUNCTUATION_TO_SPACE = str.maketrans(dict.fromkeys(string.punctuation, " "))
SPACES = re.compile(r"[ \t\u00a0]+")
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".csv", ".tsv")  # a header row names the columns
CONLL_SUFFIXES = (".conll",)  # a word per line, its tag in the last column, a blank line between sentences
ROW_SUFFIXES = (".json", ".jsonl", ".parquet", *TEXT_SUFFIXES, *TABLE_SUFFIXES, *CONLL_SUFFIXES)
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


def _text_documents(path: Path, data: bytes, split: str) -> Iterator[tuple[str, object]]:
    """A text file's documents: each non-empty line (as `datasets`' text loader), each blank-line separated
    paragraph, or the whole file. A document that is not UTF-8 is that document's reject."""

    def document(origin: str, raw: bytes) -> tuple[str, object]:
        try:
            return origin, {"text": raw.decode("utf-8-sig")}
        except UnicodeDecodeError:
            return origin, RowRejected("not_utf8")

    if split == "file":
        yield document(str(path), data)
        return
    lines = data.split(b"\n")
    if split == "line":
        yield from (document(f"{path}:{number}", line) for number, line in enumerate(lines, start=1) if line.strip())
        return
    start, paragraph = 0, []
    for number, line in enumerate([*lines, b""], start=1):
        if line.strip():
            start, paragraph = start or number, [*paragraph, line]
        elif paragraph:
            yield document(f"{path}:{start}", b"\n".join(paragraph))
            start, paragraph = 0, []


def _rows_of_file(path: Path, text_split: str) -> Iterator[tuple[str, object]]:
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
    if suffix in TEXT_SUFFIXES:
        yield from _text_documents(path, data, text_split)
    elif suffix in TABLE_SUFFIXES:
        yield from _table_rows(path, _decode(data, str(path)), "\t" if suffix == ".tsv" else ",")
    elif suffix in CONLL_SUFFIXES:
        yield from ((f"{path}:{line}", row) for line, row in conll_sentences(_decode(data, str(path))))
    elif suffix == ".jsonl":
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError:
                yield f"{path}:{number}", RowRejected("not_utf8")
            except (ValueError, RecursionError):  # broken JSON, a number past Python's digit limit, deep nesting
                yield f"{path}:{number}", RowRejected("invalid_json")
    else:
        try:
            rows = json.loads(_decode(data, str(path)))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        except (ValueError, RecursionError) as error:
            raise DataError(f"{path}: not readable as JSON ({type(error).__name__}: {error})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))


def _table_rows(path: Path, text: str, delimiter: str) -> Iterator[tuple[str, object]]:
    """CSV/TSV rows as dicts keyed by the header row; a row with more or fewer fields than the header is a reject."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: no header row naming the columns")
        for record in reader:
            origin = f"{path}:{reader.line_num}"
            if None in record or None in record.values():
                yield origin, RowRejected("wrong_field_count")
            else:
                yield origin, record
    except csv.Error as error:
        raise DataError(f"{path}: not readable as {'TSV' if delimiter == chr(9) else 'CSV'} ({error})") from None


def read_source(source: str, text_split: str = "line") -> Iterator[tuple[str, object]]:
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
            yield from _rows_of_file(file, text_split)
    else:
        yield from _rows_of_file(path, text_split)


def reads_text_files(source: str) -> bool:
    """Whether a source is (or holds) .txt/.md files, which `text_split` cuts into documents."""
    path = Path(source)
    files = _files_in(path) if path.is_dir() and not _is_saved_dataset(path) else [path] if path.is_file() else []
    return any(_suffix(file).removesuffix(".gz") in TEXT_SUFFIXES for file in files)


def check_readable(sources: list[str], text_split: str = "line") -> None:
    """Read every source through once, so a file that is unreadable as a whole stops a run before any work.

    Broken rows are not errors here (they are counted by clean); only whole-file problems raise DataError.
    """
    for source in sources:
        for _ in read_source(source, text_split):
            pass


def _part_text(part: dict, keys: tuple[str, ...]) -> str:
    for key in keys:
        if isinstance(part.get(key), str):
            return part[key]
    if part.get("type") == "reasoning" and isinstance(part.get("summary"), list):  # OpenAI Responses' reasoning item
        return "\n".join(item.get("text", "") for item in part["summary"] if isinstance(item, dict))
    raise RowRejected("wrong_type")


def _content_parts(content: list, features: set[str]) -> tuple[str, list[str], list[bool]]:
    """(text, reasoning texts, each part's `train` flag) of a message's content parts, in order: text parts keyed
    `text` or `value`, reasoning or thinking parts; media parts are their own rejects, other parts unsupported."""
    texts, reasoning, trained = [], [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise RowRejected(MEDIA_PARTS[kind])
        if kind in TEXT_PARTS:
            texts.append(_part_text(part, ("text", "value")))
            features.add("text parts keyed value" if "text" not in part else "content parts")
        elif kind in REASONING_PARTS:
            reasoning.append(_part_text(part, ("text", "value", kind)))
            features.add(f"{kind} parts")
        else:
            raise RowRejected("unsupported_content")
        flag = part.get("train", part.get("training"))
        if flag is not None:
            features.add("part train flags")
        trained.append(_weight(flag) == 1)
    return "\n".join(texts), reasoning, trained


def _weight(value: object) -> int:
    """A turn's weight as 0 or 1 (1 when unset); a fractional one is refused, never rounded."""
    if value is None:
        return 1
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, int | float) and 0 < value:
        raise RowRejected("fractional_weight")
    raise RowRejected("invalid_weight")


def _clean_text(text: object, data: DataConfig, values: dict[str, str]) -> str:
    if not isinstance(text, str):
        raise RowRejected("wrong_type")
    if data.normalize:
        text = unicodedata.normalize("NFC", CONTROL_CHARS.sub("", text))
        if "  " in text or "\t" in text or "\u00a0" in text:  # most text has nothing to collapse: skip the regex
            text = SPACES.sub(" ", text)
        if "\n" in text:  # most turns are one line: strip it without splitting
            text = "\n".join(line.strip() for line in text.split("\n"))
        text = text.strip()
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
    if "prompt" in row and "completion" in row:  # TRL's prompt-completion layout, strings or messages
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise RowRejected("unknown_format")


def _turns(row: dict, row_format: str) -> list[dict]:
    """The row's raw turns as OpenAI-shaped dicts (role, content, and tool_calls where the source has them)."""
    if row_format in ("openai", "sharegpt"):
        turns = row["messages"] if row_format == "openai" else row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RowRejected("wrong_type")
        if row_format == "openai":
            return turns
        return [{"role": t.get("from"), "content": t.get("value")} if len(t) == 2 else  # most turns: nothing else
                {key: value for key, value in t.items() if key not in ("from", "value")}
                | {"role": t.get("from"), "content": t.get("value")} for t in turns]
    if row_format == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        completion = [completion] if isinstance(completion, dict) else completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise RowRejected("wrong_type")
        turns = prompt + completion
        if not all(isinstance(t, dict) for t in turns):
            raise RowRejected("wrong_type")
        return turns
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list | tuple) and len(h) == 2 for h in history):
        raise RowRejected("wrong_type")
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    if not isinstance(prompt, str):
        raise RowRejected("wrong_type")
    turns = [("system", row["system"])] if row.get("system") else []
    for question, answer in history:
        turns += [("user", question), ("assistant", answer)]
    turns += [("user", prompt), ("assistant", row["output"])]
    return [{"role": role, "content": content} for role, content in turns]


def _json_value(value: object) -> object:
    """A JSON value given as itself or as a JSON string (tool arguments and tool lists come both ways)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise RowRejected("invalid_tool_call") from None
    return value


def _tool_calls(value: object) -> list[dict]:
    """Calls as OpenAI's `tool_calls`: [{"type": "function", "function": {"name", "arguments": {...}}}]; from
    OpenAI's own shape or ShareGPT's function_call value ({"name", "arguments"}, or a list of them)."""
    calls = _json_value(value)
    calls = calls if isinstance(calls, list) else [calls]
    normal = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RowRejected("invalid_tool_call")
        name, arguments = function.get("name"), _json_value(function.get("arguments", {}))
        if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
            raise RowRejected("invalid_tool_call")
        normal.append({"type": "function", "function": {"name": name.strip(), "arguments": arguments}})
    if not normal:
        raise RowRejected("invalid_tool_call")
    return normal


def _tools(value: object) -> list[dict]:
    """The row's tool list as OpenAI's `tools`: [{"type": "function", "function": {"name", ...}}]."""
    tools = _json_value(value)
    if not isinstance(tools, list):
        raise RowRejected("invalid_tools")
    normal = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowRejected("invalid_tools")
        normal.append({"type": "function", "function": function})
    return normal


def _message(turn: dict, data: DataConfig, values: dict[str, str], features: set[str]) -> dict:
    """One turn in the clean shape: role, content, and for an assistant turn its tool calls, its reasoning
    (`reasoning_content`) and `weight: 0` when it must not be trained."""
    role, content = turn.get("role"), turn.get("content")
    role = role.lower() if isinstance(role, str) else None
    if role in CALL_ROLES:  # ShareGPT's function_call turn: the assistant calling tools
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(content)}
    normal_role = ROLE_ALIASES.get(role)
    if normal_role is None:
        raise RowRejected("unknown_role")
    if normal_role == "tool" and isinstance(content, dict | list) and not _is_content_parts(content):
        content = json.dumps(content, ensure_ascii=False)  # a tool's structured result, as the text it returns
    reasoning, trained = (), ()
    if isinstance(content, list):
        content, reasoning, trained = _content_parts(content, features)
    if normal_role != "assistant":
        if reasoning:
            raise RowRejected("reasoning_not_from_assistant")
        return _plain_message(normal_role, content, data, values)
    weight = 1
    if len(turn) > 2:  # most turns hold a role and a content alone
        reasoning = list(reasoning)
        for field in REASONING_FIELDS:
            if turn.get(field) is not None:
                if not isinstance(turn[field], str):
                    raise RowRejected("wrong_type")
                reasoning.append(turn[field])
                features.add(field)
        field = next((field for field in WEIGHT_FIELDS if turn.get(field) is not None), None)
        if field:
            weight = _weight(turn[field])
            features.add(field)
    if isinstance(content, str) and content.startswith(THINK_STARTS) and content.lstrip().startswith(THINK_OPENINGS):
        block = THINK_BLOCK.match(content)
        if block is None:
            raise RowRejected("unclosed_think")
        think, thought = block.groups()
        reasoning = [*reasoning, think if think is not None else thought]
        content = content[block.end():]
        solution = SOLUTION.match(content)
        content = solution.group(1) if solution else content
        features.add("<think> block" if think is not None else "begin_of_thought block")
    if trained:
        if len(set(trained)) > 1:
            raise RowRejected("partial_turn_weight")
        weight = min(weight, int(trained[0]))
    calls = _tool_calls(turn["tool_calls"]) if turn.get("tool_calls") else None
    message = {"role": "assistant", "content": ""} if calls and not content else _plain_message(
        "assistant", content, data, values)
    if calls:
        message["tool_calls"] = calls
    if reasoning and any(part.strip() for part in reasoning):
        message["reasoning_content"] = _clean_text("\n".join(part for part in reasoning if part.strip()), data, values)
    if weight == 0:
        message["weight"] = 0
    return message


def _plain_message(role: str, content: object, data: DataConfig, values: dict[str, str]) -> dict:
    text = _clean_text(content, data, values)
    if role != "tool" and "<" in text:
        for placeholder, reason in MEDIA_PLACEHOLDERS.items():
            if placeholder in text:
                raise RowRejected(reason)
    return {"role": role, "content": text}


def _is_content_parts(content: object) -> bool:
    return isinstance(content, list) and all(isinstance(part, dict) and "type" in part for part in content)


def normalise_row(raw: object, data: DataConfig, values: dict[str, str], task: str = "causal_lm") -> tuple[str, dict]:
    """(format, clean row) for one raw row, or RowRejected with the reason code."""
    if isinstance(raw, RowRejected):
        raise raw
    if not isinstance(raw, dict):
        raise RowRejected("not_an_object")
    row = dict(raw)
    for ours, theirs in data.columns.items():  # LLaMA-Factory-style mapping of odd field names
        if theirs in row:
            row[ours] = row.pop(theirs)
    if task != "causal_lm":
        return _labelled_row(row, task, data, values)
    if not row.keys().isdisjoint(MEDIA_FIELDS):
        for field, reason in MEDIA_FIELDS.items():
            if row.get(field):
                raise RowRejected(reason)
    if "chosen" in row and "rejected" in row:
        raise RowRejected("preference_pair")
    features: set[str] = set()
    if row.get("label") is not None:  # KTO's unpaired layout: is this row's answer desirable?
        if row["label"] is False or str(row["label"]).strip().lower() == "false":
            raise RowRejected("undesirable_answer")
        features.add("label")
    row_format = detect_format(row)
    if data.format != "auto" and row_format != data.format:
        raise RowRejected("wrong_format")
    if row_format == "text":
        return row_format, {"text": _clean_text(row["text"], data, values)}  # documents: no length limit
    turns = _turns(row, row_format)
    if row_format == "alpaca":  # the output's reasoning in a column of its own
        turns[-1] |= {field: row[field] for field in REASONING_FIELDS if field in row}
    elif row.get("system") and not (turns and isinstance(turns[0], dict) and turns[0].get("role") == "system"):
        turns = [{"role": "system", "content": row["system"]}, *turns]  # a system column (LLaMA-Factory, OpenThoughts)
        features.add("system column")
    messages = []
    for turn in turns:
        message = _message(turn, data, values, features)
        answers_a_call = messages and ("tool_calls" in messages[-1] or messages[-1]["role"] == "tool")
        if message["role"] == "tool" and not answers_a_call:
            raise RowRejected("orphan_tool_result")
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected("no_assistant_turn")
    if messages[-1]["role"] != "assistant":
        raise RowRejected("ends_on_user_turn")
    if features and all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise RowRejected("no_trained_turn")
    clean = {"messages": messages} | ({"tools": _tools(row["tools"])} if row.get("tools") else {})
    if len(_plain_text(clean)) > data.max_chars:
        raise RowRejected("too_long")
    return row_format + (" with " + ", ".join(sorted(features)) if features else ""), clean


def _labelled_row(row: dict, task: str, data: DataConfig, values: dict[str, str]) -> tuple[str, dict]:
    """A task head's row: a text and its label (classification), or words and their tags (token classification)."""
    try:
        if task == "token_classification":
            return "tokens", token_row(row, data.label_names)
        if row.get("text") is None:
            raise RowRejected("no_text")
        if row.get("label") is None:
            raise RowRejected("no_label")
        label = label_name(row["label"], data.label_names)
    except LabelRejected as rejected:
        raise RowRejected(str(rejected)) from None
    text = _clean_text(row["text"], data, values)
    if len(text) > data.max_chars:
        raise RowRejected("too_long")
    return "classification", {"text": text, "label": label}


def _plain_text(row: dict) -> str:
    if "tokens" in row:
        return " ".join(row["tokens"])
    if "text" in row:
        return row["text"]
    return "\n".join([m["content"] if len(m) == 2 else _message_text(m) for m in row["messages"]])


def _message_text(message: dict) -> str:
    """What a message with more than a role and content says: its reasoning, content and tool calls."""
    calls = json.dumps(message["tool_calls"]) if "tool_calls" in message else ""
    return "\n".join(part for part in (message.get("reasoning_content"), message["content"] + calls) if part)


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
                near: NearDuplicates | None, task: str
                ) -> Iterator[tuple[str, object, str, dict | RowRejected, tuple[str, str], np.ndarray | None]]:
    """(origin, raw, format, clean row or its rejection, (its JSON line, that line's hash), near-duplicate signature)
    for each pair, in order. Clean rows are built with a fixed key order, so the JSON line is canonical: the line
    written out, and its hash the duplicate key.

    Rows are taken a chunk at a time so that the signatures of a chunk are computed together.
    """
    chunk, chars = [], 0
    for origin, raw in pairs:
        line = ""
        try:
            row_format, row = normalise_row(raw, data, values, task)
            line = json.dumps(row, ensure_ascii=False)
            key = hashlib.sha256(line.encode()).hexdigest()  # a lone surrogate (JSON's \ud800) fails here
            chars += len(_plain_text(row))
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
    signatures = iter(near.signatures([_plain_text(r) for r in clean_rows]) if near and clean_rows else ())
    for origin, raw, row_format, row, line_key in chunk:
        yield origin, raw, row_format, row, line_key, None if isinstance(row, RowRejected) else next(signatures, None)


def _write_lines(path: Path, lines: list[str]) -> None:
    """Written beside the target and renamed into place, so a failed run leaves no half-written file."""
    staging = path.with_suffix(".partial")
    # backslashreplace: a rejected row's lone surrogate is written as its JSON escape, still valid JSON.
    staging.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="backslashreplace")
    staging.replace(path)


def _reject_line(reject: dict) -> str:
    try:
        return json.dumps(reject, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # a raw row too deep or odd to write back: its origin says where it is
        return json.dumps(reject | {"row": None}, ensure_ascii=False)


def clean(data: DataConfig, ctx: RunContext, *, values: dict[str, str] | None = None, task: str = "causal_lm"
          ) -> CleanResult:
    """Read the train and eval sources into clean JSONL files (under ctx.work_dir/clean) plus rejects and a
    per-source report; `values` fill the identity placeholders of the builtin data.

    The held-out rows stay fixed as training data grows: eval sources are read first, and a train row that
    duplicates or nearly duplicates a held-out row is the one dropped (`in_eval`). With `eval_fraction`, a row the
    split holds out evicts the train rows already kept that it nearly duplicates.
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
                    turns = [m for m in row["messages"] if len(m) > 2]
                    documents[source].update(reasoning_rows=any("reasoning_content" in m for m in turns),
                                             untrained_turns=sum(m.get("weight") == 0 for m in turns))
    labels = _held_out_labels_seen_in_training(kept, kept_from, reject, counts) if task != "causal_lm" else None
    report = {
        source: {"format": "+".join(sorted({f.split(" with ")[0] for f in formats[source]})) or "none",
                 "read": counts[source].pop("read", 0), "kept": counts[source].pop("kept", 0),
                 "rejected": dict(sorted((reason, n) for reason, n in counts[source].items() if n))}
        | _layouts(source, data.text_split, formats[source], documents[source])
        for source in [*data.train, *data.eval]
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = {split: [line for line in rows if line is not None] for split, rows in kept.items()}
    paths = {split: out_dir / f"{split}.jsonl" for split in lines}
    for split, split_lines in lines.items():
        _write_lines(paths[split], split_lines)
    rejects_path = out_dir / "rejects.jsonl"
    _write_lines(rejects_path, [_reject_line(r) for r in rejects])
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
        summary |= _label_report(labels, data.min_class_rows)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return CleanResult(
        train_path=paths["train"], eval_path=paths["eval"], rejects_path=rejects_path, report_path=report_path,
        train_rows=len(lines["train"]), eval_rows=len(lines["eval"]), rejected_rows=len(rejects), data_hash=data_hash,
        eval_hash=eval_hash, labels=tuple(label_order(set(labels["train"]))) if labels is not None else (), task=task,
    )


def _held_out_labels_seen_in_training(kept: dict[str, list[str | None]], kept_from: dict[str, list[tuple[str, str]]],
                                      reject, counts: dict[str, Counter]) -> dict[str, Counter]:
    """Drop held-out rows with a label (or tag) no train row has, which no head trained on this data can predict;
    the label counts of each split that remain."""
    labels = {"train": Counter(), "eval": Counter()}
    for line in kept["train"]:
        if line is not None:
            labels["train"].update(row_labels(json.loads(line)))
    for index, line in enumerate(kept["eval"]):
        row = json.loads(line)
        if set(row_labels(row)) - labels["train"].keys():
            source, origin = kept_from["eval"][index]
            kept["eval"][index] = None
            counts[source]["kept"] -= 1
            reject(source, origin, "unseen_label", row)
        else:
            labels["eval"].update(row_labels(row))
    return labels


def _label_report(labels: dict[str, Counter], min_class_rows: int) -> dict:
    """Per-class counts in each split, and a warning for each class with fewer train examples than `min_class_rows`."""
    order = label_order(set(labels["train"]))
    return {
        "labels": {label: {"train": labels["train"][label], "eval": labels["eval"][label]} for label in order},
        "warnings": [f"class {label}: {labels['train'][label]} train examples, fewer than data.min_class_rows "
                     f"({min_class_rows})" for label in order if labels["train"][label] < min_class_rows],
    }


def _layouts(source: str, text_split: str, formats: Counter, documents: Counter) -> dict:
    """How a source was read, in words, where that is more than its format: how its text was cut into documents,
    and the layouts of rows that say more than roles and contents (reasoning, weights, content parts, labels), with
    the rows that carry reasoning and the turns left untrained. A source read in a way the user did not mean shows
    at once."""
    layouts = {}
    if documents["documents"]:
        how = f"split by {text_split}" if reads_text_files(source) else "a `text` field per row"
        layouts["layout"] = f"text, {how}: {documents['documents']} documents, {documents['characters']} characters"
    detailed = {FORMAT_NAMES[f.split(" with ")[0]] + f[f.index(" with "):]: n
                for f, n in formats.items() if " with " in f}
    if detailed:
        layouts["layouts"] = dict(sorted(detailed.items()))
        layouts |= {key: documents[key] for key in ("reasoning_rows", "untrained_turns") if documents[key]}
    return layouts

