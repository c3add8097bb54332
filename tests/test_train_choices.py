"""What `auto` becomes in train.compile, train.low_memory and train.frozen_base, on a short and a long run: the
decision and its reason, never the speed (tasks/train/choices.py; bench/compile.py and bench/train.py measure)."""

from pathlib import Path

import pytest
import torch

from conf.schema import TrainConfig
from tasks.device import TrainSetupError
from tasks.results import TokenizedData
from tasks.train.choices import COMPILE_PAYS_AFTER_TOKENS, choose_training, compile_key, mark_warm

ROW_TOKENS = 256


def tokens(task: str = "causal_lm") -> TokenizedData:
    """Packed rows of 256 tokens each (only the counts matter here)."""
    return TokenizedData(train_dir=Path("."), eval_dir=Path("."), tokenizer_dir=Path("."), train_samples=400,
                         train_rows=100, eval_samples=10, train_tokens=100 * ROW_TOKENS, rejected={}, truncated=0,
                         cache_key="k", cache_hit=False, task=task)


def steps_for(planned: int, batch_size: int = 2) -> int:
    return -(-planned // (batch_size * ROW_TOKENS))


SHORT = steps_for(COMPILE_PAYS_AFTER_TOKENS["warm"] // 2)
BETWEEN = steps_for((COMPILE_PAYS_AFTER_TOKENS["warm"] + COMPILE_PAYS_AFTER_TOKENS["cold"]) // 2)
LONG = steps_for(2 * COMPILE_PAYS_AFTER_TOKENS["cold"])


@pytest.fixture
def cpu_with_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty: a new machine
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    return tmp_path


def choose(folder: Path, precision: str = "bf16", task: str = "causal_lm", **train):
    config = TrainConfig(**{"batch_size": 2} | train)
    return choose_training(tokens(task), "no-such-model", config, precision, folder)


def test_a_short_run_stays_eager_keeps_its_activations_and_a_16bit_base(cpu_with_compiler):
    choices = choose(cpu_with_compiler, max_steps=SHORT)
    assert (choices.compile, choices.recompute, choices.frozen_16bit) == (False, False, True)
    assert choices.reasons["compile"].startswith("false: ") and "(cold cache)" in choices.reasons["compile"]
    assert choices.reasons["low_memory"] == "false: not compiled, recomputing would cost speed"
    assert choices.frozen_dtype("bf16") == torch.bfloat16 and choices.frozen_dtype("fp16") == torch.float16


def test_a_long_run_compiles_and_recomputes_activations(cpu_with_compiler):
    choices = choose(cpu_with_compiler, max_steps=LONG)
    assert (choices.compile, choices.recompute, choices.frozen_16bit) == (True, True, True)
    planned = LONG * 2 * ROW_TOKENS
    assert choices.reasons["compile"] == (f"true: {planned:,} tokens planned, compiling pays after "
                                          f"{COMPILE_PAYS_AFTER_TOKENS['cold']:,} (cold cache)")
    assert choices.reasons["low_memory"].startswith("true: compiled")


def test_a_run_between_the_break_evens_compiles_only_once_this_machine_compiled_its_setup(cpu_with_compiler):
    assert not choose(cpu_with_compiler, max_steps=BETWEEN).compile
    config = TrainConfig(batch_size=2, max_steps=BETWEEN)
    mark_warm(cpu_with_compiler, compile_key("no-such-model", config, "bf16", True, True, "causal_lm"))
    warm = choose(cpu_with_compiler, max_steps=BETWEEN)
    assert warm.compile and "(warm cache)" in warm.reasons["compile"]
    assert not choose(cpu_with_compiler, max_steps=BETWEEN, lora={"r": 8}).compile  # another setup: still cold
    assert not choose(cpu_with_compiler, max_steps=SHORT).compile  # under even the warm break-even


def test_the_recipe_overrides_each_choice(cpu_with_compiler):
    choices = choose(cpu_with_compiler, max_steps=LONG, compile=False, low_memory=True, frozen_base="fp32")
    assert (choices.compile, choices.recompute, choices.frozen_16bit) == (False, True, False)
    assert set(choices.reasons.values()) == {"false: set by the recipe", "true: set by the recipe",
                                             "fp32: set by the recipe"}
    short = choose(cpu_with_compiler, max_steps=SHORT, compile=True)
    assert short.compile and short.recompute  # low_memory auto follows the compile it got


@pytest.mark.parametrize(("train", "task", "reason"), [
    ({"method": "qlora"}, "causal_lm", "false: method qlora (bitsandbytes' 4-bit layers)"),
    ({"objective": "dpo"}, "causal_lm", "false: objective dpo (measured for SFT)"),
    ({"processes": 2}, "causal_lm", "false: torchrun workers (measured in one process)"),
    ({}, "sequence_classification", "false: a task head (measured for the causal LM)"),
], ids=["qlora", "dpo", "workers", "head"])
def test_auto_does_not_compile_what_was_not_measured_to_pay(cpu_with_compiler, train, task, reason):
    choices = choose(cpu_with_compiler, task=task, max_steps=LONG, **train)
    assert not choices.compile and choices.reasons["compile"] == reason and not choices.recompute


def test_auto_does_not_compile_without_a_compiler_or_on_a_gpu(cpu_with_compiler, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert choose(cpu_with_compiler, max_steps=LONG).reasons["compile"] == "false: no C++ compiler (g++) for inductor"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = choose(cpu_with_compiler, max_steps=LONG).reasons["compile"]
    assert on_gpu == "false: measured slower on a GPU (docs/benchmarks-gpu.md)"


def test_the_frozen_base_stays_fp32_where_16bit_does_not_apply(cpu_with_compiler):
    assert choose(cpu_with_compiler, "fp32", max_steps=SHORT).reasons["frozen_base"] == "fp32: precision fp32"
    assert choose(cpu_with_compiler, max_steps=SHORT, method="full").reasons["frozen_base"] == "fp32: method full"
    workers = choose(cpu_with_compiler, max_steps=SHORT, processes=2)
    assert workers.reasons["frozen_base"] == "fp32: torchrun workers (measured in one process)"
    assert choose(cpu_with_compiler, max_steps=SHORT, processes=2, low_memory=True).frozen_16bit  # as low_memory was
    with pytest.raises(TrainSetupError, match="frozen_base: 16bit needs precision bf16 or fp16"):
        choose(cpu_with_compiler, "fp32", max_steps=SHORT, frozen_base="16bit")
    with pytest.raises(ValueError, match="frozen_base: 16bit is for method lora"):
        TrainConfig(method="qlora", frozen_base="16bit")
