"""Labelled rows for task heads (text classification, token classification such as NER): their shape, their label
sets, and the words and entity spans of raw text. Shared by clean, tokenize, evaluate and the served head model.

A classification row is `{"text": str, "label": str}`; a token row is `{"tokens": [str], "tags": [str]}` with one
IOB2 tag per word (O, B-TYPE, I-TYPE), the scheme seqeval's strict mode scores. Integer labels and tags (as Hugging
Face data sets store them) become names through `data.label_names`, or stay numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IOB2_TAG = re.compile(r"O|[BI]-\S+")
WORD = re.compile(r"\w+(?:['’\-.]\w+)*|[^\w\s]")  # words and single punctuation marks, as CoNLL tokenises
TAG_FIELDS = ("tags", "ner_tags")


HEAD_TASKS = ("sequence_classification", "token_classification")  # a new output layer on the base model


@dataclass(frozen=True)
class Head:
    """A task head: its task and label names in id order (and the pad token id the model needs to find each text's
    last token). Saved beside the tuned weights as head.json, so every loader knows the head's shape."""

    task: str
    labels: tuple[str, ...]
    pad_token_id: int | None = None

    FILE = "head.json"

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: number for number, label in enumerate(self.labels)}

    def save(self, folder: Path) -> None:
        (folder / self.FILE).write_text(json.dumps({"task": self.task, "labels": list(self.labels),
                                                    "pad_token_id": self.pad_token_id}) + "\n", encoding="utf-8")

    @classmethod
    def of(cls, folder: Path) -> Head | None:
        """The head saved in a weights folder; None for a causal LM's weights."""
        path = Path(folder) / cls.FILE
        if not path.exists():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(saved["task"], tuple(saved["labels"]), saved.get("pad_token_id"))


class LabelRejected(ValueError):
    """A labelled row that cannot be used; its message is the reason code."""


def label_name(value: object, label_names: list[str]) -> str:
    """A label or tag as its name: a string as given, a number through `label_names` (or as itself without them)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LabelRejected("invalid_label")
    text = str(value).strip()
    if label_names and text.isdigit():
        if int(text) >= len(label_names):
            raise LabelRejected("invalid_label")
        return label_names[int(text)]
    if not text:
        raise LabelRejected("no_label")
    return text


def token_row(row: dict, label_names: list[str]) -> dict:
    """`{"tokens", "tags"}` from a row with tokens and tags (or ner_tags) of the same length, tags in IOB2."""
    tokens = row.get("tokens")
    tags = next((row[field] for field in TAG_FIELDS if row.get(field) is not None), None)
    if not isinstance(tokens, list) or not tokens:
        raise LabelRejected("no_tokens")
    if not isinstance(tags, list):
        raise LabelRejected("no_tags")
    if len(tags) != len(tokens):
        raise LabelRejected("tags_mismatch")
    if not all(isinstance(token, str) and token.strip() and not any(c.isspace() for c in token) for token in tokens):
        raise LabelRejected("invalid_token")
    names = [label_name(tag, label_names) for tag in tags]
    if not all(IOB2_TAG.fullmatch(tag) for tag in names):
        raise LabelRejected("invalid_tag")
    return {"tokens": tokens, "tags": names}


def conll_sentences(text: str) -> Iterator[tuple[int, dict]]:
    """(line number, `{"tokens", "tags"}`) for each sentence of a CoNLL file: the word in the first column, its tag in
    the last; -DOCSTART- lines and blank lines end a sentence. A line with one column gives an empty tag, which
    rejects its sentence."""
    tokens, tags, start = [], [], 0
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                yield start, {"tokens": tokens, "tags": tags}
            tokens, tags = [], []
            continue
        start = start if tokens else number
        tokens.append(fields[0])
        tags.append(fields[-1] if len(fields) > 1 else "")


def row_labels(row: dict) -> list[str]:
    """The labels a clean row uses: its label, or its tags."""
    return [row["label"]] if "label" in row else row["tags"]


def label_order(labels: set[str]) -> list[str]:
    """A stable id order: numbers by value; tags with O first, then by entity type, B before I; else by name."""
    if all(label.isdigit() for label in labels):
        return sorted(labels, key=int)
    if all(IOB2_TAG.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda tag: (tag != "O", tag[2:], tag[:1]))
    return sorted(labels)


def words_of(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) for each word and punctuation mark of raw text, with character offsets."""
    return [(match.group(), match.start(), match.end()) for match in WORD.finditer(text)]


def joined_words(words: list[str]) -> tuple[str, list[tuple[str, int, int]]]:
    """Pre-split words as the text a model reads (joined by single spaces), with each word's character span."""
    spans, start = [], 0
    for word in words:
        spans.append((word, start, start + len(word)))
        start += len(word) + 1
    return " ".join(words), spans


def word_of_each_token(offsets: list[tuple[int, int]], words: list[tuple[str, int, int]], text: str
                       ) -> list[int | None]:
    """The word each token starts in, from the tokenizer's character offsets into `text` (a token's own leading space
    skipped; None: a special or padding token, or only spaces). Hand-written: a fast tokenizer's `word_ids` for
    pre-split input needs `add_prefix_space`, which not every tokenizer honours (SmolLM2's drops it in transformers 5
    and reads the words glued together)."""
    owners, word = [], 0
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        if start == end:
            owners.append(None)
            continue
        while word < len(words) and words[word][2] <= start:
            word += 1
        owners.append(word if word < len(words) and words[word][1] <= start < words[word][2] else None)
    return owners


def entity_spans(words: list[tuple[str, int, int]], tags: list[str], scores: list[float], text: str) -> list[dict]:
    """Entities from per-word IOB2 tags, with character offsets into `text` and the mean score of their words.
    An I- tag that does not continue an entity of its type starts one (as seqeval reads predictions leniently)."""
    spans: list[dict] = []
    current: dict | None = None
    for (_, start, end), tag, score in zip(words, tags, scores):
        if tag == "O":
            current = None
        elif tag.startswith("I-") and current is not None and current["entity"] == tag[2:]:
            current["end"] = end
            current["scores"].append(score)
        else:
            current = {"entity": tag[2:], "start": start, "end": end, "scores": [score]}
            spans.append(current)
    return [{"entity": span["entity"], "text": text[span["start"] : span["end"]], "start": span["start"],
             "end": span["end"], "score": round(sum(span["scores"]) / len(span["scores"]), 4)} for span in spans]
