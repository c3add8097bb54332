"""Stage 3, train: a PEFT LoRA adapter (or, for small models, every weight) through the Hugging Face Trainer.

A task head (classification, NER) trains the same way: the base model with a new output layer
(AutoModelFor{Sequence,Token}Classification), PEFT's SEQ_CLS / TOKEN_CLS task type, which trains and saves the head
in full beside the LoRA weights (`modules_to_save`); head.json beside the weights names its task and labels.

The stage knows nothing of MLflow: each logged step goes to the `on_step` callback, which the flow's Prefect task
points at its run. Checkpoints land in `<work dir>/train/checkpoints` every `checkpoint_every` steps; a run cut
off (SIGTERM, or killed outright) resumes from the newest complete one. With DeepSpeed or several processes the
flow runs this stage in `torchrun` workers (tasks/train/launcher.py) attached to the same run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
from datasets import load_from_disk
from peft import LoraConfig, PeftModel, cast_mixed_precision_params, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from conf.schema import TrainConfig
from tasks import causal_attention
from tasks.base_model import load_head_model
from tasks.context import RunContext
from tasks.device import (
    check_compile, check_deepspeed, check_reference_pass, check_sample_prompts, choose_attention, choose_precision,
    name_deepspeed_accelerator,
)
from tasks.generation import SamplePrompts
from tasks.labels import HEAD_TASKS, Head
from tasks.results import TokenizedData, TrainResult
from tasks.train.callbacks import (
    AnswerSamplePrompts, HeldOutLossEvery, HeldOutReport, ProgressBarOnly, SampleLogger, StepLogger, StepMetrics,
)
from tasks.train.choices import TrainChoices, choose_training, inductor_cache, mark_warm
from tasks.train.checkpoints import checkpoints_folder, weights_folder
from tasks.train.collators import training_collator
from tasks.train.loss import TrainedPositionsTrainer
from tasks.train.preference import REFERENCE_ADAPTER, preference_trainer
from tasks.train.stopping import STOP_REQUESTED, StopWhenRequested, TrainingPruned, TrainingStopped

# PEFT's task type for the causal LM (None) and each task head: it picks the PeftModel class, which for a head also
# trains and saves the new output layer in full (modules_to_save).
PEFT_TASK_TYPES = {None: "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}
HEAD_MODULES = ("classifier", "score")  # what transformers names a task head's output layer; PEFT saves them whole


def load_base_for_training(
    model_dir: str, method: str, precision: str, attn: str, trust_remote_code: bool = False, head: Head | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """fp32 weights for LoRA and full training; for QLoRA, 4-bit NF4 with double quantisation, computing in bf16/fp32.
    With `frozen_dtype`, LoRA's frozen base in that 16-bit dtype (PEFT keeps the LoRA weights in fp32).
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

    if frozen_dtype is not None:
        return load(dtype=frozen_dtype)
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


