"""What the clean stage writes beside the rows: rejects with their reasons and origins, and report.json (per source
counts, layouts, label counts, hints for the rejects a user can act on)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tasks.clean.readers import reads_text_files
from tasks.labels import label_order, row_labels


FORMAT_NAMES = {"openai": "openai messages", "sharegpt": "sharegpt conversations", "alpaca": "alpaca",
                "prompt_completion": "prompt/completion", "text": "text"}


HINTS = {"preference_pair": "chosen/rejected pairs need a preference objective (train.objective: dpo, kto, orpo or "
                            "simpo); SFT cannot train them",
         "undesirable_answer": "rows labelled undesirable (label: false, KTO's layout) are answers to avoid: "
                               "train.objective kto learns from them; SFT would train them as good answers",
         "unpaired_preference": "rows with one answer and a label are KTO's layout: train.objective kto trains them; "
                                "dpo needs chosen/rejected pairs",
         "not_a_preference": "a preference objective (train.objective dpo, kto, orpo, simpo) trains chosen/rejected "
                             "pairs or labelled answers; plain conversations are SFT's (train them first, or with "
                             "train.init_adapter)",
         "identical_pair": "the chosen and rejected answers are the same: nothing to prefer",
         "no_prompt": "a preference row needs a prompt: a prompt, instruction, conversations or messages field (map "
                      "another name with data.columns, e.g. {instruction: question}), or whole conversations as "
                      "chosen and rejected",
         "ends_on_assistant_turn": "the conversation before chosen/rejected already ends on an answer: the pair's "
                                   "answers must follow a user (or tool) turn",
         "prompts_differ": "the chosen and rejected conversations differ before the answer: a pair answers one prompt",
         "fractional_weight": "a turn's weight must be 0 (not trained) or 1 (trained): loraflow does not scale a "
                              "turn's loss, and does not round a weight",
         "partial_turn_weight": "content parts of one turn disagree on `train`: loraflow trains a turn whole or not "
                                "at all",
         "has_images": "multimodal rows need a vision-language model and its processor",
         "has_video": "multimodal rows need a video-language model and its processor",
         "has_audio": "multimodal rows need an audio-language model and its processor"}


def write_lines(path: Path, lines: list[str]) -> None:
    """Written beside the target and renamed into place, so a failed run leaves no half-written file."""
    staging = path.with_suffix(".partial")
    # backslashreplace: a rejected row's lone surrogate is written as its JSON escape, still valid JSON.
    staging.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="backslashreplace")
    staging.replace(path)


def reject_line(reject: dict) -> str:
    try:
        return json.dumps(reject, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # a raw row too deep or odd to write back: its origin says where it is
        return json.dumps(reject | {"row": None}, ensure_ascii=False)


def held_out_labels_seen_in_training(kept: dict[str, list[str | None]], kept_from: dict[str, list[tuple[str, str]]],
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


def label_report(labels: dict[str, Counter], min_class_rows: int) -> dict:
    """Per-class counts in each split, and a warning for each class with fewer train examples than `min_class_rows`."""
    order = label_order(set(labels["train"]))
    return {
        "labels": {label: {"train": labels["train"][label], "eval": labels["eval"][label]} for label in order},
        "warnings": [f"class {label}: {labels['train'][label]} train examples, fewer than data.min_class_rows "
                     f"({min_class_rows})" for label in order if labels["train"][label] < min_class_rows],
    }


def source_layouts(source: str, text_split: str, formats: Counter, documents: Counter) -> dict:
    """How a source was read, in words, where that is more than its format: how its text was cut into documents,
    and the layouts of rows that say more than roles and contents (reasoning, weights, content parts, labels), with
    the rows that carry reasoning and the turns left untrained. A source read in a way the user did not mean shows
    at once."""
    layouts = {}
    if documents["documents"]:
        how = f"split by {text_split}" if reads_text_files(source) else "a `text` field per row"
        layouts["layout"] = f"text, {how}: {documents['documents']} documents, {documents['characters']} characters"
    detailed = {FORMAT_NAMES.get(f.split(" with ")[0], f.split(" with ")[0]) + f[f.index(" with "):]: n
                for f, n in formats.items() if " with " in f}
    if detailed:
        layouts["layouts"] = dict(sorted(detailed.items()))
        layouts |= {key: documents[key] for key in ("reasoning_rows", "untrained_turns") if documents[key]}
    return layouts
