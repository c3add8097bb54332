"""Reasoning (a chain of thought before the answer): how training renders it, and how an answer is split again.

The clean stage leaves an assistant turn's reasoning in `reasoning_content` (DeepSeek's field, which Qwen3's chat
template reads). A template that knows reasoning renders it itself: Qwen3's (`reasoning_content`) or GPT-OSS's
(`thinking`); such templates also leave out the reasoning of turns before the last user message, as inference
shows them. Any other template gets the reasoning written into the answer, in front of it, by
`tokenize.reasoning_format` (`<think>\\n{reasoning}\\n</think>\\n\\n` unless the recipe says otherwise).

These settings are saved inside the tokenizer that travels with the weights (its init kwargs, which
`save_pretrained` keeps), so evaluation, `loraflow chat` and the served model render and split as training did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from conf.schema import TokenizeConfig

FIELD = "reasoning_content"  # where the clean stage puts a turn's reasoning
DEFAULT_FORMAT = TokenizeConfig.model_fields["reasoning_format"].default  # the schema holds every default
SETTINGS_KEY = "loraflow_reasoning"
TEMPLATE_FIELDS = ("reasoning_content", "thinking")  # Qwen3 / DeepSeek, GPT-OSS (Harmony)


def template_field(chat_template: str | None) -> str | None:
    """The message field a chat template renders reasoning from, or None when it renders none."""
    for field in TEMPLATE_FIELDS:
        if chat_template and (f"message.{field}" in chat_template or f"message['{field}']" in chat_template
                              or f'message["{field}"]' in chat_template):
            return field
    return None


@dataclass(frozen=True)
class Reasoning:
    """How reasoning is rendered for one tokenizer: trained, masked or dropped; by the template or in `format`."""

    mode: str = "train"
    format: str = DEFAULT_FORMAT
    template_field: str | None = None

    @classmethod
    def of(cls, tokenizer) -> Reasoning:
        """The settings saved with a tokenizer by the tokenize stage; for any other tokenizer, the defaults."""
        saved = tokenizer.init_kwargs.get(SETTINGS_KEY)
        return cls(**saved) if saved else cls(template_field=template_field(tokenizer.chat_template))

    def save(self, tokenizer) -> None:
        tokenizer.init_kwargs[SETTINGS_KEY] = asdict(self)

    @property
    def opening(self) -> str:
        return self.format.split("{reasoning}")[0]

    @property
    def closing(self) -> str:
        return self.format.split("{reasoning}")[1]

    def for_template(self, message: dict) -> dict:
        """The message as the chat template takes it: its reasoning in the template's field, written into its content,
        or gone (`drop`); and without the clean stage's `weight`, which is not the template's business."""
        message = {key: value for key, value in message.items() if key != "weight"}
        reasoning = message.pop(FIELD, None)
        if reasoning is None or self.mode == "drop":
            return message
        if self.template_field is not None:
            return message | {self.template_field: reasoning}
        return message | {"content": self.opening + reasoning + self.closing + message["content"]}

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of a generated text. A text cut off inside its reasoning has no answer; one without the
        closing marker is all answer. The opening marker may be missing (templates whose prompt ends with it)."""
        opening, closing = self.opening.strip(), self.closing.strip()
        text = text.strip()
        end = text.find(closing)
        if end >= 0:
            return text[:end].removeprefix(opening).strip(), text[end + len(closing):].strip()
        if opening and text.startswith(opening):
            return text[len(opening):].strip(), ""
        return "", text