def train(tokens: TokenizedData, model_dir: str, config: TrainConfig, ctx: RunContext, *,
          resume_from: Path | None = None, samples: SamplePrompts | None = None,
          on_step: StepLogger = lambda step, metrics: None, on_samples: SampleLogger = lambda step, rows: None,
          heldout: HeldOutReport | None = None) -> TrainResult:
    """Train and save the adapter (or whole model) with its tokenizer under ctx.work_dir/train, continuing from
    `resume_from` if given. Tokens labelled for a task head train the base model under that head, saved with the
    weights.

    Each logged step goes to `on_step`. With `samples`, the model answers them every few steps and `on_samples` gets
    the answers; with `heldout`, the held-out loss goes to it every few steps. Raises TrainingStopped when
    STOP_REQUESTED ended training early (its checkpoint is saved), TrainingPruned when `heldout` did.
    """
    train_dir, tokenizer_dir, out_dir = tokens.train_dir, tokens.tokenizer_dir, ctx.work_dir / "train"
    seed, trust_remote_code = ctx.seed, ctx.trust_remote_code
    head = Head(tokens.task, tokens.labels) if tokens.task in HEAD_TASKS else None
    name_deepspeed_accelerator()
    precision = choose_precision(config.precision)
    choices_path = out_dir / "choices.json"
    if resume_from is not None and choices_path.exists():
        choices = TrainChoices.load(choices_path)  # a resumed run trains as it began, whatever the cache holds now
    else:
        choices = choose_training(tokens, model_dir, config, precision, ctx.cache_dir)
        choices.save(choices_path)
    attn = choose_attention(config.attn, choices.compile)
    check_deepspeed(config)
    check_sample_prompts(config, samples.every_steps if samples is not None else None)
    check_reference_pass(config)
    check_compile(choices.compile)
    if choices.compile:
        inductor_cache(ctx.cache_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    on_cpu = not torch.cuda.is_available()
    if config.deepspeed is not None:
        import deepspeed

        if on_cpu:
            # On a CPU DeepSpeed compiles its shared-memory all-reduce as it starts (C++, about 2 minutes on 2 cores,
            # again in every new environment); only its inference engine and tensor parallelism call it, ZeRO
            # reduces through gloo. Its table of usable ops is the switch it reads (kept and editable by design).
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Before TrainingArguments, or DeepSpeed goes looking for MPI (and NCCL does not exist on a CPU).
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    if head is not None:
        head = dataclasses.replace(head, pad_token_id=tokenizer.pad_token_id)
        set_seed(seed)  # the new head's weights are drawn as it loads; evaluation draws the same ones as its base
    if attn == causal_attention.NAME:
        causal_attention.register()
    frozen_dtype = choices.frozen_dtype(precision)
    model = load_base_for_training(model_dir, config.method, precision, attn, trust_remote_code, head, frozen_dtype)
    if attn == causal_attention.NAME and not causal_attention.supported(model):
        attn = "eager"  # a model without transformers' per-model eager attention: the plain one, whole
        model.set_attn_implementation(attn)
    if choices.compile:
        # The first layer's input (the frozen embeddings' output) would otherwise need no gradient while every other
        # layer's does: Dynamo would compile that layer's graph a second time.
        model.enable_input_require_grads()
    train_dataset = load_from_disk(str(train_dir))
    packed = "seq_lengths" in train_dataset.column_names
    if packed:
        # Packed rows carry position_ids that restart per sample and no attention mask; transformers derives the
        # per-sample mask from them only without a KV cache (with one, samples see each other).
        model.config.use_cache = False
    if config.init_adapter is not None:
        # Its own LoRA settings (rank, targets) come with it; train.lora is for a new adapter.
        model = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
    elif config.method != "full":
        set_seed(seed)  # LoRA's A matrices are drawn here, before the Trainer seeds anything
        lora = config.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            use_dora=lora.use_dora, use_rslora=lora.use_rslora, task_type=PEFT_TASK_TYPES[head.task if head else None],
            # The new head is trained whole (modules_to_save); "all-linear" would otherwise put LoRA on it too.
            exclude_modules=list(HEAD_MODULES) if head else None,
        ))
    if config.method != "full":
        if frozen_dtype is not None:
            # PEFT's own cast: the frozen base stays 16-bit, every trainable weight in fp32 (a task head's trained
            # copy would otherwise be 16-bit, as the base it was loaded with).
            cast_mixed_precision_params(model, frozen_dtype)
    checkpoints_dir = checkpoints_folder(out_dir)
    preference = config.objective != "sft"
    arguments = dict(
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
        train_sampling_strategy="random" if packed or preference else "group_by_length",
        include_num_input_tokens_seen="all" if packed else "non_padding",
        remove_unused_columns=not packed,  # the collator needs seq_lengths
        disable_tqdm=False,
        dataloader_num_workers=0,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        deepspeed=str(config.deepspeed) if config.deepspeed is not None else None,
        save_on_each_node=config.nodes > 1,  # each node's launcher reads the weights from its own disk
        activation_checkpointing=choices.checkpoints_layers,  # compiled, the partitioner recomputes instead
        activation_checkpointing_kwargs={"use_reentrant": False},
        torch_compile=choices.compile,
    )
    steps, stopper = StepMetrics(on_step), StopWhenRequested()
    callbacks: list[TrainerCallback] = [steps, stopper]
    if samples is not None:
        # Its own tokenizer: generation pads on the left, the collator's must not change.
        sample_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
        callbacks.append(AnswerSamplePrompts(samples, sample_tokenizer, precision, on_samples))
    pruner = None
    if heldout is not None:
        pruner = HeldOutLossEvery(list(load_from_disk(str(tokens.eval_dir))), heldout, precision)
        callbacks.append(pruner)
    if preference:
        trainer = preference_trainer(config.objective, config.preference, arguments, model, train_dataset, tokenizer,
                                     callbacks, reference_is_base=config.init_adapter is None)
    else:
        plain_head = getattr(model.config, "model_type", None) in TrainedPositionsTrainer.PLAIN_HEAD_MODELS
        trainer_class = TrainedPositionsTrainer if head is None and config.deepspeed is None and plain_head else Trainer
        trainer = trainer_class(
            model=model,
            args=TrainingArguments(**arguments),
            train_dataset=train_dataset,
            data_collator=training_collator(tokenizer, packed, attn, head),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    if choices.compile:
        # Accelerate's regional compilation: the decoder layers, all of one class, share one compiled graph, so
        # compiling costs one layer's compile rather than the whole model's (bench/compile.py). Dynamic shapes from
        # the start: packed batches vary in width, and each new width would otherwise compile again. The Trainer
        # does not expose these options of accelerate's TorchDynamoPlugin, so they are set on the one it made.
        dynamo = trainer.accelerator.state.dynamo_plugin
        dynamo.use_regional_compilation, dynamo.dynamic = True, True
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarOnly)
    started = time.perf_counter()
    with choices.compiling():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    if choices.compile:
        mark_warm(ctx.cache_dir, choices.compile_key)
    # Asked during the last step: the Trainer saved its final checkpoint; stop before evaluation and registration.
    if stopper.stopped or STOP_REQUESTED.is_set():
        raise TrainingStopped(output.global_step, checkpoints_dir / f"checkpoint-{output.global_step}")
    if pruner is not None and pruner.stopped_at is not None:
        raise TrainingPruned(pruner.stopped_at, pruner.last_loss)
    weights_dir = weights_folder(out_dir, config.method)
    trainer.save_model(str(weights_dir))  # on every process: under ZeRO-3 the weights are gathered first
    # The Trainer also pickles its arguments there; nothing reads them, and a model folder should hold no pickle.
    (weights_dir / "training_args.bin").unlink(missing_ok=True)
    # PEFT saves every adapter of the model; TRL's frozen reference copy is not part of what was trained.
    shutil.rmtree(weights_dir / REFERENCE_ADAPTER, ignore_errors=True)
    if head is not None:
        head.save(weights_dir)
    return TrainResult(
        weights_dir=weights_dir,
        model_dir=model_dir,
        steps=output.global_step,
        train_seconds=seconds,
        losses=steps.losses,
        tokens_per_second=steps.tokens / seconds,
        precision=precision,
        attn=attn,
        choices=choices.reasons,
    )
