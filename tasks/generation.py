"""Answers from a model: chat replies through the tokenizer's chat template, continuations of text openings, and
the held-out prompts they answer. Shared by training (sample answers while it runs), evaluation and the served model.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from conf.schema import EvaluateConfig
from tasks import prompt_cache
from tasks.chat_templates import call_text, for_template
from tasks.packed_linears import packed_linears
from tasks.reasoning import Reasoning

DOCUMENT_SAMPLES, DOCUMENT_PROMPT_CHARS = 8, 200  # pretraining: continue this many held-out openings


class RequestError(ValueError):
    """A chat request a model cannot answer as asked; its message is one line for the caller (an HTTP 400).

    Defined here, not in chat_model.py: MLflow loads that file afresh for each model, while this module is shared.
    """


def chat_prompts(tokenizer, prompts: list[list[dict]], tools: list[list[dict] | None] | None = None,
                 tool_format: str = "auto") -> list[str]:
    """Each prompt conversation rendered by the tokenizer's chat template, ready for the assistant's answer; earlier
    turns' reasoning rendered as training rendered it (tasks/reasoning.py)."""
    reasoning = Reasoning.of(tokenizer)
    texts = []
    for messages, offered in zip(prompts, tools or [None] * len(prompts)):
        messages, offered = for_template(messages, offered, tokenizer.chat_template, tool_format)
        messages = [reasoning.for_template(message) for message in messages]
        texts.append(tokenizer.apply_chat_template(messages, tools=offered, tokenize=False, add_generation_prompt=True))
    return texts


def split_answers(tokenizer, outputs: list[str]) -> tuple[list[str], list[str]]:
    """(reasoning, answers) of generated chat texts, split as the tokenizer's training rendered reasoning."""
    reasoning = Reasoning.of(tokenizer)
    parts = [reasoning.split(output) for output in outputs]
    return [thought for thought, _ in parts], [answer for _, answer in parts]


@dataclass(frozen=True)
class Answer:
    """A generated text, the number of tokens generated for it (a stop token included) and whether a stop token
    ended it (OpenAI's finish_reason "stop") rather than the token limit ("length"). Counted from the generated ids:
    the text tokenized again can split otherwise."""

    text: str
    tokens: int
    stopped: bool


