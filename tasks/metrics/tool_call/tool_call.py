"""Tool call: how often a model calls the right function, in a well-formed call with valid JSON arguments.

A local `evaluate` metric module, loadable offline with `evaluate.load(<this folder>)`. Only rows whose reference
is a tool call count. A call is a JSON object {"name": ..., "arguments": {...}} inside <tool_call></tool_call>
tags (the Hermes format, which Qwen's templates also write), or the whole answer as that JSON object.
"""

import json
import math
import re

import evaluate

from tasks.metrics import text_pair_info

_DESCRIPTION = "Share of tool-call references answered with a well-formed call, to the right function, with equal arguments."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of expected answers; those holding a tool call are scored.
Returns:
    tool_call_valid: share of scored answers holding a well-formed call (a name and JSON object arguments).
    tool_call_accuracy: share whose first well-formed call names the reference's function.
    tool_call_exact: share whose first well-formed call also has the reference's arguments.
    All three are NaN when no reference is a tool call.
"""
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def first_call(text: str) -> dict | None:
    """The first well-formed call in a text: {"name": str, "arguments": dict}, or None."""
    for body in _CALL.findall(text) or [text]:
        try:
            call = json.loads(body.strip())
        except ValueError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        if isinstance(arguments, dict):
            return {"name": call["name"], "arguments": arguments}
    return None


class ToolCall(evaluate.Metric):
    def _info(self):
        return text_pair_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references):
        pairs = [(first_call(p), expected) for p, r in zip(predictions, references)
                 if "<tool_call>" in r and (expected := first_call(r)) is not None]
        if not pairs:
            return {"tool_call_valid": math.nan, "tool_call_accuracy": math.nan, "tool_call_exact": math.nan}
        valid = [call for call, _ in pairs if call is not None]
        right = [(call, expected) for call, expected in pairs if call is not None and call["name"] == expected["name"]]
        return {
            "tool_call_valid": len(valid) / len(pairs),
            "tool_call_accuracy": len(right) / len(pairs),
            "tool_call_exact": sum(call["arguments"] == expected["arguments"] for call, expected in right) / len(pairs),
        }
