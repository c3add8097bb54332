"""Generation's linear layers on packed weights (tasks/packed_linears.py): used where they apply, equal to
`F.linear`, renewed when a weight changes, and out of the way of training and autocast."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from tasks.packed_linears import packed_linears, packing_helps

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _ops_run(work) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        work()
    return {event.key for event in profiler.key_averages()}


def test_generation_runs_every_linear_layer_on_packed_weights(tiny_model_dir):
    """The whole answer, prompts' pass and decoding, multiplies through oneDNN's packed op and never through
    PyTorch's ordinary GEMM; the sample prompts answered while training (`fast=False`) keep the ordinary one."""
    from transformers import AutoTokenizer

    from tasks.base_model import load_model
    from tasks.generation import generate_chat

    model, tokenizer = load_model(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "word " * words}] for words in (3, 12)]
    fast = _ops_run(lambda: generate_chat(model, tokenizer, prompts, max_new_tokens=4, batch_size=2))
    assert "mkldnn::_linear_pointwise" in fast
    assert not fast & {"aten::addmm", "aten::mm", "aten::matmul"}
    training = _ops_run(lambda: generate_chat(model, tokenizer, prompts, max_new_tokens=4, batch_size=2, fast=False))
    assert "mkldnn::_linear_pointwise" not in training
    assert all("forward" not in module.__dict__ for module in model.modules())  # the class's forward again


@torch.no_grad()
def test_a_packed_layer_computes_what_f_linear_does_with_the_weight_as_it_is_now():
    layer, inputs = nn.Linear(24, 40), torch.randn(3, 5, 24)
    with packed_linears(layer):
        torch.testing.assert_close(layer(inputs), F.linear(inputs, layer.weight, layer.bias))
        layer.weight.mul_(-2.0)  # changed in place, as an optimiser step or a merge changes it
        torch.testing.assert_close(layer(inputs), F.linear(inputs, layer.weight, layer.bias))
        layer.weight = nn.Parameter(torch.randn(40, 24))  # replaced, as loading weights can
        torch.testing.assert_close(layer(inputs), F.linear(inputs, layer.weight, layer.bias))


def test_gradients_and_autocast_take_the_ordinary_path():
    layer, inputs = nn.Linear(16, 8), torch.randn(4, 16)
    with packed_linears(layer):
        layer(inputs).sum().backward()
        assert layer.weight.grad is not None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(inputs).dtype == torch.bfloat16


def test_weights_other_than_fp32_on_a_cpu_are_not_packed():
    assert packing_helps(nn.Linear(8, 8))
    assert not packing_helps(nn.Linear(8, 8).to(torch.bfloat16))
    assert not packing_helps(nn.Embedding(8, 8))