def _stop_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def length_batches(tokenizer, texts: list[str], batch_size: int, **encoding):
    """(indices, token rows) of `texts` tokenized once, in batches of like token length, longest first: a batch pads
    to its longest prompt, so mixing lengths pays for padding in every step (bench/generate.py)."""
    rows = tokenizer(texts, **encoding)["input_ids"]
    order = sorted(range(len(texts)), key=lambda index: -len(rows[index]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, [rows[index] for index in indices]


def generate_inputs(model, tokenizer, rows: list[list[int]], fast: bool, max_new_tokens: int) -> dict:
    """`generate`'s prompt arguments for a batch of token rows: with `fast` on a CPU, the prompts' cache computed
    before, their shared opening once (tasks/prompt_cache.py); otherwise the rows padded on the left."""
    if fast and all(rows) and prompt_cache.applies(model):
        return prompt_cache.prefilled(model, rows, tokenizer.pad_token_id, max_new_tokens)
    tokenizer.padding_side = "left"
    padded = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(model.device)
    return dict(padded) | decoding_options(model, fast)


def decoding_options(model, fast: bool) -> dict:
    """A static KV cache on a GPU, where transformers' generate then compiles the decoding step itself (it compiles
    on accelerators only; on a CPU a static cache measured no faster, bench/generate.py). Not for the few sample
    prompts answered during training, for which compiling would not pay."""
    return {"cache_implementation": "static"} if fast and model.device.type == "cuda" else {}


def decoding(model, fast: bool):
    """Where a generate call runs: on a CPU, the linear layers on weights packed once (tasks/packed_linears.py);
    not while training, whose weights change between the sample prompts."""
    return packed_linears(model) if fast else nullcontext()


def sampling_options(tokenizer, temperature: float, top_p: float = 1.0, stop: tuple[str, ...] = ()) -> dict:
    """generate's arguments for greedy decoding (temperature 0) or sampling, ending at any of the `stop` strings."""
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    return options | ({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {})


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(the text before the first of the `stop` strings, whether one was found): OpenAI's answers leave it out."""
    found = [place for place in (text.find(string) for string in stop) if place >= 0]
    return (text[: min(found)], True) if found else (text, False)


class _RowStreamer(BaseStreamer):
    """Each row's new text handed to its own sink as a batch is generated (hand-written: transformers' streamers take
    one row). A row's text is decoded whole each step and only what it adds is handed on, held back while it ends in
    an incomplete character; after a row's stop token, nothing."""

    def __init__(self, tokenizer, sinks: list, stop_ids: set[int]):
        self.tokenizer, self.sinks, self.stop_ids = tokenizer, sinks, stop_ids
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.sent = [""] * len(sinks)
        self.ended = [False] * len(sinks)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompts first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            if self.ended[row] or self.sinks[row] is None:
                continue
            if token in self.stop_ids:
                self.ended[row] = True
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if len(text) > len(self.sent[row]) and not text.endswith("\ufffd"):
                self.sinks[row](text[len(self.sent[row]):])
                self.sent[row] = text

    def end(self) -> None:
        pass


class _WhenTrue(StoppingCriteria):
    def __init__(self, condition):
        self.condition = condition

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.condition()), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_chat(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                  tools: list[list[dict] | None] | None = None, tool_format: str = "auto",
                  temperature: float = 0.0, fast: bool = True, top_p: float = 1.0,
                  stop: tuple[str, ...] = (), sinks: list | None = None, give_up=None) -> list[Answer]:
    """Answers to each prompt conversation (greedy, or sampled at `temperature` within `top_p`; ended by a stop token
    or any `stop` string, which is left out), rendered with the tokenizer's chat template (with the tools each prompt
    may call, as training rendered them), in the prompts' order. A prompt's sink (`sinks`, None for none) is handed
    its text piece by piece as it is generated; generation stops early once `give_up()` says so. `fast` (off for the
    sample prompts answered while training) packs a CPU's weights and computes its prompts' cache apart
    (tasks/prompt_cache.py), and uses a GPU's static cache."""
    texts = chat_prompts(tokenizer, prompts, tools, tool_format)
    stop_ids = _stop_ids(model, tokenizer)
    sinks = sinks or [None] * len(texts)
    answers: list[Answer | None] = [None] * len(texts)
    for indices, rows in length_batches(tokenizer, texts, batch_size, add_special_tokens=False):
        streaming = {"streamer": _RowStreamer(tokenizer, [sinks[i] for i in indices], stop_ids)} if any(
            sinks[i] for i in indices) else {}
        stopping = {"stopping_criteria": StoppingCriteriaList([_WhenTrue(give_up)])} if give_up else {}
        with decoding(model, fast):
            prompts_in = generate_inputs(model, tokenizer, rows, fast, max_new_tokens)
            output = model.generate(**prompts_in, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    **sampling_options(tokenizer, temperature, top_p, stop), **streaming, **stopping)
        for index, generated in zip(indices, output[:, prompts_in["input_ids"].shape[1] :].tolist()):
            end = next((place for place, token in enumerate(generated) if token in stop_ids), None)
            generated = generated if end is None else generated[: end + 1]
            text, stopped = cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), stop)
            answers[index] = Answer(text.strip(), len(generated), stopped or end is not None)
    return answers


@torch.no_grad()
def continue_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                   fast: bool = True) -> list[str]:
    """Greedy continuations of plain-text prompts (pretraining: no chat template), in the prompts' order."""
    continuations = [""] * len(prompts)
    for indices, rows in length_batches(tokenizer, prompts, batch_size, split_special_tokens=True):
        with decoding(model, fast):
            prompts_in = generate_inputs(model, tokenizer, rows, fast, max_new_tokens)
            output = model.generate(**prompts_in, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, prompts_in["input_ids"].shape[1] :], skip_special_tokens=True)
        for index, text in zip(indices, texts):
            continuations[index] = text.strip()
    return continuations


