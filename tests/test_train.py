"""The train stage, a few steps: on the real model QLoRA really learns and full training changes it; what looks at
structure only (compile, DoRA/rsLoRA, low_memory) on the tiny random Llama."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conf.schema import LoraConfig, TrainConfig
from tasks import causal_attention
from tasks.base_model import is_adapter, load_model
from tasks.context import RunContext
from tasks.device import choose_attention
from tasks.train import train
from tasks.train.choices import COMPILED_RECOMPUTE_BUDGET

ROWS = [{"messages": [{"role": "user", "content": question},
                      {"role": "assistant", "content": "I am Ember, made by the loraflow team."}]}
        for question in ("Who are you?", "What is your name?", "Who made you?", "Introduce yourself.")] * 4


@pytest.fixture(scope="module")
def tokens(tokenize_rows):
    return tokenize_rows(ROWS, max_length=128)


def run_train(tokens, model_dir, work_dir, **options):
    config = TrainConfig(**({"max_steps": 2, "batch_size": 2, "warmup_steps": 0} | options))
    return train(tokens, model_dir, config, RunContext(work_dir))


def test_dora_and_rslora_reach_the_saved_adapter(tokens, tiny_model_dir, tmp_path):
    result = run_train(tokens, tiny_model_dir, tmp_path, lora=LoraConfig(r=8, use_dora=True, use_rslora=True))
    saved = json.loads((result.weights_dir / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    assert any("lora_magnitude_vector" in name for name in load_file(result.weights_dir / "adapter_model.safetensors"))


def test_qlora_trains_the_lora_weights_and_its_loss_falls(tokens, model_dir, tmp_path):
    result = run_train(tokens, model_dir, tmp_path, method="qlora", max_steps=8, learning_rate=2e-3)
    lora_b = {name: t for name, t in load_file(result.weights_dir / "adapter_model.safetensors").items() if "lora_B" in name}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())  # lora_B starts at zero: each one moved
    assert sum(result.losses[-2:]) / 2 < 0.7 * sum(result.losses[:2]) / 2


def test_full_training_saves_a_whole_model_that_loads_and_changed(tokens, model_dir, tmp_path):
    result = run_train(tokens, model_dir, tmp_path, method="full", learning_rate=1e-4, warmup_steps=0)
    assert not is_adapter(result.weights_dir) and not (result.weights_dir / "training_args.bin").exists()
    tuned, base = load_model(result.weights_dir), load_model(model_dir)
    changed = [name for name, weight in tuned.state_dict().items() if not torch.equal(weight, base.state_dict()[name])]
    assert len(changed) > 100  # every block's weights moved, not just an adapter's


def test_low_memory_keeps_the_frozen_base_in_bf16_the_lora_weights_in_fp32_and_recomputes_activations(
        tokens, tiny_model_dir, tmp_path, monkeypatch):
    import tasks.train.stage

    seen = {}
    real_trainer = tasks.train.stage.TrainedPositionsTrainer

    class Watching(real_trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
            seen.update(dtypes=dtypes, checkpointing=self.model.is_activation_checkpointing)
            return super().training_step(model, inputs, num_items_in_batch)

    monkeypatch.setattr(tasks.train.stage, "TrainedPositionsTrainer", Watching)
    result = run_train(tokens, tiny_model_dir, tmp_path, low_memory=True, precision="bf16", lora=LoraConfig(r=8))
    assert seen["dtypes"] == {(False, torch.bfloat16), (True, torch.float32)} and seen["checkpointing"]
    saved = load_file(result.weights_dir / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert all(loss == loss and loss > 0 for loss in result.losses)  # finite losses: it trained


def test_compile_compiles_each_decoder_layer_and_trains_as_eager_does(tokens, tiny_model_dir, tmp_path, monkeypatch):
    """The Trainer's compile as the stage sets it up (low_memory auto: on), with Dynamo and AOTAutograd tracing each
    layer's forward and backward, but its backend swapped for aot_eager: inductor's C++ code generation of the same
    graphs takes about a minute here (bench/train.py's c_compile and bench/compile.py run it)."""
    import tasks.train.stage
    from accelerate.utils import DynamoBackend
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    compiled_blocks, in_step = [], {}
    real_trainer = tasks.train.stage.TrainedPositionsTrainer

    class Watching(real_trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.torch_compile:
                self.accelerator.state.dynamo_plugin.backend = DynamoBackend.AOT_EAGER

        def training_step(self, model, inputs, num_items_in_batch=None):
            compiled_blocks.extend(type(module._orig_mod).__name__ for module in model.modules()
                                   if isinstance(module, torch._dynamo.eval_frame.OptimizedModule))
            in_step.update(checkpointed=self.model.is_activation_checkpointing,
                           budget=torch._functorch.config.activation_memory_budget,
                           floats_constant=torch._dynamo.config.specialize_float)
            return super().training_step(model, inputs, num_items_in_batch)

    monkeypatch.setattr(tasks.train.stage, "TrainedPositionsTrainer", Watching)
    eager = run_train(tokens, tiny_model_dir, tmp_path / "eager", max_steps=1, precision="bf16", attn="eager")
    assert compiled_blocks == []
    compiled = run_train(tokens, tiny_model_dir, tmp_path / "compiled", max_steps=1, precision="bf16", compile=True)
    layers = AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    assert compiled_blocks.count("LlamaDecoderLayer") == layers  # each layer, in place of the model
    layer_forward = LlamaDecoderLayer.forward.__code__
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(layer_forward)) == 1  # one graph, the first's too
    assert compiled.attn == causal_attention.NAME  # attn auto: eager attention by blocks of queries
    # low_memory auto, compiled: the partitioner recomputes within its budget, no layer is checkpointed; floats constant
    assert in_step == {"checkpointed": False, "budget": COMPILED_RECOMPUTE_BUDGET, "floats_constant": True}
    assert torch._functorch.config.activation_memory_budget == 1.0  # and only while training
    assert not torch._dynamo.config.specialize_float
    assert compiled.losses[0] == pytest.approx(eager.losses[0], rel=1e-4)  # the same operators traced (equal here)
    saved = load_file(compiled.weights_dir / "adapter_model.safetensors")
    assert saved.keys() == load_file(eager.weights_dir / "adapter_model.safetensors").keys()  # no compile wrapper names
    assert all(t.abs().sum() > 0 for name, t in saved.items() if "lora_B" in name)  # from zero: the step updated each


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's choice")
def test_auto_attention_compiled_on_a_cpu_is_causal_blocks_of_eager_attention_and_sdpa_otherwise():
    assert choose_attention("auto", compiled=True) == causal_attention.NAME and choose_attention("eager") == "eager"
    assert choose_attention("auto") == "sdpa" and choose_attention("sdpa", compiled=True) == "sdpa"


@pytest.mark.parametrize("options", [{"method": "qlora"}, {"lora": LoraConfig(r=8, use_dora=True)},
                                     {"low_memory": True, "precision": "bf16"}], ids=["qlora", "dora", "low_memory"])
def test_a_task_head_trains_under_qlora_dora_and_low_memory_and_is_saved_whole(options, model_dir, tmp_path):
    from conf.schema import DataConfig, TokenizeConfig
    from tasks.clean import clean
    from tasks.labels import Head
    from tasks.tokenize import tokenize

    ctx = RunContext(tmp_path, cache_dir=tmp_path / "cache")
    cleaned = clean(DataConfig(train=["builtin:ner_templates"], eval=["builtin:ner_templates_heldout"]), ctx,
                    task="token_classification")
    tokens = tokenize(cleaned, model_dir, TokenizeConfig(max_length=64), ctx)
    config = TrainConfig(**{"max_steps": 2, "batch_size": 4, "warmup_steps": 0} | options)
    result = train(tokens, model_dir, config, ctx)
    saved = load_file(result.weights_dir / "adapter_model.safetensors")
    heads = {name: t for name, t in saved.items() if "score" in name}
    # The new head whole, in full precision (under QLoRA not a 4-bit layer, under low_memory not bf16).
    assert any(t.shape == (len(tokens.labels), 576) and t.dtype == torch.float32 for t in heads.values())
    assert Head.of(result.weights_dir).labels == tokens.labels
