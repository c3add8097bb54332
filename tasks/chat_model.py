"""The registered model: base model + PEFT adapter behind MLflow's pyfunc interface, prompts in, answers out.

Logged with MLflow's models-from-code (this file travels with the model), so loading unpickles nothing.
The model config names the base model (hub id, folder, or pip:<package>), resolved on load, and the answer
length, which `mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens": N})` overrides.
"""

from __future__ import annotations

import mlflow
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.base_model import resolve_base_model
from tasks.evaluate import generate_answers


class AdapterChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        model_dir = resolve_base_model(context.model_config["base_model"])
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["adapter"])  # with its chat template
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()
        self.max_new_tokens = int(context.model_config.get("max_new_tokens", 128))

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        conversations = [[{"role": "user", "content": prompt}] for prompt in model_input]
        return generate_answers(self.model, self.tokenizer, conversations, self.max_new_tokens, batch_size=8)


mlflow.models.set_model(AdapterChatModel())
