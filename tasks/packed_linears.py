"""A frozen model's linear layers on a CPU, run as oneDNN's GEMM on weights reordered once into its blocked layout.

Decoding multiplies a few rows by every weight matrix each step. PyTorch's default CPU GEMM (MKL) packs the weight
into blocks inside every call, which at a few rows costs more than the product; packed once, the weights serve every
step with the same greedy answers (bench/generate.py). Inductor packs weights this way only inside a frozen compiled
graph, and compiling does not pay for one evaluation's prompts; Intel's extension for PyTorch packs eagerly but is
built for its own PyTorch releases. So this hand-writes the swap with the two oneDNN ops Inductor calls.

A packed copy lives beside each weight (the model's linear weights once more in memory) and is packed again when
the weight changes. Anything else (autograd, autocast, another dtype or device) takes the ordinary path.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import psutil
import torch
import torch.nn.functional as F
from torch import nn


def packing_helps(model: nn.Module) -> bool:
    """On a CPU with oneDNN, for fp32 weights whose packed copies, where not packed yet, fit in the memory left over
    with as much again to spare."""
    return _worth_packing(_linears(model))


@contextmanager
def packed_linears(model: nn.Module):
    """Within it, each plain nn.Linear of `model` multiplies by its packed weight when `packing_helps` (a PEFT
    layer's base layer and adapter matrices included; quantised layers are other classes and stay as they are)."""
    linears = _linears(model)
    if not _worth_packing(linears):
        linears = []
    for linear in linears:
        linear.forward = partial(_packed_forward, linear)
    try:
        yield
    finally:
        for linear in linears:
            linear.__dict__.pop("forward", None)  # the class's forward again (a call alongside may have put it back)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [module for module in model.modules() if type(module) is nn.Linear]


def _worth_packing(linears: list[nn.Linear]) -> bool:
    if not linears or not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if any(linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32 for linear in linears):
        return False
    unpacked = sum(linear.weight.nbytes for linear in linears if _current_packing(linear) is None)
    return 2 * unpacked < psutil.virtual_memory().available


def _current_packing(linear: nn.Linear) -> torch.Tensor | None:
    """The packed copy of the layer's weight as it is now: None once the weight was replaced or changed in place."""
    weight, packed = linear.weight, linear.__dict__.get("_packed_weight")
    return packed[2] if packed is not None and packed[0] is weight and packed[1] == weight._version else None


def _packed_forward(linear: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    weight = linear.weight
    if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or inputs.dtype != weight.dtype
            or inputs.device != weight.device):
        return F.linear(inputs, weight, linear.bias)
    packed = _current_packing(linear)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        linear.__dict__["_packed_weight"] = (weight, weight._version, packed)
    return torch.ops.mkldnn._linear_pointwise(inputs, packed, linear.bias, "none", [None], "")
