"""The registered model behind MLflow's pyfunc interface, prompts in, answers out: base + PEFT adapter, or a
fully trained model.

Logged with MLflow's models-from-code (this file travels with the model), so loading unpickles nothing.
The model config names the base model (hub id, folder, or pip:<package>), resolved on load, whether the
model's own code may run, and the answer length, which
`mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens": N})` overrides.
"""

from __future__ import annotations

import mlflow
from transformers import AutoTokenizer

from tasks.base_model import load_tuned_model, resolve_base_model
from tasks.evaluate import generate_answers


class TunedChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        weights_dir = context.artifacts["weights"]
        trust_remote_code = bool(context.model_config.get("trust_remote_code", False))
        self.tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)  # its template
        base_dir = resolve_base_model(context.model_config["base_model"])
        self.model = load_tuned_model(base_dir, weights_dir, trust_remote_code).eval()
        self.max_new_tokens = int(context.model_config.get("max_new_tokens", 128))

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        conversations = [[{"role": "user", "content": prompt}] for prompt in model_input]
        return generate_answers(self.model, self.tokenizer, conversations, self.max_new_tokens, batch_size=8)


mlflow.models.set_model(TunedChatModel())
