"""A loaded version as the server drives it: the version's own pyfunc (tasks/chat_model.py, as it was logged) for
checking requests and shaping answers, and generation through the shared tasks/generation.py, so a version logged
before a sampling option existed is served with it too. On `--engine vllm`, vLLM generates.
"""

from __future__ import annotations

import mlflow

from tasks.deploy.batcher import Sampling
from tasks.generation import Answer, RequestError, generate_chat, split_answers

VLLM_OPTIONS = ("temperature", "max_tokens")  # what the vLLM engine passes on; the rest is refused there


class ServedModel:
    def __init__(self, model, engine: str = "transformers"):
        self.model, self.engine = model, engine  # the TunedChatModel inside the pyfunc, or a VllmChatModel

    @property
    def evaluated_answers(self) -> str | None:
        """The answers the version was evaluated with (tasks/parity.py); None for a version logged before them."""
        return getattr(self.model, "evaluated_answers", None)

    def check(self, request: dict):
        """The version's own check of messages, max_tokens and temperature: a ChatRequest, or RequestError."""
        return self.model.check(request)

    def refuse_unsupported(self, sampling: Sampling, stream: bool) -> None:
        if self.engine != "vllm":
            return
        unsupported = [name for name, used in (("top_p", sampling.top_p != 1.0), ("stop", bool(sampling.stop)),
                                               ("seed", sampling.seed is not None), ("stream", stream)) if used]
        if unsupported:
            raise RequestError(f"{', '.join(unsupported)}: not supported with --engine vllm (it passes on "
                               f"{', '.join(VLLM_OPTIONS)})")

    def answer(self, conversations: list[list[dict]], sampling: Sampling, sinks: list | None = None,
               give_up=None) -> list[Answer]:
        """One generate call for checked conversations that share `sampling` (a seed is set by the caller); a
        streamed request's sink is handed its text as it comes."""
        if self.engine == "vllm":
            return self.model.answer(conversations, sampling.max_tokens, sampling.temperature)
        return generate_chat(self.model.model, self.model.tokenizer, conversations, sampling.max_tokens,
                             batch_size=len(conversations), tool_format=getattr(self.model, "tool_format", "auto"),
                             temperature=sampling.temperature, top_p=sampling.top_p, stop=sampling.stop,
                             sinks=sinks, give_up=give_up)

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of a generated text, as the version's training rendered reasoning."""
        [reasoning], [answer] = split_answers(self.model.tokenizer, [text])
        return reasoning, answer

    def completion(self, checked, answer: Answer, model_name: str) -> dict:
        return self.model.completion(checked, answer, model_name)

    def predict(self, prompts: list[str]) -> list[str]:
        return self.model.predict(None, prompts)


def load_version(uri: str, engine: str) -> ServedModel:
    """A registered version ready to answer: its own pyfunc (transformers), or the same model on vLLM."""
    if engine == "vllm":
        from tasks.vllm_engine import load_vllm_version

        return ServedModel(load_vllm_version(uri), engine)
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not hasattr(model, "check"):
        raise TypeError(f"{type(model).__name__} is not a chat model (a task head labels text; it has no chat)")
    return ServedModel(model, engine)
