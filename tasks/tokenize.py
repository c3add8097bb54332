"""Stage 2, tokenize: clean rows into training samples, cached by content.

Chat mode renders each conversation with a chat template (the tokenizer's own, or a built-in one). Most templates
carry no `{% generation %}` markers, and then Hugging Face's `return_assistant_tokens_mask` is silently all
ones; so the assistant spans are derived here from the rendered text itself (hand-written because no library
provides it for arbitrary templates): render the conversation up to each assistant turn with the generation
prompt, render it again with the turn, and the difference is what the model must learn.

Text inside messages is data, never control: where it contains a control token's spelling (`<|im_start|>`,
`</s>` ...), the conversation is tokenized piece by piece, the template's pieces as usual and the messages
with special-token splitting, so data cannot forge a turn.

Task heads tokenize a labelled text (its label id is the sample's label) or a sentence's words, labelled the
standard way for token classification: each word's tag on its first sub-token, -100 on the rest and on special
tokens (Hugging Face's token-classification recipe). The words are read as the text they make, joined by spaces,
and each token is given to its word by its character offsets. Head samples are not packed.

Preference rows (DPO's pairs, KTO's labelled answers) render each answer after its prompt as SFT renders the whole
conversation: the prompt's ids are the template's up to the answer's first turn, generation prompt included, and an
answer's ids run through its end-of-turn marker (tool calls and reasoning as in SFT).

Pretrain mode joins documents with EOS and cuts the stream into blocks. Packing (TRL's best-fit-decreasing
`pack_dataset`) puts chat samples into rows of `max_length`; the train stage's padding-free collator restarts
`position_ids` per sample so attention stays inside each one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from itertools import groupby
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import pack_dataset

from conf.schema import TokenizeConfig, UserError
from tasks.chat_templates import CHAT_TEMPLATES, for_template
from tasks.context import RunContext
from tasks.labels import HEAD_TASKS, joined_words, word_of_each_token
from tasks.reasoning import FIELD as REASONING_FIELD, Reasoning, template_field
from tasks.results import PREFERENCE_KINDS, UNPAIRED_PREFERENCE, CleanResult, TokenizedData

IGNORE_INDEX = -100
CACHE_FORMAT = 4  # bump when the samples this module writes change for the same inputs
TOKEN_SHAPING_PACKAGES = ("tokenizers", "transformers", "trl", "datasets")
_DATA_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: stand-ins for message contents


class TemplateError(UserError):
    """The recipe's chat template cannot be used with this tokenizer; one line for the user."""


class SampleRejected(ValueError):
    """A row that cannot be trained; its message is the reason code."""


def load_tokenizer(model_dir: str, chat_template: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with the recipe's built-in chat template set when one is named ("none": as it is)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as error:  # not on disk and no hub to fetch it from, or not a tokenizer folder
        raise UserError(f"base_model {model_dir}: cannot load its tokenizer ({str(error).splitlines()[0]})") from None
    if chat_template == "none":
        return tokenizer
    if chat_template == "tokenizer":
        if not tokenizer.chat_template:
            raise TemplateError(
                f"tokenize.chat_template: the tokenizer of {model_dir} has no chat template; "
                f"name a built-in one ({', '.join(CHAT_TEMPLATES)})"
            )
        return tokenizer
    template = CHAT_TEMPLATES[chat_template]
    missing = [t for t in template.control_tokens if t not in tokenizer.get_added_vocab()]
    if missing:
        raise TemplateError(
            f"tokenize.chat_template: {chat_template} needs the control tokens {', '.join(missing)}, "
            f"which the tokenizer of {model_dir} does not have"
        )
    tokenizer.chat_template = template.jinja
    return tokenizer


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None
                    ) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered text and, for each assistant turn, (its message index, start, end): the characters of its
    reasoning, content, tool calls and end-of-turn marker as the whole conversation renders them. Tool results and
    the tool list are not assistant turns: no span covers them."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tools=tools, tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: index + 1], tools=tools, tokenize=False)
        if not (text.startswith(prompt) and len(upto) > len(prompt)):
            raise SampleRejected("template_not_prefix_stable")
        # Trailing whitespace after the end-of-turn marker is the template's separator, not the answer.
        end = len(upto.rstrip()) if text.startswith(upto) else _end_with_turns_after(text, prompt, upto, message)
        spans.append((index, len(prompt), end))
    return text, spans


