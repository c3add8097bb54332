"""On a CUDA GPU: evaluation and the sample answers given during training run on the GPU, with the CPU's results.

Skipped where there is no GPU (CI has none); `bench/gpu.sh` runs this file on a machine that has one.
"""

import json

import pytest
import torch
from datasets import load_from_disk

from conf.schema import EvaluateConfig, TokenizeConfig, TrainConfig
from tasks.base_model import load_model
from tasks.context import RunContext
from tasks.evaluate import evaluate_model, heldout_loss
from tasks.generation import SamplePrompts
from tasks.results import CleanResult, ModelSource, PreparedData
from tasks.tokenize import tokenize
from tasks.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS = [{"messages": [{"role": "user", "content": f"Question {n}: who are you?"},
                      {"role": "assistant", "content": f"I am Ember, answer {n}."}]} for n in range(8)]


@pytest.fixture(scope="module")
def data(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    cleaned = CleanResult.of_files(rows, rows)
    return PreparedData(cleaned, tokenize(cleaned, model_dir, TokenizeConfig(max_length=128), RunContext(folder)))


def test_evaluation_puts_the_model_on_the_gpu_and_measures_the_cpus_loss(data, model_dir, tmp_path):
    cpu_loss = heldout_loss(load_model(model_dir).eval(), list(load_from_disk(str(data.tokens.eval_dir))))
    torch.cuda.reset_peak_memory_stats()
    result = evaluate_model(data, ModelSource(model_dir), EvaluateConfig(metrics=[]), RunContext(tmp_path),
                            precision="fp32", identity_name="Ember")
    weight_bytes = sum(p.numel() * 4 for p in load_model(model_dir).parameters())
    assert torch.cuda.max_memory_allocated() >= weight_bytes  # the fp32 weights were on the GPU
    assert result.metrics["eval_loss"] == pytest.approx(cpu_loss, rel=1e-3)


def test_sample_answers_during_training_are_generated_on_the_gpu(data, model_dir, tmp_path):
    answered = []
    prompts = SamplePrompts([[{"role": "user", "content": "Who are you?"}]], ["Who are you?"], chat=True,
                            every_steps=1, max_new_tokens=8)
    config = TrainConfig(max_steps=2, batch_size=2, warmup_steps=0, precision="bf16")
    train(data.tokens, model_dir, config, RunContext(tmp_path),
          samples=prompts, on_samples=lambda step, rows: answered.append((step, [row["prompt"] for row in rows])))
    assert answered == [(1, ["Who are you?"]), (2, ["Who are you?"])]  # answered at each step (any answer: untrained)