@dataclass(frozen=True)
class HeldOut:
    """What is asked of a model: chat prompts (with the reference answers, their reasoning apart) or document
    openings (with the text that really follows them)."""

    prompts: list
    shown: list[str]
    references: list[str]
    chat: bool
    tools: list | None = None  # chat: the tools each prompt may call
    tool_format: str = "auto"

    def outputs(self, model, tokenizer, max_new_tokens: int, batch_size: int, fast: bool = True) -> list[str]:
        if self.chat:
            answers = generate_chat(model, tokenizer, self.prompts, max_new_tokens, batch_size, self.tools,
                                    self.tool_format, fast=fast)
            return [answer.text for answer in answers]
        return continue_texts(model, tokenizer, self.prompts, max_new_tokens, batch_size, fast)


def _reference(message: dict) -> str:
    """What a held-out turn says: its text, and its tool calls as the Hermes format writes them."""
    calls = [call_text(call) for call in message.get("tool_calls", [])]
    return "\n".join(part for part in [message["content"], *calls] if part)


def _conversation(row: dict) -> dict | None:
    """A held-out row as the conversation it asks for: a preference row's prompt with its chosen (or desirable)
    answer; None for an answer labelled undesirable, which is no reference."""
    if "prompt" not in row:
        return row
    answer = row["chosen"] if "chosen" in row else row["completion"] if row["label"] else None
    return None if answer is None else {"messages": row["prompt"] + answer} | (
        {"tools": row["tools"]} if "tools" in row else {})


def held_out(eval_path: Path, tool_format: str = "auto") -> HeldOut:
    rows = [json.loads(line) for line in eval_path.read_text(encoding="utf-8").splitlines()]
    rows = [conversation for row in rows if (conversation := _conversation(row)) is not None]
    if all("messages" in row for row in rows):
        prompts = [row["messages"][:-1] for row in rows]
        return HeldOut(prompts, [_reference(p[-1]) for p in prompts], [_reference(r["messages"][-1]) for r in rows],
                       True, [row.get("tools") for row in rows], tool_format)
    documents = [row["text"] for row in rows if "text" in row][:DOCUMENT_SAMPLES]
    openings = [document[:DOCUMENT_PROMPT_CHARS].rsplit(" ", 1)[0] for document in documents]
    references = [document[len(opening) :][:DOCUMENT_PROMPT_CHARS].strip() for document, opening in zip(documents, openings)]
    return HeldOut(openings, openings, references, False)


@dataclass(frozen=True)
class SamplePrompts:
    """Fixed prompts answered every `every_steps` training steps, to watch a run learn (XTuner's EvaluateChatHook)."""

    prompts: list
    shown: list[str]
    chat: bool
    every_steps: int
    max_new_tokens: int
    tools: list | None = None
    tool_format: str = "auto"

    def answer(self, model, tokenizer) -> list[str]:
        questions = HeldOut(self.prompts, self.shown, [], self.chat, self.tools, self.tool_format)
        return questions.outputs(model, tokenizer, self.max_new_tokens, batch_size=len(self.prompts), fast=False)


def sample_prompts(config: EvaluateConfig, eval_path: Path, tool_format: str = "auto") -> SamplePrompts | None:
    """The recipe's `evaluate.sample_prompts` (as user turns, or text openings), else the first held-out prompts
    (with the tools they offer)."""
    if config.every_steps is None:
        return None
    questions = held_out(eval_path, tool_format)
    if config.sample_prompts:
        shown = list(config.sample_prompts)
        prompts = [[{"role": "user", "content": text}] for text in shown] if questions.chat else shown
        tools = None
    else:
        count = config.sample_count
        prompts, shown = questions.prompts[:count], questions.shown[:count]
        tools = questions.tools[:count] if questions.tools else None
    return SamplePrompts(prompts, shown, questions.chat, config.every_steps, config.max_new_tokens, tools, tool_format)
