"""Built-in chat templates, for base models whose tokenizer carries none (selected by `tokenize.chat_template`).

Each is the published turn format of its model family, written as a Jinja template for `apply_chat_template`,
with the control tokens it needs: the tokenizer must have each as one token of its own, or the template would
be trained as plain text.
"""

from __future__ import annotations

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
