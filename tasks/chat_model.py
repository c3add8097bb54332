"""The registered model behind MLflow's pyfunc interface, prompts in, answers out: base + PEFT adapter, or a
fully trained model.

Logged with MLflow's models-from-code (this file travels with the model), so loading unpickles nothing.
The model config names the base model (hub id, folder, or pip:<package>), resolved on load, and the answer
length, which `mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens": N})` overrides. Whether a model's own
Python code may run is never read from the logged model: only the process loading it says so, with
LORAFLOW_TRUST_REMOTE_CODE=1 (what `loraflow chat --trust-remote-code` sets).
"""

from __future__ import annotations

import os

import mlflow
from transformers import AutoTokenizer

from tasks.base_model import load_tuned_model, resolve_base_model
from tasks.generation import generate_answers

TRUST_REMOTE_CODE_ENV = "LORAFLOW_TRUST_REMOTE_CODE"


class TunedChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        weights_dir = context.artifacts["weights"]
        trust_remote_code = os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"
        self.tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)  # its template
        base_dir = resolve_base_model(context.model_config["base_model"])
        self.model = load_tuned_model(base_dir, weights_dir, trust_remote_code).eval()
        self.max_new_tokens = int(context.model_config.get("max_new_tokens", 128))

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        conversations = [[{"role": "user", "content": prompt}] for prompt in model_input]
        return generate_answers(self.model, self.tokenizer, conversations, self.max_new_tokens, batch_size=8)


mlflow.models.set_model(TunedChatModel())
