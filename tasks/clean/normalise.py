"""One raw row to the clean shape: a conversation (`{"messages": [...]}`, OpenAI's shape, tool calls, reasoning and
per-turn weights included, with the row's `tools`), a text document (`{"text": ...}`), or a labelled text or tagged
words for a task head. Whatever a row holds, its failure is a RowRejected with a reason code, never the stage's."""

from __future__ import annotations

import json
import re
import unicodedata

from conf.schema import DataConfig
from tasks.clean.readers import RowRejected
from tasks.labels import LabelRejected, label_name, token_row


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


# Control characters other than newline and tab (NUL and ESC among them) and the BOM.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")


SPACES = re.compile(r"[ \t\u00a0]+")


PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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


def raw_row(raw: object, data: DataConfig, *, text_only: bool = True) -> dict:
    """The raw row as a dict with the recipe's column names mapped to ours; RowRejected for what is not an object,
    or (`text_only`) for a row that refers to media."""
    if isinstance(raw, RowRejected):
        raise raw
    if not isinstance(raw, dict):
        raise RowRejected("not_an_object")
    row = dict(raw)
    for ours, theirs in data.columns.items():  # LLaMA-Factory-style mapping of odd field names
        if theirs in row:
            row[ours] = row.pop(theirs)
    if text_only and not row.keys().isdisjoint(MEDIA_FIELDS):
        for field, reason in MEDIA_FIELDS.items():
            if row.get(field):
                raise RowRejected(reason)
    return row


def desirable(label: object) -> bool:
    """KTO's label (true, false, 1, 0, or those as text); RowRejected("invalid_label") for anything else."""
    if isinstance(label, bool) or label in (0, 1):
        return bool(label)
    text = str(label).strip().lower()
    if text in ("true", "1", "false", "0"):
        return text in ("true", "1")
    raise RowRejected("invalid_label")


def normalise_row(raw: object, data: DataConfig, values: dict[str, str], task: str = "causal_lm") -> tuple[str, dict]:
    """(format, clean row) for one raw row, or RowRejected with the reason code."""
    row = raw_row(raw, data, text_only=task == "causal_lm")
    if task != "causal_lm":
        return _labelled_row(row, task, data, values)
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
    if len(plain_text(clean)) > data.max_chars:
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


def plain_text(row: dict) -> str:
    """What a clean row says, as one text: near-duplicates are found by it, and its length is checked."""
    if "tokens" in row:
        return " ".join(row["tokens"])
    if "text" in row:
        return row["text"]
    return "\n".join([m["content"] if len(m) == 2 else _message_text(m) for m in row_messages(row)])


def row_messages(row: dict) -> list[dict]:
    """Every message of a clean chat row: a conversation's, or a preference row's prompt and answers."""
    if "messages" in row:
        return row["messages"]
    return [m for side in ("prompt", "chosen", "rejected", "completion") for m in row.get(side, ())]


def _message_text(message: dict) -> str:
    """What a message with more than a role and content says: its reasoning, content and tool calls."""
    calls = json.dumps(message["tool_calls"]) if "tool_calls" in message else ""
    return "\n".join(part for part in (message.get("reasoning_content"), message["content"] + calls) if part)
