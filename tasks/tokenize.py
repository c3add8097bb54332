"""Stage 2, tokenize: render conversations with the tokenizer's own chat template, loss on assistant turns only.

Most chat templates carry no `{% generation %}` markers, and then Hugging Face's `return_assistant_tokens_mask`
is silently all ones; so the assistant spans are derived here from the rendered text itself (hand-written
because no library provides it for arbitrary templates): render the conversation up to each assistant turn
with the generation prompt, render it again with the turn, and the difference is what the model must learn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tasks.tracking import log_metrics

IGNORE_INDEX = -100


class SampleRejected(ValueError):
    """A conversation that cannot be trained; its message is the reason code."""


@dataclass(frozen=True)
class TokenizedData:
    train_dir: Path
    eval_dir: Path
    train_samples: int
    eval_samples: int
    train_tokens: int
    rejected: dict[str, int]


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant turn (content plus its end-of-turn marker)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(prompt) and text.startswith(upto) and len(upto) > len(prompt)):
            raise SampleRejected("template_not_prefix_stable")
        # Trailing whitespace after the end-of-turn marker is the template's separator, not the answer.
        spans.append((len(prompt), len(upto.rstrip())))
    return text, spans


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int) -> dict:
    """input_ids and labels (IGNORE_INDEX outside assistant spans) for one conversation."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if len(ids) > max_length:
        raise SampleRejected("too_long")
    labels = [
        token if any(start <= begin and end <= stop for start, stop in spans) and end > begin else IGNORE_INDEX
        for token, (begin, end) in zip(ids, encoded["offset_mapping"])
    ]
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleRejected("no_trained_tokens")
    return {"input_ids": ids, "labels": labels}


def _encode_file(tokenizer, path: Path, max_length: int, rejected: dict[str, int]) -> list[dict]:
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        try:
            if "messages" not in row:
                raise SampleRejected("not_a_conversation")
            samples.append(encode_conversation(tokenizer, row["messages"], max_length))
        except SampleRejected as reason:
            rejected[str(reason)] = rejected.get(str(reason), 0) + 1
    return samples


def tokenize(train_path: Path, eval_path: Path, model_dir: str, max_length: int, out_dir: Path) -> TokenizedData:
    """Tokenize cleaned train/eval conversations into `datasets` folders of input_ids and labels."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rejected: dict[str, int] = {}
    train = _encode_file(tokenizer, train_path, max_length, rejected)
    evaluation = _encode_file(tokenizer, eval_path, max_length, rejected)
    if not train or not evaluation:
        raise SampleRejected(f"no trainable samples after tokenizing (rejected: {rejected})")
    dirs = {"train": out_dir / "train", "eval": out_dir / "eval"}
    Dataset.from_list(train).save_to_disk(dirs["train"])
    Dataset.from_list(evaluation).save_to_disk(dirs["eval"])
    return TokenizedData(
        train_dir=dirs["train"], eval_dir=dirs["eval"], train_samples=len(train), eval_samples=len(evaluation),
        train_tokens=sum(len(s["input_ids"]) for s in train), rejected=rejected,
    )


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_task(
    train_path: Path, eval_path: Path, model_dir: str, max_length: int, out_dir: Path, run_id: str
) -> TokenizedData:
    """tokenize(), with sample and token counts logged to the flow's MLflow run."""
    result = tokenize(train_path, eval_path, model_dir, max_length, out_dir)
    log_metrics(
        run_id,
        {"tokenize_train_samples": result.train_samples, "tokenize_eval_samples": result.eval_samples,
         "tokenize_train_tokens": result.train_tokens}
        | {f"tokenize_rejected_{reason}": count for reason, count in result.rejected.items()},
    )
    return result
