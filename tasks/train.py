"""Stage 3, train: a PEFT LoRA adapter on the tokenized data, through the Hugging Face Trainer.

The stage knows nothing of MLflow: each logged step goes to the `on_step` callback, which the Prefect task
points at the flow's run.
"""

from __future__ import annotations

import importlib.util
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as PaddingFreeCollator

from conf.schema import TrainConfig, UserError
from tasks.tracking import log_artifact, log_loss_plot, log_metrics, set_tags, step_logger

StepLogger = Callable[[int, dict[str, float]], None]


class TrainSetupError(UserError):
    """The recipe asks for something this machine cannot do; one line for the user."""


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    train_seconds: float
    tokens_per_second: float
    losses: list[float]
    precision: str
    attn: str

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def choose_precision(requested: str) -> str:
    """bf16 where the hardware runs it natively (CUDA bf16, or a CPU with AVX512-BF16/AMX), else fp16 on CUDA, else fp32."""
    if requested != "auto":
        if requested == "fp16" and not torch.cuda.is_available():
            raise TrainSetupError("train.precision: fp16 needs a CUDA GPU; use bf16, fp32 or auto on CPU")
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def choose_attention(requested: str) -> str:
    """FlashAttention 2 when CUDA and flash_attn are both present, else PyTorch SDPA; never a silent fallback."""
    flash_ready = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not flash_ready:
        raise TrainSetupError(
            "train.attn: flash_attention_2 needs a CUDA GPU and the flash-attn package (pip install '.[gpu]'); "
            "use attn: sdpa or auto"
        )
    if requested == "auto":
        return "flash_attention_2" if flash_ready else "sdpa"
    return requested


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated by torch on a GPU; on a CPU the process's peak resident set (Linux: KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _ProgressBarOnly(ProgressCallback):
    """The Trainer's progress bar without its per-step dict printout (the steps go to MLflow instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class _StepMetrics(TrainerCallback):
    """Turn the Trainer's per-step logs into loss, learning rate, grad norm and non-padding tokens/s."""

    def __init__(self, on_step: StepLogger):
        self.on_step = on_step
        self.last_time = time.perf_counter()
        self.last_tokens = 0
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = int(state.num_input_tokens_seen)
        metrics = {
            "train_loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs.get("grad_norm", 0.0)),
            "tokens_per_s": (tokens - self.last_tokens) / max(now - self.last_time, 1e-9),
            "peak_memory_mb": peak_memory_mb(),
        }
        self.last_time, self.last_tokens = now, tokens
        self.losses.append(metrics["train_loss"])
        self.on_step(state.global_step, metrics)


def training_collator(tokenizer, packed: bool):
    """Packed rows: TRL's padding-free collator (one sequence per batch, position_ids per sample); else padding."""
    if packed:
        return PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def load_base_for_training(model_dir: str, method: str, precision: str, attn: str) -> PreTrainedModel:
    """The frozen base: fp32 weights for LoRA; for QLoRA, 4-bit NF4 with double quantisation, computing in bf16/fp32.

    On a CPU, bitsandbytes repacks 4-bit weights for inference the first time they run under no_grad, after
    which no gradient flows through them: this model must never evaluate or generate; evaluation loads its own.
    """
    if method == "lora":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn, quantization_config=quantization,
        device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"},
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def train(
    train_dir: Path, tokenizer_dir: Path, model_dir: str, config: TrainConfig, seed: int, out_dir: Path,
    on_step: StepLogger,
) -> TrainResult:
    """Fine-tune a LoRA adapter and save it (PEFT format, with the tokenizer it was trained with) to `out_dir/adapter`."""
    precision = choose_precision(config.precision)
    attn = choose_attention(config.attn)
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_base_for_training(model_dir, config.method, precision, attn)
    train_dataset = load_from_disk(str(train_dir))
    packed = "seq_lengths" in train_dataset.column_names
    if packed:
        # Packed rows are flattened into one padding-free sequence whose position_ids restart per sample; the
        # attention mask is derived from them only without a KV cache (with one, samples see each other).
        model.config.use_cache = False
    lora = config.lora
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            use_dora=lora.use_dora, use_rslora=lora.use_rslora, task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="cosine",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="random" if packed else "group_by_length",
        include_num_input_tokens_seen="all" if packed else "non_padding",
        remove_unused_columns=not packed,  # the collator needs seq_lengths
        disable_tqdm=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    steps = _StepMetrics(on_step)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=training_collator(tokenizer, packed),
        callbacks=[steps],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_ProgressBarOnly)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=output.global_step,
        train_seconds=seconds,
        losses=steps.losses,
        tokens_per_second=trainer.state.num_input_tokens_seen / seconds,
        precision=precision,
        attn=attn,
    )


@task(name="train", cache_policy=NO_CACHE)
def train_task(
    train_dir: Path, tokenizer_dir: Path, model_dir: str, config: TrainConfig, seed: int, out_dir: Path, run_id: str
) -> TrainResult:
    """train(), each step logged to the flow's MLflow run, the adapter folder logged as an artifact."""
    result = train(train_dir, tokenizer_dir, model_dir, config, seed, out_dir, step_logger(run_id))
    set_tags(run_id, {"train.precision_used": result.precision, "train.attn_used": result.attn})
    log_metrics(run_id, {"train_seconds": result.train_seconds, "train_tokens_per_s": result.tokens_per_second})
    log_artifact(run_id, result.adapter_dir, "adapter_peft")
    log_loss_plot(run_id, result.losses)
    return result
