"""Stage 3, train: a PEFT LoRA adapter (or, for small models, every weight) through the Hugging Face Trainer.

A task head (classification, NER) trains the same way: the base model with a new output layer
(AutoModelFor{Sequence,Token}Classification), PEFT's SEQ_CLS / TOKEN_CLS task type, which trains and saves the head
in full beside the LoRA weights (`modules_to_save`); head.json beside the weights names its task and labels.

The stage knows nothing of MLflow: each logged step goes to the `on_step` callback, which the Prefect task
points at the flow's run. Checkpoints land in `out_dir/checkpoints` every `checkpoint_every` steps; a run cut
off (SIGTERM, or killed outright) resumes from the newest complete one. With DeepSpeed or several processes the
task launches `torchrun` workers (tasks/train_worker.py) attached to the same run; only rank 0 logs and saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_from_disk
from peft import LoraConfig, cast_mixed_precision_params, get_peft_model, prepare_model_for_kbit_training
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as PaddingFreeCollator

from conf.schema import TrainConfig, UserError, zero_optimization
from tasks import causal_attention
from tasks.base_model import load_head_model
from tasks.generation import SamplePrompts, autocast
from tasks.labels import Head
from tasks.tracking import (
    log_artifact, log_loss_plot, log_metrics, sample_logger, set_tags, step_logger, unlogged_record_path,
)

StepLogger = Callable[[int, dict[str, float]], None]
SampleLogger = Callable[[int, list[dict]], None]

# PEFT's task type for the causal LM (None) and each task head: it picks the PeftModel class, which for a head also
# trains and saves the new output layer in full (modules_to_save).
PEFT_TASK_TYPES = {None: "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}
HEAD_MODULES = ("classifier", "score")  # what transformers names a task head's output layer; PEFT saves them whole

# Set by a SIGTERM handler (stop_on_sigterm); the Trainer checks it after every step, saves a checkpoint, stops.
STOP_REQUESTED = threading.Event()


class TrainSetupError(UserError):
    """The recipe asks for something this machine cannot do; one line for the user."""


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM) after saving a checkpoint; the run can be resumed from it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclass(frozen=True)
class TrainResult:
    """What training produced. `weights_dir` is a PEFT adapter folder, or a whole model folder for method full;
    either holds the tokenizer it was trained with. `losses` are the steps this process ran (a resume runs fewer)."""

    weights_dir: Path
    steps: int
    train_seconds: float
    tokens_per_second: float
    losses: list[float]
    precision: str
    attn: str


def choose_precision(requested: str) -> str:
    """bf16 where the hardware runs it natively (CUDA bf16, or a CPU with AVX512-BF16/AMX), else fp16 on CUDA, else fp32."""
    if requested != "auto":
        if requested == "fp16" and not torch.cuda.is_available():
            raise TrainSetupError("train.precision: fp16 needs a CUDA GPU; use bf16, fp32 or auto on CPU")
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def choose_attention(requested: str, compiled: bool = False) -> str:
    """For `auto`: FlashAttention 2 when CUDA and flash_attn are both present; compiled on a CPU, the model's eager
    attention a block of queries at a time (tasks/causal_attention.py: inductor fuses eager attention's mask and
    fp32 softmax, which trained faster than SDPA's CPU kernel, which inductor leaves as it is: README,
    "train.compile"); else PyTorch SDPA. Never a silent fallback."""
    on_gpu = torch.cuda.is_available()
    flash_ready = on_gpu and importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not flash_ready:
        raise TrainSetupError(
            "train.attn: flash_attention_2 needs a CUDA GPU and the flash-attn package (pip install '.[gpu]'); "
            "use attn: sdpa or auto"
        )
    if requested != "auto":
        return requested
    if flash_ready:
        return "flash_attention_2"
    return causal_attention.NAME if compiled and not on_gpu else "sdpa"


def check_deepspeed(config: TrainConfig) -> None:
    """ZeRO offload moves GPU memory into CPU memory: on a machine without a GPU there is nothing to offload."""
    if config.deepspeed is None or torch.cuda.is_available():
        return
    zero = zero_optimization(config.deepspeed)
    if any(zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param")):
        raise TrainSetupError(f"train.deepspeed: {config.deepspeed} offloads to CPU memory, which needs a CUDA GPU to "
                              "offload from; on a CPU use conf/deepspeed/zero3.json")


def check_compile(config: TrainConfig) -> None:
    """On a CPU inductor compiles the layers to C++ (with `CXX` or g++): without a compiler it would fail mid-step."""
    compiler = os.environ.get("CXX", "g++")
    if config.compile and not torch.cuda.is_available() and shutil.which(compiler) is None:
        raise TrainSetupError(f"train.compile: torch.compile on a CPU needs a C++ compiler ({compiler} not found); "
                              "install one or set compile: false")


def check_sample_prompts(config: TrainConfig, every_steps: int | None) -> None:
    """Answering prompts during QLoRA training on a CPU would run the training 4-bit model under no_grad, after
    which bitsandbytes stops its gradients (see load_base_for_training)."""
    if every_steps is not None and config.method == "qlora" and not torch.cuda.is_available():
        raise TrainSetupError("evaluate.every_steps: answering prompts while QLoRA trains on a CPU stops its gradients "
                              "(bitsandbytes); unset it for method qlora (the evaluation after training still runs)")


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
        self.first_tokens = self.last_tokens = 0
        self.losses: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed Trainer starts from the checkpoint's token count; this process's speed counts from here.
        self.first_tokens = self.last_tokens = int(state.num_input_tokens_seen)
        self.last_time = time.perf_counter()

    @property
    def tokens(self) -> int:
        return self.last_tokens - self.first_tokens

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
            "tokens_seen": float(tokens),
            "peak_memory_mb": peak_memory_mb(),
        }
        self.last_time, self.last_tokens = now, tokens
        self.losses.append(metrics["train_loss"])
        self.on_step(state.global_step, metrics)


class TrainedPositionsTrainer(Trainer):
    """A causal LM's loss with the LM head applied only at positions whose label is trained, a chunk at a time.

    The stock loss makes logits (vocabulary-wide: 49,152 for SmolLM2) at every position, prompt and padding
    included, and keeps them all for backward. Here the model runs with its LM head set aside for the step, so its
    "logits" are the final hidden states; the head's weight is applied to the trained positions only, a chunk at a
    time, each chunk's gradient taken at once (`_HeadLoss`): logits are neither kept for backward nor made again
    there. The sum of cross-entropies is divided as the Trainer's own loss is (by `num_items_in_batch`).
    Hand-written: Liger's fused linear cross-entropy does this on GPUs only, and transformers has no such loss. Not
    used under DeepSpeed, whose ZeRO-3 partitions the head's weight outside its module's forward.
    """

    CHUNK = 1024
    # Model types whose logits are the LM head's output as is: Gemma 2's soft-capping, Cohere's and Granite's logit
    # scales and the like change them after the head, so those models keep the stock loss.
    PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, shift_labels = inputs.pop("labels"), inputs.pop("shift_labels", None)
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        head = causal_lm.lm_head
        causal_lm.lm_head = torch.nn.Identity()
        try:
            hidden = model(**inputs).logits
        finally:
            causal_lm.lm_head = head
        targets = shift_labels if shift_labels is not None else torch.nn.functional.pad(labels[:, 1:], (0, 1),
                                                                                           value=-100)
        trained = targets != -100
        selected, wanted = hidden[trained], targets[trained]
        with self.accelerator.autocast():  # the head in the run's precision, as inside the model's forward
            total = _HeadLoss.apply(selected, head.weight, head.bias, wanted, self.CHUNK)
        loss = total / (num_items_in_batch if num_items_in_batch is not None else max(len(wanted), 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales a normalised loss
        return (loss, None) if return_outputs else loss


class _HeadLoss(torch.autograd.Function):
    """The summed cross-entropy of `linear(states, weight, bias)` against `targets`, `chunk` rows at a time. Each
    chunk's gradients are taken by autograd in forward, while its logits exist, and kept (they are as small as the
    inputs); backward only scales them. The logits are made under the caller's autocast, as the model's head does."""

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk):
        needs = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(t) if need else None for t, need in zip((states, weight, bias), needs)]
        total = states.new_zeros((), dtype=torch.float32)
        for start in range(0, len(states), chunk):
            rows = states[start:start + chunk].detach().requires_grad_(needs[0])
            with torch.enable_grad():
                logits = torch.nn.functional.linear(rows, weight, bias).float()
                loss = torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
            total += loss.detach()
            differentiated = [(t, grad) for t, grad in zip((rows, weight, bias), grads) if grad is not None]
            if differentiated:
                chunk_grads = torch.autograd.grad(loss, [t for t, _ in differentiated])
                for (t, grad), chunk_grad in zip(differentiated, chunk_grads):
                    if t is rows:
                        grad[start:start + chunk] = chunk_grad
                    else:
                        grad += chunk_grad
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return (*(None if grad is None else grad * grad_total for grad in ctx.saved_tensors), None, None)


class _StopWhenRequested(TrainerCallback):
    """After each step: if any process was asked to stop, every process saves a checkpoint and stops together."""

    stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        requested = torch.tensor(float(STOP_REQUESTED.is_set()), device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX)
        if requested.item() and state.global_step < state.max_steps:
            self.stopped = control.should_save = control.should_training_stop = True


class _AnswerSamplePrompts(TrainerCallback):
    """Every `every_steps` steps the model in training answers the fixed sample prompts (greedy), for `on_samples`.

    Every process generates (under ZeRO-3 each holds a shard of the weights the others need); rank 0 logs.
    """

    def __init__(self, samples: SamplePrompts, tokenizer, precision: str, on_samples: SampleLogger):
        self.samples, self.tokenizer, self.precision, self.on_samples = samples, tokenizer, precision, on_samples

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.samples.every_steps:
            return
        model.eval()
        with autocast(self.precision):
            answers = self.samples.answer(model, self.tokenizer)
        model.train()
        self.on_samples(state.global_step, [{"prompt": shown, "answer": answer}
                                            for shown, answer in zip(self.samples.shown, answers)])


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While training, SIGTERM asks for a checkpoint and a clean stop instead of killing the process.

    The request lasts for this training only: it is cleared when the block ends, so a long-lived process (a served
    deployment) starts its next training unstopped. Only the main thread can take signals; elsewhere the process's
    own handling stays as it was.
    """
    STOP_REQUESTED.clear()
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())
    except ValueError:
        previous = None
    try:
        yield
    finally:
        STOP_REQUESTED.clear()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def checkpoints_folder(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def resumable_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint, after removing any newer one cut off mid-save.

    The Trainer writes trainer_state.json last and not atomically (its own `get_last_checkpoint` would pick
    a half-written folder after a kill -9), so this is written here.
    """
    folders = sorted(checkpoints_dir.glob("checkpoint-*"), key=lambda folder: int(folder.name.split("-")[1]))
    while folders and not (folders[-1] / "trainer_state.json").exists():
        shutil.rmtree(folders.pop())
    return folders[-1] if folders else None


class PackedRowsCollator:
    """Packed rows as a (batch, row length) tensor with position_ids restarting per sample and no attention mask,
    from which transformers builds a block-diagonal mask per row.

    TRL's padding-free mode flattens the whole batch into one sequence: right for FlashAttention's variable-length
    kernels, but with SDPA or eager the mask then spans the whole batch (8 rows of 512 tokens: one 4096 x 4096
    mask per layer) and training ran slower than padded batches. TRL has no rows-kept mode without an attention
    mask, hence this wrapper. Each row's padded tail gets position 0 at every token (one-token "samples") and
    label -100; a sample's first token is never a target, so no loss crosses a sample boundary.
    """

    def __init__(self, pad_token_id: int):
        self.collate = PaddingFreeCollator(pad_token_id=pad_token_id, return_position_ids=True)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        del batch["attention_mask"]
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def training_collator(tokenizer, packed: bool, attn: str, head: Head | None = None):
    """Packed rows: flattened into one padding-free sequence for FlashAttention 2, kept as rows otherwise (both
    with position_ids per sample); unpacked samples: padded to the longest in the batch (a task head's labels: one
    per text, or padded with -100 per token)."""
    if head is not None:
        if head.task == "token_classification":
            return DataCollatorForTokenClassification(tokenizer)
        return DataCollatorWithPadding(tokenizer)
    if packed and attn == "flash_attention_2":
        return PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    if packed:
        return PackedRowsCollator(tokenizer.pad_token_id)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def frozen_dtype(method: str, precision: str, low_memory: bool) -> torch.dtype | None:
    """The 16-bit dtype `low_memory` keeps LoRA's frozen base in, or None where the base stays as loaded."""
    if method == "lora" and low_memory and precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return None


def load_base_for_training(
    model_dir: str, method: str, precision: str, attn: str, trust_remote_code: bool = False, head: Head | None = None,
    low_memory: bool = False,
) -> PreTrainedModel:
    """fp32 weights for LoRA and full training; for QLoRA, 4-bit NF4 with double quantisation, computing in bf16/fp32.
    With `low_memory`, LoRA's frozen base in the run's 16-bit precision (PEFT keeps the LoRA weights in fp32).
    With a task head: the same base under a new output layer of len(head.labels) outputs.

    Weights load from safetensors only (never a pickle). On a CPU, bitsandbytes repacks 4-bit weights for
    inference the first time they run under no_grad, after which no gradient flows through them: this model
    must never evaluate or generate; evaluation loads its own.
    """
    def load(**options) -> PreTrainedModel:
        if head is not None:
            return load_head_model(model_dir, head, trust_remote_code, attn_implementation=attn, **options)
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code, **{"dtype": torch.float32} | options)

    if (dtype := frozen_dtype(method, precision, low_memory)) is not None:
        return load(dtype=dtype)
    if method != "qlora":
        return load()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        # A task head is trained whole (modules_to_save): it must stay a plain layer, not a 4-bit one.
        llm_int8_skip_modules=list(HEAD_MODULES) if head is not None else None,
    )
    model = load(quantization_config=quantization, device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def train(
    train_dir: Path, tokenizer_dir: Path, model_dir: str, config: TrainConfig, seed: int, out_dir: Path,
    on_step: StepLogger, resume_from: Path | None = None, trust_remote_code: bool = False,
    samples: SamplePrompts | None = None, on_samples: SampleLogger = lambda step, rows: None, head: Head | None = None,
) -> TrainResult:
    """Train and save the adapter (or whole model) with its tokenizer, continuing from `resume_from` if given.
    With `head`, the base model is trained under that task head, saved with the weights.

    With `samples`, the model answers them every few steps and `on_samples` gets the answers.
    Raises TrainingStopped when STOP_REQUESTED ended training early (its checkpoint is saved).
    """
    precision = choose_precision(config.precision)
    attn = choose_attention(config.attn, config.compile)
    check_deepspeed(config)
    check_sample_prompts(config, samples.every_steps if samples is not None else None)
    check_compile(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    on_cpu = not torch.cuda.is_available()
    if config.deepspeed is not None:
        import deepspeed

        # Before TrainingArguments, or DeepSpeed goes looking for MPI (and NCCL does not exist on a CPU).
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    if head is not None:
        head = dataclasses.replace(head, pad_token_id=tokenizer.pad_token_id)
        set_seed(seed)  # the new head's weights are drawn as it loads; evaluation draws the same ones as its base
    if attn == causal_attention.NAME:
        causal_attention.register()
    model = load_base_for_training(model_dir, config.method, precision, attn, trust_remote_code, head,
                                   config.low_memory)
    if attn == causal_attention.NAME and not causal_attention.supported(model):
        attn = "eager"  # a model without transformers' per-model eager attention: the plain one, whole
        model.set_attn_implementation(attn)
    if config.compile:
        # The first layer's input (the frozen embeddings' output) would otherwise need no gradient while every other
        # layer's does: Dynamo would compile that layer's graph a second time.
        model.enable_input_require_grads()
    train_dataset = load_from_disk(str(train_dir))
    packed = "seq_lengths" in train_dataset.column_names
    if packed:
        # Packed rows carry position_ids that restart per sample and no attention mask; transformers derives the
        # per-sample mask from them only without a KV cache (with one, samples see each other).
        model.config.use_cache = False
    if config.method != "full":
        set_seed(seed)  # LoRA's A matrices are drawn here, before the Trainer seeds anything
        lora = config.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                use_dora=lora.use_dora, use_rslora=lora.use_rslora, task_type=PEFT_TASK_TYPES[head.task if head else None],
                # The new head is trained whole (modules_to_save); "all-linear" would otherwise put LoRA on it too.
                exclude_modules=list(HEAD_MODULES) if head else None,
            ),
        )
        if (dtype := frozen_dtype(config.method, precision, config.low_memory)) is not None:
            # PEFT's own cast: the frozen base stays 16-bit, every trainable weight in fp32 (a task head's trained
            # copy would otherwise be 16-bit, as the base it was loaded with).
            cast_mixed_precision_params(model, dtype)
    checkpoints_dir = checkpoints_folder(out_dir)
    args = TrainingArguments(
        output_dir=str(checkpoints_dir),
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
        save_strategy="steps",
        save_steps=config.checkpoint_every,
        save_total_limit=config.keep_checkpoints,
        report_to="none",
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="random" if packed else "group_by_length",
        include_num_input_tokens_seen="all" if packed else "non_padding",
        remove_unused_columns=not packed,  # the collator needs seq_lengths
        disable_tqdm=False,
        dataloader_num_workers=0,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        deepspeed=str(config.deepspeed) if config.deepspeed is not None else None,
        activation_checkpointing=config.low_memory,  # activations recomputed in backward instead of kept
        activation_checkpointing_kwargs={"use_reentrant": False},
        torch_compile=config.compile,
    )
    steps, stopper = _StepMetrics(on_step), _StopWhenRequested()
    callbacks: list[TrainerCallback] = [steps, stopper]
    if samples is not None:
        # Its own tokenizer: generation pads on the left, the collator's must not change.
        sample_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
        callbacks.append(_AnswerSamplePrompts(samples, sample_tokenizer, precision, on_samples))
    plain_head = getattr(model.config, "model_type", None) in TrainedPositionsTrainer.PLAIN_HEAD_MODELS
    trainer_class = TrainedPositionsTrainer if head is None and config.deepspeed is None and plain_head else Trainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=training_collator(tokenizer, packed, attn, head),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if config.compile:
        # Accelerate's regional compilation: the decoder layers, all of one class, share one compiled graph, so
        # compiling costs one layer's compile rather than the whole model's (bench/compile.py). Dynamic shapes from
        # the start: packed batches vary in width, and each new width would otherwise compile again. The Trainer
        # does not expose these options of accelerate's TorchDynamoPlugin, so they are set on the one it made.
        dynamo = trainer.accelerator.state.dynamo_plugin
        dynamo.use_regional_compilation, dynamo.dynamic = True, True
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_ProgressBarOnly)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    # Asked during the last step: the Trainer saved its final checkpoint; stop before evaluation and registration.
    if stopper.stopped or STOP_REQUESTED.is_set():
        raise TrainingStopped(output.global_step, checkpoints_dir / f"checkpoint-{output.global_step}")
    weights_dir = out_dir / ("model" if config.method == "full" else "adapter")
    trainer.save_model(str(weights_dir))  # on every process: under ZeRO-3 the weights are gathered first
    # The Trainer also pickles its arguments there; nothing reads them, and a model folder should hold no pickle.
    (weights_dir / "training_args.bin").unlink(missing_ok=True)
    if head is not None:
        head.save(weights_dir)
    return TrainResult(
        weights_dir=weights_dir,
        steps=output.global_step,
        train_seconds=seconds,
        losses=steps.losses,
        tokens_per_second=steps.tokens / seconds,
        precision=precision,
        attn=attn,
    )


