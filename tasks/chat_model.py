"""The registered model behind MLflow's pyfunc interface: base + PEFT adapter, or a fully trained model.

Logged with MLflow's models-from-code (this file travels with the model, with loraflow's `conf` and `tasks` packages
as its code_paths), so loading unpickles nothing and needs no loraflow install. It answers plain prompts (a list
of strings in, a list of strings out) and OpenAI-style chat requests ({"messages": [...], "max_tokens",
"temperature"}, one or a list) with OpenAI's chat.completion shape.

The model config names the base model (hub id, folder, or pip:<package>) with what identifies it (hub revision,
package version, folder hash), resolved on load, and the answer length, which
`mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens": N})` overrides. Whether a model's own Python code may
run is never read from the logged model: only the process loading it says so, with LORAFLOW_TRUST_REMOTE_CODE=1
(what `loraflow chat --trust-remote-code` sets).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import mlflow
from transformers import AutoTokenizer

from tasks.base_model import TRUST_REMOTE_CODE_ENV, check_base_identity, load_tuned_model, resolve_base_model
from tasks.device import inference_device
from tasks.generation import Answer, RequestError, chat_prompts, generate_chat, split_answers
from tasks.reasoning import FIELD as REASONING_FIELD

ROLES = ("system", "user", "assistant")
PROMPT_BATCH = 8  # plain prompts are answered this many to a generate call


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request, with its prompt's length in tokens (counted once, for the context check and usage)."""

    messages: list[dict]
    max_tokens: int
    temperature: float
    prompt_tokens: int


class TunedChatModel(mlflow.pyfunc.PythonModel):
    # `predict` takes prompts or chat requests, one or a list, which MLflow's type-hint validation cannot express;
    # without this (MLflow's own switch, as its ChatModel sets) every load warns "Add type hints to `predict`".
    _skip_type_hint_validation = True

    def load_context(self, context):
        weights_dir = context.artifacts["weights"]
        trust_remote_code = os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"
        self.tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)  # its template
        config = context.model_config
        check_base_identity(config)
        base_dir = resolve_base_model(config["base_model"])
        self.model = load_tuned_model(base_dir, weights_dir, trust_remote_code).to(inference_device()).eval()
        self.max_new_tokens = int(config.get("max_new_tokens", 128))
        self.tool_format = config.get("tool_format", "auto")  # how training rendered tool calls
        self.evaluated_answers = context.artifacts.get("evaluated_answers")  # tasks/parity.py; older versions: None
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    def predict(self, context, model_input, params=None):
        """Prompts (strings) in, answers out; chat requests in, chat.completion dicts out."""
        if isinstance(model_input, dict):
            return self.chat(model_input | (params or {}))
        if hasattr(model_input, "to_dict"):  # a DataFrame from the scoring server: its first column
            model_input = list(model_input.iloc[:, 0])
        if model_input and all(isinstance(item, dict) for item in model_input):
            return [self.chat(request | (params or {})) for request in model_input]
        conversations = [[{"role": "user", "content": str(prompt)}] for prompt in model_input]
        outputs = [output.text for start in range(0, len(conversations), PROMPT_BATCH)
                   for output in self.answer(conversations[start : start + PROMPT_BATCH], self.max_new_tokens, 0.0)]
        return split_answers(self.tokenizer, outputs)[1]  # the answers, their reasoning split off

    def check(self, request: dict) -> ChatRequest:
        """The request checked, or RequestError saying what is wrong with it."""
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: a non-empty list of {role, content} turns is required")
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                    message.get("content"), str):
                raise RequestError(f"messages[{number}]: needs role (one of {', '.join(ROLES)}) and string content")
            if not isinstance(message.get(REASONING_FIELD, ""), str):
                raise RequestError(f"messages[{number}].{REASONING_FIELD}: a string")
        max_tokens = request.get("max_tokens", self.max_new_tokens)
        temperature = request.get("temperature", 0.0)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError("max_tokens: a positive whole number")
        if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise RequestError("temperature: a number from 0 to 2")
        prompt_tokens = len(self.tokenizer(chat_prompts(self.tokenizer, [messages])[0], add_special_tokens=False)
                            ["input_ids"])
        if prompt_tokens + max_tokens > self.context_length:
            raise RequestError(f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) exceed the model's "
                               f"context of {self.context_length} tokens")
        return ChatRequest(messages, max_tokens, float(temperature), prompt_tokens)

    def answer(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
               tools: list[list[dict] | None] | None = None, batch_size: int | None = None) -> list[Answer]:
        """Generated texts (reasoning and answer) for checked conversations (offering `tools`), in one generate call
        (as a batch) unless `batch_size` says otherwise."""
        return generate_chat(self.model, self.tokenizer, conversations, max_tokens,
                             batch_size=batch_size or len(conversations), tools=tools, tool_format=self.tool_format,
                             temperature=temperature)

    def completion(self, request: ChatRequest, output: Answer, model_name: str) -> dict:
        """A generated text in OpenAI's chat.completion shape: its reasoning, split off, as `reasoning_content`
        beside the answer (as DeepSeek's and vLLM's reasoning APIs return it)."""
        prompt_tokens = request.prompt_tokens
        completion_tokens = output.tokens
        [reasoning], [answer] = split_answers(self.tokenizer, [output.text])
        message = {"role": "assistant", "content": answer} | ({REASONING_FIELD: reasoning} if reasoning else {})
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "stop" if output.stopped else "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def chat(self, request: dict, model_name: str = "loraflow") -> dict:
        """One OpenAI-style chat request answered as OpenAI's chat.completion."""
        checked = self.check(request)
        [answer] = self.answer([checked.messages], checked.max_tokens, checked.temperature)
        return self.completion(checked, answer, model_name)


mlflow.models.set_model(TunedChatModel())
