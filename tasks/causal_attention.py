"""Causal attention a block of queries at a time: what `attn: auto` trains with when compiled on a CPU.

Compiled by inductor, transformers' eager attention (scores, mask, fp32 softmax, weighted sum) trains faster on a
CPU than SDPA's kernel (docs/training.md, "train.compile"), but it computes and keeps every query x key score of a row, the
masked ones too: 9 heads x 512 x 512 fp32 scores a row for SmolLM2. A causal query never sees the keys after it,
so here a row's queries go through the model's own eager attention QUERY_BLOCKS blocks at a time, each block with
only the keys up to its last query: the same result (a masked score is exactly 0 after the softmax), 5/8 of the
scores with 4 blocks, and blocks small enough to stay in the CPU's cache (bench/attention.py). Hand-written:
PyTorch's flex_attention, which skips masked blocks, has no backward pass on a CPU, and transformers has no such
attention.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "loraflow_causal_blocks"
QUERY_BLOCKS = 4


def _eager_attention(module: nn.Module):
    """The eager attention of the model that `module` belongs to (transformers defines one per model)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def causal_blocks_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention signature; the output as the model's eager attention gives it, no weights."""
    eager = _eager_attention(module)
    width = query.shape[2]
    if attention_mask is None or not getattr(module, "is_causal", False) or key.shape[2] != width:
        # No causal mask, a non-causal layer, or a KV cache (generation): every key for every query, as eager does.
        return eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    outputs = []
    for block in range(QUERY_BLOCKS):
        start, end = width * block // QUERY_BLOCKS, width * (block + 1) // QUERY_BLOCKS
        output, _ = eager(module, query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                          attention_mask[:, :, start:end, :end], scaling, dropout, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1), None


def register() -> None:
    """Makes NAME an `attn_implementation` transformers knows, with eager attention's additive masks."""
    AttentionInterface.register(NAME, causal_blocks_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def supported(model: PreTrainedModel) -> bool:
    """Whether every attention layer of the model has a model-level eager attention to run block by block."""
    layers = [module for module in model.modules() if hasattr(module, "is_causal") and hasattr(module, "config")]
    return bool(layers) and all(_eager_attention(layer) is not None for layer in layers)
