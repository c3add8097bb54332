"""Reading sources row by row: JSON, JSONL, Parquet, text, CSV/TSV and CoNLL files (gzipped too), folders of them,
folders saved by `datasets`, and the builtin sets.

Files are parsed row by row here rather than through `datasets.load_dataset`, which stops at the first broken
row: a broken row must be counted and rejected, never fatal. Parquet and saved `datasets` folders are read
with pyarrow / `datasets` themselves. A source that cannot be read at all is one DataError line naming it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from conf.schema import UserError
from tasks.builtin_data import BUILTIN_SOURCES, check_builtin
from tasks.labels import conll_sentences


TEXT_SUFFIXES = (".txt", ".md")


TABLE_SUFFIXES = (".csv", ".tsv")  # a header row names the columns


CONLL_SUFFIXES = (".conll",)  # a word per line, its tag in the last column, a blank line between sentences


ROW_SUFFIXES = (".json", ".jsonl", ".parquet", *TEXT_SUFFIXES, *TABLE_SUFFIXES, *CONLL_SUFFIXES)


SUPPORTED_SUFFIXES = ROW_SUFFIXES + tuple(s + ".gz" for s in ROW_SUFFIXES if s != ".parquet")


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
        check_builtin(source.removeprefix("builtin:"))
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
