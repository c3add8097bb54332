"""A registered task-head model behind MLflow's pyfunc interface: base + PEFT adapter (the trained head saved in
it), or a whole model trained with its head.

Logged with MLflow's models-from-code, as tasks/chat_model.py is (this file travels with the model, with loraflow's
`conf` and `tasks` packages as its code_paths). Texts in (a string, a list of them, or a DataFrame's first
column), one prediction per text out: for text classification `{"label", "score", "scores": {label: probability}}`;
for token classification (NER) the entities found, `[{"entity", "text", "start", "end", "score"}]`, with character
offsets into the text (the text is read as it is, cut into words and punctuation marks as CoNLL data is, each
word tagged by its first sub-token).
"""

from __future__ import annotations

import os

import mlflow
import torch
from transformers import AutoTokenizer

from tasks.base_model import TRUST_REMOTE_CODE_ENV, check_base_identity, load_tuned_head, resolve_base_model
from tasks.device import inference_device
from tasks.labels import Head, entity_spans, word_of_each_token, words_of

BATCH = 16


class TunedHeadModel(mlflow.pyfunc.PythonModel):
    # `predict` takes texts in several shapes, which MLflow's type-hint validation cannot express (see chat_model.py).
    _skip_type_hint_validation = True

    def load_context(self, context):
        weights_dir = context.artifacts["weights"]
        trust_remote_code = os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"
        config = context.model_config
        check_base_identity(config)
        self.head = Head.of(weights_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust_remote_code)
        self.model = load_tuned_head(resolve_base_model(config["base_model"]), weights_dir, self.head,
                                     trust_remote_code).to(inference_device()).eval()
        self.max_length = int(config.get("max_length", 512))

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, str):
            model_input = [model_input]
        elif hasattr(model_input, "to_dict"):  # a DataFrame from the scoring server: its first column
            model_input = list(model_input.iloc[:, 0])
        texts = [str(text) for text in model_input]
        predict = self.entities if self.head.task == "token_classification" else self.classify
        return [prediction for start in range(0, len(texts), BATCH) for prediction in predict(texts[start : start + BATCH])]

    @torch.no_grad()
    def classify(self, texts: list[str]) -> list[dict]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        probabilities = self.model(**batch.to(self.model.device)).logits.float().softmax(-1)
        predictions = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append({"label": self.head.labels[best], "score": round(row[best], 4),
                                "scores": {label: round(p, 4) for label, p in zip(self.head.labels, row)}})
        return predictions

    @torch.no_grad()
    def entities(self, texts: list[str]) -> list[list[dict]]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                               return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping").tolist()
        probabilities = self.model(**batch.to(self.model.device)).logits.float().softmax(-1)
        predictions = []
        for row, text in enumerate(texts):
            words = words_of(text)
            tags, scores, seen = ["O"] * len(words), [1.0] * len(words), set()
            for position, word in enumerate(word_of_each_token(offsets[row], words, text)):
                if word is None or word in seen:  # a word's first sub-token speaks for it, as in training
                    continue
                seen.add(word)
                score, best = probabilities[row, position].max(-1)
                tags[word], scores[word] = self.head.labels[int(best)], float(score)
            predictions.append(entity_spans(words, tags, scores, text))  # words cut off past max_length: O
        return predictions

mlflow.models.set_model(TunedHeadModel())