def train_in_workers(
    train_dir: Path, tokenizer_dir: Path, model_dir: str, config: TrainConfig, seed: int, out_dir: Path, run_id: str,
    resume_from: Path | None = None, trust_remote_code: bool = False, samples: SamplePrompts | None = None,
    head: Head | None = None,
) -> TrainResult:
    """train() in `config.processes` torchrun workers attached to MLflow run `run_id`; rank 0 logs and saves.

    A stop request here (SIGTERM) is passed on to the workers, which checkpoint and stop together.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = out_dir / "worker_spec.json", out_dir / "worker_result.json"
    result_path.unlink(missing_ok=True)
    spec = {
        "train_dir": str(Path(train_dir).resolve()), "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "model_dir": model_dir, "config": config.model_dump(mode="json"), "seed": seed,
        "out_dir": str(out_dir.resolve()), "run_id": run_id,
        "resume_from": str(resume_from) if resume_from else None, "trust_remote_code": trust_remote_code,
        "result_path": str(result_path.resolve()),
        "samples": dataclasses.asdict(samples) if samples is not None else None,
        "head": dataclasses.asdict(head) if head is not None else None,
        "unlogged_record": str(record) if (record := unlogged_record_path(run_id)) is not None else None,
    }
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.processes}",
               "-m", "tasks.train_worker", str(spec_path.resolve())]
    workers = subprocess.Popen(command, env=os.environ | {"MLFLOW_RUN_ID": run_id})
    passed_on = False
    while workers.poll() is None:
        if STOP_REQUESTED.wait(timeout=0.5) and not passed_on:
            workers.send_signal(signal.SIGTERM)
            passed_on = True
    if not result_path.exists():
        raise RuntimeError(f"training workers exited with code {workers.returncode} and no result; see their output above")
    outcome = json.loads(result_path.read_text(encoding="utf-8"))
    if "stopped_at" in outcome:
        raise TrainingStopped(outcome["stopped_at"], Path(outcome["checkpoint"]))
    if STOP_REQUESTED.is_set():  # asked as the workers finished their last step: stop before evaluation
        raise TrainingStopped(outcome["steps"], resumable_checkpoint(checkpoints_folder(out_dir)))
    return TrainResult(**outcome | {"weights_dir": Path(outcome["weights_dir"])})


def result_as_json(result: TrainResult) -> dict:
    return dataclasses.asdict(result) | {"weights_dir": str(result.weights_dir)}


@task(name="train", cache_policy=NO_CACHE)
def train_task(
    train_dir: Path, tokenizer_dir: Path, model_dir: str, config: TrainConfig, seed: int, out_dir: Path, run_id: str,
    resume: bool = False, trust_remote_code: bool = False, samples: SamplePrompts | None = None,
    head: Head | None = None,
) -> TrainResult:
    """train() (in worker processes for DeepSpeed or processes > 1), each step logged to the flow's MLflow run.

    With `resume`, training continues from the newest complete checkpoint in `out_dir`, if there is one. Answers to
    `samples` during training go to the run's table eval/during_training.json.
    """
    resume_from = resumable_checkpoint(checkpoints_folder(out_dir)) if resume else None
    if config.deepspeed is not None or config.processes > 1:
        result = train_in_workers(train_dir, tokenizer_dir, model_dir, config, seed, out_dir, run_id, resume_from,
                                  trust_remote_code, samples, head)
    else:
        result = train(train_dir, tokenizer_dir, model_dir, config, seed, out_dir, step_logger(run_id), resume_from,
                       trust_remote_code, samples, sample_logger(run_id), head)
    set_tags(run_id, {"train.precision_used": result.precision, "train.attn_used": result.attn})
    log_metrics(run_id, {"train_seconds": result.train_seconds, "train_tokens_per_s": result.tokens_per_second})
    log_artifact(run_id, result.weights_dir, "model_full" if config.method == "full" else "adapter_peft")
    log_loss_plot(run_id)
    return result
