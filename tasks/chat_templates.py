"""Built-in chat templates, for base models whose tokenizer carries none (selected by `tokenize.chat_template`), and
the rendering of tool calls for templates that do not know tools.

Each is the published turn format of its model family, written as a Jinja template for `apply_chat_template`,
with the control tokens it needs: the tokenizer must have each as one token of its own, or the template would
be trained as plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    jinja: str
    control_tokens: tuple[str, ...]


_CHATML_TURNS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES = {
    # ChatML, as Qwen uses it (without Qwen's default system prompt).
    "chatml": ChatTemplate(_CHATML_TURNS, ("<|im_start|>", "<|im_end|>")),
    # InternLM2-chat: ChatML turns after the BOS token.
    "internlm2": ChatTemplate("{{ '<s>' }}" + _CHATML_TURNS, ("<s>", "<|im_start|>", "<|im_end|>")),
    # Llama 3 instruct.
    "llama3": ChatTemplate(
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    # Mistral instruct (v0.1 spacing): the system prompt goes in front of the first user turn.
    "mistral": ChatTemplate(
        "{{ '<s>' }}"
        "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system + '\\n\\n' if system and loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + '</s>' }}{% endif %}"
        "{% endfor %}",
        ("<s>", "</s>"),
    ),
}


# Tool calls for templates that do not know tools: the Hermes format (NousResearch's Hermes 2 Pro, which Qwen2.5
# follows): the tool list in the system prompt, each call a JSON object in <tool_call> tags inside the assistant's
# turn, each result in <tool_response> tags in a user turn (a user turn renders under any template; a "tool" role
# does not).
HERMES_TOOLS_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "The functions you can call are given within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)


def knows_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders a `tools` list (and so tool calls) itself."""
    return chat_template is not None and "tools" in chat_template


def call_text(call: dict) -> str:
    """One tool call as the Hermes format writes it (also the reference a tool-call evaluation compares with)."""
    function = call["function"]
    return f"<tool_call>\n{json.dumps({'name': function['name'], 'arguments': function['arguments']})}\n</tool_call>"


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """A conversation with tool calls and results, as plain messages in the Hermes format."""
    plain = []
    for message in messages:
        if message["role"] == "tool":
            plain.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif "tool_calls" in message:  # its other keys (reasoning, weight) stay
            calls = "\n".join(call_text(call) for call in message["tool_calls"])
            plain.append({key: value for key, value in message.items() if key != "tool_calls"}
                         | {"content": f"{message['content']}\n{calls}".strip()})
        else:
            plain.append(message)
    if tools:
        listing = "\n".join(json.dumps(tool) for tool in tools)
        prompt = HERMES_TOOLS_PROMPT.format(tools=listing)
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{prompt}"}
        else:
            plain.insert(0, {"role": "system", "content": prompt})
    return plain


def for_template(messages: list[dict], tools: list[dict] | None, chat_template: str | None, tool_format: str
                 ) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to hand to `apply_chat_template`: as they are when the conversation has no tools or the
    template knows tools (tool_format auto), else in the Hermes format with no `tools` argument."""
    if not tools and not any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        return messages, None
    if tool_format == "auto" and knows_tools(chat_template):
        return messages, tools
    return hermes_messages(messages, tools), None
