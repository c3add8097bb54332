"""A raw preference row to the clean shape, for the preference objectives.

Pairs become `{"prompt": [...], "chosen": [...], "rejected": [...]}` and unpaired rows (KTO's) become
`{"prompt": [...], "completion": [...], "label": true|false}`: TRL's conversational preference layouts, each side a
list of messages in the clean message shape (tasks/clean/normalise.py), with the row's `tools` beside them.

Read from the layouts users bring:
- TRL's `prompt`/`chosen`/`rejected`, strings or message lists, and its implicit-prompt form (no `prompt`: `chosen`
  and `rejected` are whole conversations sharing a prefix), Anthropic HH's "Human: / Assistant:" strings included;
- LLaMA-Factory's alpaca `instruction`/`input`/`chosen`/`rejected` and ShareGPT `conversations` with `chosen`/
  `rejected` message objects; `messages` with per-row `chosen`/`rejected` answers;
- KTO's `prompt`/`completion`/`label`, or `messages` whose last turn is the labelled answer.
"""

from __future__ import annotations

import re

from conf.schema import DataConfig
from tasks.clean.normalise import ROLE_ALIASES, _message, _tools, _turns as row_turns, desirable, plain_text, raw_row
from tasks.clean.readers import RowRejected
from tasks.results import PAIRED_PREFERENCE

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(text: str) -> list[dict] | None:
    """Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as turns; None for any other text."""
    parts = _HH_TURN.split(text.lstrip("\n"))
    if len(parts) < 5 or parts[0].strip():
        return None
    return [{"role": _HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def _turns(value: object, speaker: str) -> list[dict]:
    """A side as raw turns: a string is one turn of `speaker` (or an HH transcript), a message object one turn,
    a list its turns; ShareGPT's from/value turns are read as role/content."""
    if value is None or value == "" or value == []:
        raise RowRejected("empty_side")
    if isinstance(value, str):
        return _hh_turns(value) or [{"role": speaker, "content": value}]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise RowRejected("wrong_type")
    return [{key: item for key, item in turn.items() if key not in ("from", "value")}
            | {"role": turn.get("from"), "content": turn.get("value")} if "from" in turn else turn for turn in turns]


def _messages(turns: list[dict], data: DataConfig, values: dict[str, str], features: set[str], side: str) -> list[dict]:
    messages = []
    for turn in turns:
        try:
            message = _message(turn, data, values, features)
        except RowRejected as rejected:
            # An answer with nothing in it is an empty side; an empty prompt turn is any row's empty turn.
            raise RowRejected("empty_side" if str(rejected) == "empty_turn" and side != "prompt" else str(rejected))
        answers_a_call = messages and ("tool_calls" in messages[-1] or messages[-1]["role"] == "tool")
        if message["role"] == "tool" and not answers_a_call:
            raise RowRejected("orphan_tool_result")
        messages.append(message)
    return messages


def _prompt(row: dict) -> tuple[str, list[dict] | None]:
    """(layout, the prompt's raw turns) from the row's own prompt fields; None where the answers hold it."""
    if "prompt" in row:
        return "prompt", _turns(row["prompt"], "user")
    if "conversations" in row:
        return "sharegpt", _turns(row["conversations"], "user")
    if "messages" in row:
        return "messages", _turns(row["messages"], "user")
    if "instruction" in row:  # an alpaca row's turns (system, history, instruction and input), less its output
        return "alpaca", row_turns(row | {"output": ""}, "alpaca")[:-1]
    return "implicit prompt", None


def _split_shared_prefix(first: list[dict], second: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, first's answer, second's answer) of two whole conversations: the prompt is their shared opening
    (TRL's `extract_prompt` does the same on raw rows; here it runs on clean messages, so spacing cannot split it)."""
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return first[:shared], first[shared:], second[shared:]


def _is_assistant(turn: dict) -> bool:
    role = turn.get("role")
    return isinstance(role, str) and ROLE_ALIASES.get(role.lower()) == "assistant"


def _check_answer(answer: list[dict]) -> None:
    if not answer:
        raise RowRejected("identical_pair")
    if answer[0]["role"] != "assistant":
        raise RowRejected("prompts_differ")
    if answer[-1]["role"] != "assistant":
        raise RowRejected("ends_on_user_turn")


def normalise_preference_row(raw: object, data: DataConfig, values: dict[str, str], kind: str) -> tuple[str, dict]:
    """(layout, clean row) for one raw preference row (`kind`: PAIRED_PREFERENCE for DPO, ORPO and SimPO, or
    UNPAIRED_PREFERENCE for KTO, which also takes pairs), or RowRejected with the reason code."""
    row = raw_row(raw, data)
    features: set[str] = set()
    paired = "chosen" in row or "rejected" in row
    if not paired and "label" not in row:
        raise RowRejected("not_a_preference")
    if not paired and kind == PAIRED_PREFERENCE:
        raise RowRejected("unpaired_preference")
    layout, prompt_turns = _prompt(row)
    if paired:
        sides = [_turns(row.get(side), "assistant") for side in ("chosen", "rejected")]
        if prompt_turns is not None and layout in ("messages", "sharegpt") and _is_assistant(prompt_turns[-1]):
            raise RowRejected("ends_on_assistant_turn")  # its answers are the chosen and rejected ones
        whole = not _is_assistant(sides[0][0])
        if whole or prompt_turns is None:
            # Whole conversations (the implicit-prompt form, or UltraFeedback's prompt beside whole conversations).
            chosen = _messages(sides[0], data, values, features, "chosen")
            rejected = _messages(sides[1], data, values, features, "rejected")
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
            layout = "implicit prompt" if prompt_turns is None else layout
        else:
            prompt = _messages(prompt_turns, data, values, features, "prompt")
            chosen = _messages(sides[0], data, values, features, "chosen")
            rejected = _messages(sides[1], data, values, features, "rejected")
        if chosen == rejected:
            raise RowRejected("identical_pair")
        _check_answer(chosen)
        _check_answer(rejected)
        clean = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        label = desirable(row["label"])
        if "completion" in row:
            prompt = _messages(prompt_turns or [], data, values, features, "prompt")
            completion = _messages(_turns(row["completion"], "assistant"), data, values, features, "completion")
        else:
            conversation = _messages(prompt_turns or [], data, values, features, "prompt")
            at = len(conversation) - 1  # the labelled answer: the conversation's last turn
            prompt, completion = conversation[:at], conversation[at:]
        _check_answer(completion)
        clean = {"prompt": prompt, "completion": completion, "label": label}
    if not clean["prompt"] or clean["prompt"][-1]["role"] == "assistant":
        raise RowRejected("no_prompt")
    if row.get("tools"):
        clean["tools"] = _tools(row["tools"])
    if len(plain_text(clean)) > data.max_chars:
        raise RowRejected("too_long")
    name = f"{'pair' if paired else 'unpaired'}, {layout}"
    return name + (" with " + ", ".join(sorted(features)) if features else ""), clean
