"""What this machine can run: precision, attention, DeepSpeed offload, compile, and where a model is placed. Each
choice is made once here and never falls back silently; a recipe the machine cannot run gets one line."""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil

import torch

from conf.schema import TrainConfig, UserError, zero_optimization
from tasks import causal_attention


class TrainSetupError(UserError):
    """The recipe asks for something this machine cannot do; one line for the user."""


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
    fp32 softmax, which trained faster than SDPA's CPU kernel, which inductor leaves as it is: docs/training.md,
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


def check_compile(compiled: bool | str) -> None:
    """On a CPU inductor compiles the layers to C++ (with `CXX` or g++): without a compiler it would fail mid-step.
    (`auto` never compiles without one.)"""
    compiler = os.environ.get("CXX", "g++")
    if compiled is True and not torch.cuda.is_available() and shutil.which(compiler) is None:
        raise TrainSetupError(f"train.compile: torch.compile on a CPU needs a C++ compiler ({compiler} not found); "
                              "install one or set compile: false")


def check_sample_prompts(config: TrainConfig, every_steps: int | None) -> None:
    """Answering prompts during QLoRA training on a CPU would run the training 4-bit model under no_grad, after
    which bitsandbytes stops its gradients (see load_base_for_training)."""
    if every_steps is not None and config.method == "qlora" and not torch.cuda.is_available():
        raise TrainSetupError("evaluate.every_steps: answering prompts while QLoRA trains on a CPU stops its gradients "
                              "(bitsandbytes); unset it for method qlora (the evaluation after training still runs)")


def check_reference_pass(config: TrainConfig) -> None:
    """DPO's reference pass and KTO's KL pass run the 4-bit base under no_grad, after which bitsandbytes on a CPU stops
    its gradients (see load_base_for_training); ORPO and SimPO have no such pass."""
    if config.objective in ("dpo", "kto") and config.method == "qlora" and not torch.cuda.is_available():
        raise TrainSetupError(f"train.method: qlora with objective {config.objective} runs its reference pass under "
                              "no_grad, which stops QLoRA's gradients on a CPU (bitsandbytes); on a CPU use method lora "
                              "(low_memory for less memory), or objective orpo or simpo (no reference pass)")


def name_deepspeed_accelerator() -> None:
    """DeepSpeed (which the Trainer imports when it is installed) probes for an accelerator and warns when it settles
    on the CPU; on a machine without CUDA it is told so outright."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated by torch on a GPU; on a CPU the process's peak resident set (Linux: KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inference_device() -> str:
    """Where evaluation and serving put a model: the GPU when there is one (autocast on CUDA does nothing for a model
    left on the CPU)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(precision: str):
    """Evaluation runs in the precision training used (bf16 or fp16 autocast over fp32 weights, or plain fp32).

    On this CPU bf16 scores 38 blocks of 256 tokens in 17.7 s instead of 29.0 s; the loss moved by 0.0004.
    """
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(inference_device(), dtype=dtype, enabled=precision in ("bf16", "fp16"))