def _end_with_turns_after(text: str, prompt: str, upto: str, message: dict) -> int:
    """Where a turn ends in the whole conversation when, as the last turn, it renders otherwise: templates such as
    Qwen3's show reasoning on the turns after the last user message only. It ends after its content and what closes
    it (tool calls, the end-of-turn marker), as its rendering as the last turn closes it."""
    content = message["content"]
    closing = upto[upto.rfind(content) + len(content):].rstrip() if content else ""
    at = text.find(content + closing, len(prompt)) if content else -1
    if at < 0:
        raise SampleRejected("template_not_prefix_stable")
    return at + len(content) + len(closing)


class ChatEncoder:
    """Conversations to input_ids and labels, as a TokenizeConfig says."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.control_spellings = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
        self.reasoning = Reasoning(config.reasoning, config.reasoning_format, template_field(tokenizer.chat_template))
        self.reasoning_counts: Counter = Counter()  # of the conversations encoded: turns with reasoning, and so on

    def pieces(self, messages: list[dict], tools: list[dict] | None, text: str) -> list[tuple[str, bool]]:
        """The rendered text as (piece, is_message_data) pairs, found by rendering stand-ins for the contents and
        the reasoning (what a reasoning format writes around it is the template's text, not data)."""
        data, stand_ins = [], []
        for message in messages:
            stand_in = dict(message)
            for key in ("content", REASONING_FIELD):
                if key in message:
                    stand_in[key] = f"\ue000{len(data)}\ue001"
                    data.append(message[key])
            stand_ins.append(self.reasoning.for_template(stand_in))
        parts = _DATA_MARK.split(self.tokenizer.apply_chat_template(stand_ins, tools=tools, tokenize=False))
        pieces = [(part, False) if n % 2 == 0 else (data[int(part)], True) for n, part in enumerate(parts)]
        if "".join(piece for piece, _ in pieces) != text:
            raise SampleRejected("template_alters_content")
        return [(piece, is_content) for piece, is_content in pieces if piece]

    def trained_spans(self, messages: list[dict], text: str, spans: list[tuple[int, int, int]], counts: Counter
                      ) -> list[tuple[int, int]]:
        """The character spans that carry loss: each assistant turn not weighted 0, without its reasoning under
        `reasoning: mask` (the reasoning a template leaves out of earlier turns is counted, not trained)."""
        trained = []
        for index, start, end in spans:
            message = messages[index]
            reasoning = message.get(REASONING_FIELD)
            if reasoning is not None:
                counts["turns"] += 1
                at = -1 if self.reasoning.mode == "drop" else text.find(reasoning, start, end)
                counts["dropped" if self.reasoning.mode == "drop" else "not_rendered" if at < 0 else "rendered"] += 1
                if at >= 0 and self.reasoning.mode == "mask":
                    answer = text.rfind(message["content"], at + len(reasoning), end) if message["content"] else -1
                    start = answer if answer >= 0 else at + len(reasoning)
            if message.get("weight", 1) != 0:
                trained.append((start, end))
        return trained[-1:] if self.config.loss_on == "last_assistant" else trained

    def render(self, messages: list[dict], tools: list[dict] | None
               ) -> tuple[list[dict], list[dict] | None, str, list[tuple[int, int, int]]]:
        """(messages, tools) as the template takes them (tasks/chat_templates.for_template), the rendered text and
        each assistant turn's (message index, start, end) in it, reasoning rendered as the config says."""
        messages, tools = for_template(messages, tools, self.tokenizer.chat_template, self.config.tool_format)
        text, spans = assistant_spans(self.tokenizer, [self.reasoning.for_template(m) for m in messages], tools)
        return messages, tools, text, spans

    def ids_and_offsets(self, messages: list[dict], tools: list[dict] | None, text: str
                        ) -> tuple[list[int], list[tuple[int, int]]]:
        """The rendered text's token ids and their character offsets; message text that spells a control token is
        tokenized as data, never as that token."""
        forged = any(spelling in m["content"] or spelling in m.get(REASONING_FIELD, "")
                     for m in messages for spelling in self.control_spellings)
        ids, offsets, start = [], [], 0
        for piece, is_content in self.pieces(messages, tools, text) if forged else [(text, False)]:
            encoded = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True,
                                     split_special_tokens=is_content)
            ids += encoded["input_ids"]
            offsets += [(start + begin, start + end) for begin, end in encoded["offset_mapping"]]
            start += len(piece)
        return ids, offsets

    def encode_answer(self, prompt: list[dict], answer: list[dict], tools: list[dict] | None = None
                      ) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of a prompt and one answer to it (a preference pair's side): the conversation
        rendered whole as SFT renders it, the prompt up to where the answer's first assistant turn starts (the
        generation prompt included), the answer through its last turn's end-of-turn marker."""
        messages, tools, text, spans = self.render(prompt + answer, tools)
        first = len(messages) - len(answer)  # Hermes tool rendering may put a system turn in front: count from the end
        start = next(begin for index, begin, _ in spans if index >= first)
        end = spans[-1][2]
        ids, offsets = self.ids_and_offsets(messages, tools, text)
        cut = next((n for n, (begin, _) in enumerate(offsets) if begin >= start), len(ids))
        if any(begin < start < finish for begin, finish in offsets):
            raise SampleRejected("template_not_prefix_stable")  # a token spans the prompt's end and the answer
        stop = next((n for n, (begin, _) in enumerate(offsets) if begin >= end), len(ids))
        return ids[:cut], ids[cut:stop]

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[dict, bool]:
        """({input_ids, labels}, truncated) for one conversation (with the tools it may call); labels are
        IGNORE_INDEX where no loss."""
        messages, tools, text, spans = self.render(messages, tools)
        counts = Counter()
        spans = self.trained_spans(messages, text, spans, counts)
        ids, offsets = self.ids_and_offsets(messages, tools, text)
        if self.config.loss_on == "all":
            labels = list(ids)
        else:
            labels = [
                token if end > begin and any(lo <= begin and end <= hi for lo, hi in spans) else IGNORE_INDEX
                for token, (begin, end) in zip(ids, offsets)
            ]
        truncated = len(ids) > self.config.max_length
        if truncated:
            if self.config.too_long == "reject":
                raise SampleRejected("too_long")
            ids, labels = ids[: self.config.max_length], labels[: self.config.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleRejected("no_trained_tokens")
        self.reasoning_counts += counts
        return {"input_ids": ids, "labels": labels}, truncated


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str], block_length: int) -> Dataset:
    """Documents joined with EOS and cut into blocks (the last one shorter); loss on every token."""
    documents = [
        tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        for text in texts
    ]
    blocks = pack_dataset(Dataset.from_dict({"input_ids": documents}), block_length, strategy="wrapped",
                          map_kwargs={"batch_size": len(documents) or 1})
    return blocks.map(lambda block: {"labels": block["input_ids"]})


