"""Causal attention a block of queries at a time gives what the model's own eager attention gives, gradients too."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.llama import modeling_llama

from tasks import causal_attention

CONFIG = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=1,
                     intermediate_size=64, vocab_size=32, attn_implementation="eager")


def packed_rows_mask(lengths: list[list[int]]) -> torch.Tensor:
    """transformers' own additive mask for rows of packed samples, from position_ids restarting per sample."""
    position_ids = torch.tensor([[p for length in row for p in range(length)] for row in lengths])
    embeds = torch.zeros(*position_ids.shape, CONFIG.hidden_size)
    return create_causal_mask(config=CONFIG, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                              position_ids=position_ids)


def attention_and_grads(attention, mask, width, query_width=None):
    torch.manual_seed(0)
    module = modeling_llama.LlamaAttention(CONFIG, layer_idx=0).train()
    heads, kv_heads, head_dim = CONFIG.num_attention_heads, CONFIG.num_key_value_heads, CONFIG.head_dim
    query = torch.randn(2, heads, query_width or width, head_dim, requires_grad=True)
    key, value = (torch.randn(2, kv_heads, width, head_dim, requires_grad=True) for _ in range(2))
    output, _ = attention(module, query, key, value, mask, module.scaling)
    output.backward(torch.randn_like(output))
    return output, query.grad, key.grad, value.grad


@pytest.mark.parametrize("lengths", [[[5, 4, 4], [13]], [[3, 2, 1, 4, 1, 2], [6, 7]]], ids=["13 wide", "odd samples"])
def test_blocks_of_queries_give_eager_attention_and_its_gradients_on_packed_rows(lengths):
    mask = packed_rows_mask(lengths)
    ours = attention_and_grads(causal_attention.causal_blocks_attention, mask, width=13)
    eager = attention_and_grads(modeling_llama.eager_attention_forward, mask, width=13)
    for got, expected in zip(ours, eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_with_a_kv_cache_every_query_sees_every_key_as_in_eager_attention():
    mask = torch.zeros(2, 1, 1, 9)  # one new token against 9 cached keys, no padding
    ours = attention_and_grads(causal_attention.causal_blocks_attention, mask, width=9, query_width=1)
    eager = attention_and_grads(modeling_llama.eager_attention_forward, mask, width=9, query_width=1)
    for got, expected in zip(ours, eager):
        torch.testing.assert_close(got, expected)


def test_the_blocks_really_skip_keys_after_the_last_query_of_a_block(monkeypatch):
    seen, eager = [], modeling_llama.eager_attention_forward

    def recording(module, query, key, value, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2]))
        return eager(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", recording)
    attention_and_grads(causal_attention.causal_blocks_attention, packed_rows_mask([[8], [8]]), width=8)
    assert seen == [(2, 2), (2, 4), (2, 6), (2, 8)]


def test_supported_where_the_model_defines_its_eager_attention():
    causal_attention.register()
    model = LlamaForCausalLM(LlamaConfig(**CONFIG.to_dict() | {"attn_implementation": causal_attention.NAME}))
    assert model.config._attn_implementation == causal_attention.NAME and causal_attention.supported(model)

    class RemoteCodeAttention(nn.Module):  # defined where no eager_attention_forward is
        is_causal, config = True, CONFIG

    assert not causal_attention.supported(nn.Sequential(RemoteCodeAttention()))
