"""Packing is proven on the real model: packed loss equals unpacked loss, and the proof fails without isolation."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import pack_dataset

from conf.schema import TokenizeConfig
from tasks import causal_attention
from tasks.tokenize import ChatEncoder
from tasks.train.collators import training_collator

QUESTIONS = ["Who are you?", "What is the capital of France? Answer in one word.", "Name three colours.",
             "Write a haiku about rain.", "What is 12 times 12?", "Say hello in Spanish."]
ANSWERS = ["I am Ember.", "Paris.", "Red, green and blue.", "Soft rain on the roof,\nwhispers to the sleeping town.",
           "144.", "Hola."]


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def samples(tokenizer):
    encoder = ChatEncoder(tokenizer, TokenizeConfig(max_length=256))
    return [encoder.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}])[0]
            for q, a in zip(QUESTIONS, ANSWERS)]


def unpacked_loss_sum(model, samples) -> tuple[float, int]:
    """Each sample alone: summed token losses and the count of trained tokens."""
    total, count = 0.0, 0
    for sample in samples:
        labels = torch.tensor([sample["labels"]])
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([sample["input_ids"]]), labels=labels).loss
        total, count = total + loss.item() * n, count + n
    return total, count


def packed_loss(model, tokenizer, samples, attn="sdpa", **forward) -> float:
    rows = pack_dataset(Dataset.from_list(samples), 96, strategy="bfd")
    assert 1 < len(rows) < len(samples)  # several rows, and several samples really share a row
    batch = training_collator(tokenizer, packed=True, attn=attn)(list(rows))
    assert "attention_mask" not in batch
    with torch.no_grad():
        return model(**batch, **forward).loss.item()


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"], ids=["rows-kept", "flattened"])
def test_packed_loss_equals_unpacked_loss(model, tokenizer, samples, attn):
    total, count = unpacked_loss_sum(model, samples)
    assert packed_loss(model, tokenizer, samples, attn, use_cache=False) == pytest.approx(total / count, abs=1e-4)


def test_packed_rows_keep_samples_apart_under_causal_blocks_of_eager_attention_too(model_dir, tokenizer, samples):
    """The model's eager attention a block of queries at a time is what `attn: auto` trains with when compiled on a
    CPU (tests/test_causal_attention.py: it equals eager attention whole)."""
    causal_attention.register()
    blocks = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                  attn_implementation=causal_attention.NAME).eval()
    total, count = unpacked_loss_sum(blocks, samples)
    assert packed_loss(blocks, tokenizer, samples, use_cache=False) == pytest.approx(total / count, abs=1e-4)


def test_the_proof_fails_when_samples_can_see_each_other(model, tokenizer, samples):
    total, count = unpacked_loss_sum(model, samples)
    # With a KV cache Hugging Face ignores the packed position_ids when building the mask: attention crosses samples.
    assert abs(packed_loss(model, tokenizer, samples, use_cache=True) - total / count) > 1e-2


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_train_stage_loss_at_trained_positions_only_equals_the_stock_loss_and_its_gradients(
        method, model_dir, tokenizer, samples, tmp_path, monkeypatch):
    """With LoRA the head is frozen; trained in full, the head's weight (tied to the embeddings) gets gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from tasks.train.loss import TrainedPositionsTrainer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    base.config.use_cache = False
    trained = base if method == "full" else get_peft_model(base, LoraConfig(
        r=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))  # LoRA A and B non-zero
    rows = pack_dataset(Dataset.from_list(samples), 96, strategy="bfd")
    batch = training_collator(tokenizer, packed=True, attn="sdpa")(list(rows))
    trainer = TrainedPositionsTrainer(model=trained, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                            report_to="none"))
    monkeypatch.setattr(TrainedPositionsTrainer, "CHUNK", 7)  # several chunks, the last one short
    ours = trainer.compute_loss(trained, dict(batch))
    ours.backward()
    our_gradients = {name: p.grad.clone() for name, p in trained.named_parameters() if p.requires_grad}
    trained.zero_grad()
    assert isinstance(base.lm_head, torch.nn.Linear)  # the head is back after the step
    assert (method == "full") == ("model.embed_tokens.weight" in our_gradients)  # the tied head's, trained in full
    stock = trained(**batch).loss
    stock.backward()
    assert ours.item() == pytest.approx(stock.item(), abs=1e-5)
    # Each gradient tensor within 0.1% of its largest entry (float32 sums in another order: 3e-4 measured here);
    # trained in full, a norm weight deep in the model gets 1.8e-3 (1.6e-3 when the head's chunks were checkpointed).
    differences = {name: float((p.grad - our_gradients[name]).abs().max() / p.grad.abs().max())
                   for name, p in trained.named_parameters() if p.requires_grad}
    assert our_gradients and max(differences.values()) < (1e-3 if method == "lora" else 5e-3)
    assert differences.get("model.embed_tokens.weight", 0) < 1e-3
    items = int((batch["labels"][:, 1:] != -100).sum())  # as the Trainer counts them for gradient accumulation
    assert trainer.compute_loss(trained, dict(batch), num_items_in_batch=2 * items).item() == pytest.approx(
        stock.item() / 2, abs=1e-5)