def load_head_tokenizer(model_dir: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The base model's tokenizer for a task head, with a pad token (its EOS where it has none)."""
    tokenizer = load_tokenizer(model_dir, "none", trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def first_subtoken_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Each word's label on its first sub-token; IGNORE_INDEX on its other sub-tokens and on special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def encode_labelled_rows(tokenizer: PreTrainedTokenizerBase, rows: Iterable[dict], label_ids: dict[str, int],
                         config: TokenizeConfig, rejected: dict[str, int]) -> Iterator[tuple[dict, bool]]:
    """(sample, truncated) for each labelled row: `labels` is the text's label id, or one per token (-100 where no
    word starts). A row longer than `max_length` is rejected or truncated, as `too_long` says."""
    for row in rows:
        if "tokens" in row:
            text, words = joined_words(row["tokens"])
            encoded = tokenizer(text, return_offsets_mapping=True)
            labels = first_subtoken_labels(word_of_each_token(encoded["offset_mapping"], words, text),
                                           [label_ids[tag] for tag in row["tags"]])
        else:
            encoded, labels = tokenizer(row["text"]), None
        ids = encoded["input_ids"]
        truncated = len(ids) > config.max_length
        if truncated and config.too_long == "reject":
            rejected["too_long"] = rejected.get("too_long", 0) + 1
            continue
        ids = ids[: config.max_length]
        if labels is None:
            shown = {"text": row["text"]}
            sample_labels = label_ids[row["label"]]
        else:
            sample_labels = labels[: config.max_length]
            shown = {"tokens": row["tokens"][: sum(label != IGNORE_INDEX for label in sample_labels)]}
        # What the sample says in words (the text, or the words whose tags it kept), for evaluation's report.
        yield {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": sample_labels} | shown, truncated


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def encode_chat_rows(encoder: ChatEncoder, rows: Iterable[dict], rejected: dict[str, int]) -> Iterator[tuple[dict, bool]]:
    """(sample, truncated) for each row that encodes; each one that does not is counted in `rejected` by reason."""
    for row in rows:
        try:
            if "messages" not in row:
                raise SampleRejected("not_a_conversation")
            encoded = encoder.encode(row["messages"], row.get("tools"))
        except SampleRejected as reason:
            rejected[str(reason)] = rejected.get(str(reason), 0) + 1
            continue
        yield encoded


def encode_conversations(path: Path, tokenizer_dir: Path, config: TokenizeConfig, rejected: dict[str, int],
                         trust_remote_code: bool = False) -> list[dict]:
    """A file of clean chat rows as held-out samples (input_ids, labels: loss where training puts it), unpacked and
    uncached, with the tokenizer a run trained with: a suite scored apart from the recipe's (registry.guards)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    return [sample for sample, _ in encode_chat_rows(ChatEncoder(tokenizer, config), _rows(path), rejected)]


def _fit(prompt_ids: list[int], answers: list[list[int]], config: TokenizeConfig) -> tuple[list[list[int]], bool]:
    """The answers as they fit `max_length` after the prompt: whole, or cut (`too_long: truncate`: the prompt is
    kept, the answers' ends cut off); SampleRejected when they cannot fit."""
    if len(prompt_ids) + max(map(len, answers)) <= config.max_length:
        return answers, False
    if config.too_long == "reject":
        raise SampleRejected("too_long")
    room = config.max_length - len(prompt_ids)
    if room <= 0:
        raise SampleRejected("prompt_too_long")
    return [answer[:room] for answer in answers], True


def _sides(row: dict) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected) answers of a preference row; an unpaired row's answer on its label's side, [] on the other."""
    if "chosen" in row:
        return row["chosen"], row["rejected"]
    return (row["completion"], []) if row["label"] else ([], row["completion"])


def encode_preference_rows(encoder: ChatEncoder, rows: Iterable[dict], rejected: dict[str, int], *, kto: bool,
                           held_out: bool) -> Iterator[tuple[dict, bool]]:
    """(sample, truncated) for each preference row that encodes (each that does not is counted in `rejected`).

    Train samples are what TRL's trainers take: `prompt_ids`, `chosen_ids`, `rejected_ids` and `length` (DPO), or
    `prompt_ids`, `completion_ids`, `label` (KTO: a pair gives a desirable and an undesirable sample, as TRL's
    `unpair_preference_dataset` makes them). Held-out samples carry both answers (an unpaired row's other side
    empty) and, for the held-out loss, `input_ids`/`labels`: the prompt and the chosen answer, loss on the answer.
    """
    for row in rows:
        try:
            prompt, encoded = None, []
            for answer in _sides(row):
                if not answer:
                    encoded.append([])
                    continue
                prompt_ids, answer_ids = encoder.encode_answer(row["prompt"], answer, row.get("tools"))
                if prompt is not None and prompt_ids != prompt:
                    raise SampleRejected("template_not_prefix_stable")
                prompt = prompt_ids
                encoded.append(answer_ids)
            (chosen, rejected_ids), truncated = _fit(prompt, encoded, encoder.config)
        except SampleRejected as reason:
            rejected[str(reason)] = rejected.get(str(reason), 0) + 1
            continue
        if held_out:
            shown = chosen or rejected_ids
            labels = [IGNORE_INDEX] * len(prompt) + (chosen if chosen else [IGNORE_INDEX] * len(shown))
            yield {"input_ids": prompt + shown, "labels": labels, "prompt_ids": prompt, "chosen_ids": chosen,
                   "rejected_ids": rejected_ids}, truncated
        elif kto:
            for answer, label in ((chosen, True), (rejected_ids, False)):
                if answer:
                    yield {"prompt_ids": prompt, "completion_ids": answer, "label": label}, truncated
        else:  # `length`: the padded width of the pair's batch rows, which training groups pairs by
            yield {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected_ids,
                   "length": len(prompt) + max(len(chosen), len(rejected_ids))}, truncated


def token_count(samples: Dataset) -> int:
    """The tokens a data set trains on: its rows' input_ids, or a preference sample's prompt and answers."""
    if "input_ids" in samples.column_names:
        return sum(len(ids) for ids in samples["input_ids"])
    answers = [name for name in ("chosen_ids", "rejected_ids", "completion_ids") if name in samples.column_names]
    return sum(len(prompt) * len(answers) for prompt in samples["prompt_ids"]) + sum(
        len(ids) for name in answers for ids in samples[name])


def _documents(rows: list[dict], rejected: dict[str, int]) -> list[str]:
    texts = [row["text"] for row in rows if "text" in row]
    if len(texts) < len(rows):
        rejected["not_a_document"] = rejected.get("not_a_document", 0) + len(rows) - len(texts)
    return texts


def cache_key(train_path: Path, eval_path: Path, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig,
              task: str = "causal_lm", labels: tuple[str, ...] = ()) -> str:
    """What the samples depend on: the clean data, the tokenizer and its template, the tokenize settings, the task and
    its labels, and the versions of the libraries that shape tokens (an upgrade never reuses samples an older one
    made)."""
    digest = hashlib.sha256()
    libraries = json.dumps({package: version(package) for package in TOKEN_SHAPING_PACKAGES})
    head = f"{task} {json.dumps(labels)}" if task != "causal_lm" else ""  # preference rows: their kind, no labels
    for part in (train_path.read_bytes(), eval_path.read_bytes(), tokenizer.backend_tokenizer.to_str().encode(),
                 str(tokenizer.chat_template).encode(), json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode(),
                 json.dumps(config.model_dump(), sort_keys=True).encode(), str(CACHE_FORMAT).encode(), libraries.encode(),
                 head.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def tokenize(cleaned: CleanResult, model_dir: str, config: TokenizeConfig, ctx: RunContext, *,
             labels: tuple[str, ...] | None = None) -> TokenizedData:
    """Tokenize clean train/eval rows into `datasets` folders under `ctx.cache_dir/tokenized/<content key>`, reused
    when present.

    Train samples are packed when the config says so (never for a task head or preference rows); eval samples never
    are (held-out loss reads them one by one). A task head's labels (the clean stage's, in id order, unless `labels` gives a trained
    head's own) give the label ids.
    """
    train_path, eval_path, task = cleaned.train_path, cleaned.eval_path, cleaned.task
    labels = cleaned.labels if labels is None else labels
    trust_remote_code, cache_dir = ctx.trust_remote_code, ctx.cache_dir / "tokenized"
    if task in HEAD_TASKS:
        tokenizer = load_head_tokenizer(model_dir, trust_remote_code)
    else:
        tokenizer = load_tokenizer(model_dir, config.chat_template if config.mode == "chat" else "none",
                                   trust_remote_code)
    key = cache_key(train_path, eval_path, tokenizer, config, task, labels)
    target = cache_dir / key
    if (target / "summary.json").exists():
        return cached_tokens(target, task)
    rejected: dict[str, int] = {}
    reasoning: dict[str, int] = {}
    if task in HEAD_TASKS:
        label_ids = {label: number for number, label in enumerate(labels)}
        train_encoded = list(encode_labelled_rows(tokenizer, _rows(train_path), label_ids, config, rejected))
        eval_encoded = list(encode_labelled_rows(tokenizer, _rows(eval_path), label_ids, config, rejected))
        if not train_encoded or not eval_encoded:
            raise UserError(f"no labelled samples after tokenizing (rejected: {rejected})")
        truncated = sum(was_truncated for _, was_truncated in train_encoded + eval_encoded)
        train = Dataset.from_list([sample for sample, _ in train_encoded])
        evaluation = Dataset.from_list([sample for sample, _ in eval_encoded])
    elif task in PREFERENCE_KINDS:
        encoder = ChatEncoder(tokenizer, config)
        kto = task == UNPAIRED_PREFERENCE
        train_encoded = list(encode_preference_rows(encoder, _rows(train_path), rejected, kto=kto, held_out=False))
        eval_encoded = list(encode_preference_rows(encoder, _rows(eval_path), rejected, kto=kto, held_out=True))
        if not train_encoded or not eval_encoded:
            raise UserError(f"no trainable preference samples after tokenizing (rejected: {rejected})")
        truncated = sum(was_truncated for _, was_truncated in train_encoded + eval_encoded)
        train = Dataset.from_list([sample for sample, _ in train_encoded])
        evaluation = Dataset.from_list([sample for sample, _ in eval_encoded])
        encoder.reasoning.save(tokenizer)
    elif config.mode == "chat":
        encoder = ChatEncoder(tokenizer, config)
        train_encoded = list(encode_chat_rows(encoder, _rows(train_path), rejected))
        eval_encoded = list(encode_chat_rows(encoder, _rows(eval_path), rejected))
        if not train_encoded or not eval_encoded:
            raise UserError(f"no trainable samples after tokenizing (rejected: {rejected})")
        truncated = sum(was_truncated for _, was_truncated in train_encoded + eval_encoded)
        train = Dataset.from_list([sample for sample, _ in train_encoded])
        evaluation = Dataset.from_list([sample for sample, _ in eval_encoded])
        reasoning = dict(encoder.reasoning_counts)
        encoder.reasoning.save(tokenizer)  # evaluation and serving render and split reasoning as training did
    else:
        truncated = 0
        train_texts, eval_texts = _documents(_rows(train_path), rejected), _documents(_rows(eval_path), rejected)
        if not train_texts or not eval_texts:
            raise UserError(f"no text documents to pretrain on after cleaning (rejected: {rejected})")
        train = encode_documents(tokenizer, train_texts, config.max_length)
        evaluation = encode_documents(tokenizer, eval_texts, config.max_length)
    sample_count = len(train)
    if task == "causal_lm" and config.mode == "chat" and config.packing:
        train = pack_dataset(train, config.max_length, strategy="bfd")
    staging = cache_dir / f"{key}.partial-{os.getpid()}"  # two processes may make the same entry at once
    shutil.rmtree(staging, ignore_errors=True)
    train.save_to_disk(staging / "train")
    evaluation.save_to_disk(staging / "eval")
    tokenizer.save_pretrained(staging / "tokenizer")  # with the chat template used, for train, eval and serving
    summary = {
        "train_samples": sample_count,
        "train_rows": len(train),
        "eval_samples": len(evaluation),
        "train_tokens": token_count(train),
        "rejected": rejected,
        "truncated": truncated,
        "cache_key": key,
        "labels": list(labels),
        "reasoning": reasoning,
    }
    (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    try:
        staging.rename(target)  # a crash never leaves a half-written cache entry under its key
    except OSError:
        if not (target / "summary.json").exists():
            raise
        shutil.rmtree(staging)  # another process made the same entry first; it is the same data
    return dataclasses.replace(cached_tokens(target, task), cache_hit=False)


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Share of padding tokens when samples are batched in this order and padded to each batch's longest."""
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return 1 - sum(lengths) / sum(max(batch) * len(batch) for batch in batches)


def marked_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> str:
    """The sample's text with each run of trained tokens between [[ and ]]."""
    out = []
    for trained, run in groupby(zip(ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run])
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def head_sample_text(tokenizer: PreTrainedTokenizerBase, sample: dict, labels: tuple[str, ...]) -> str:
    """A task head's sample as trained: `[label] text`, or each sub-token/its tag (`-`: no loss on it)."""
    if isinstance(sample["labels"], int):
        return f"[{labels[sample['labels']]}] {tokenizer.decode(sample['input_ids'])}"
    return " ".join(f"{tokenizer.decode([token])}/{labels[label] if label != IGNORE_INDEX else '-'}"
                    for token, label in zip(sample["input_ids"], sample["labels"]))


def cached_tokens(folder: Path, task: str = "causal_lm") -> TokenizedData:
    """The tokenized data in a cache entry (`folder`: ctx.cache_dir/tokenized/<key>), as the stage returns it."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return TokenizedData(**summary | {"train_dir": folder / "train", "eval_dir": folder / "eval",
                                      "tokenizer_dir": folder / "tokenizer", "labels": tuple(summary.get("labels", ())),
                                      "cache_hit": True, "task": task})

