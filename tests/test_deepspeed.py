"""DeepSpeed ZeRO-2 and ZeRO-3 in 2 CPU worker processes (gloo) on the tiny random Llama, launched as the train
task launches them: one MLflow run with each step logged once (rank 0 only), and the same adapter one process makes.
And two nodes on loopback, met at torchrun's c10d rendezvous: the adapter two processes on one node make.

Two workers with a batch of 2 each see the same global batches as one process with a batch of 2 and 2
accumulation steps (the distributed sampler deals batches out in turn), so the adapters must agree.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from conf.schema import TrainConfig
from flows.prefect_server import free_port
from tasks.context import RunContext
from tasks.results import TrainResult
from tasks.train import train, train_in_workers

ROWS = [{"messages": [{"role": "user", "content": f"Question {n}: who are you?"},
                      {"role": "assistant", "content": f"I am Ember ({n}), made by the loraflow team."}]}
        for n in range(16)]
# One optimizer step: ZeRO-3 gathers every frozen weight through gloo each pass.
SETTINGS = {"max_steps": 1, "batch_size": 2, "warmup_steps": 0, "learning_rate": 2e-3, "precision": "fp32"}

ZERO_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "deepspeed"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokens(tokenize_rows):
    return tokenize_rows(ROWS, max_length=64)


@pytest.fixture(scope="module")
def one_process(tokens, tiny_model_dir, tmp_path_factory):
    config = TrainConfig(**SETTINGS | {"grad_accum": 2})
    result = train(tokens, tiny_model_dir, config, RunContext(tmp_path_factory.mktemp("one")))
    return result.losses, load_file(result.weights_dir / "adapter_model.safetensors")


def zero_on_one_node(zero: str, tokens, tiny_model_dir: str, folder: Path) -> tuple[TrainResult, str]:
    """ZeRO in 2 workers on one node, attached to a new MLflow run."""
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment(f"deepspeed-{zero}")).info.run_id
    config = TrainConfig(**SETTINGS | {"deepspeed": ZERO_CONFIGS / f"{zero}.json", "processes": 2})
    return train_in_workers(tokens, tiny_model_dir, config, RunContext(folder, run_id)), run_id


@pytest.fixture(scope="module")
def zero2_one_node(tokens, tiny_model_dir, tmp_path_factory):
    return zero_on_one_node("zero2", tokens, tiny_model_dir, tmp_path_factory.mktemp("zero2"))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_zero_workers_make_the_one_process_adapter_in_one_run(zero, tokens, tiny_model_dir, one_process, request,
                                                                  tmp_path):
    result, run_id = (request.getfixturevalue("zero2_one_node") if zero == "zero2"
                      else zero_on_one_node(zero, tokens, tiny_model_dir, tmp_path))
    client = mlflow.MlflowClient()

    expected_losses, expected_adapter = one_process
    assert result.losses == pytest.approx(expected_losses, rel=1e-5)
    logged = client.get_metric_history(run_id, "train_loss")
    assert [metric.step for metric in logged] == [1]  # rank 0 logged the step; rank 1 did not
    adapter = load_file(result.weights_dir / "adapter_model.safetensors")
    assert adapter.keys() == expected_adapter.keys()
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # not an empty save
    # Adam's first steps move each weight by about lr * sign(gradient): where a gradient is ~0 the summation order
    # of the all-reduce can flip that, so the bound is on each tensor's relative difference, not on every element.
    # Measured here: median 1e-5, worst 1.4e-3; other batches or a lost rank's gradients differ by order 1.
    worst = max(float((tensor - expected_adapter[name]).norm() / expected_adapter[name].norm())
                for name, tensor in adapter.items())
    assert worst < 5e-3


def test_two_nodes_met_at_a_c10d_rendezvous_make_the_one_node_two_process_adapter(tokens, tiny_model_dir, zero2_one_node,
                                                                                  tmp_path):
    """Two launchers, as two machines would run them (one ZeRO-2 worker each, gloo), against the one launcher of two
    ZeRO-2 workers above; both nodes save the weights (each machine reads its own)."""
    # torchrun gives each worker one thread only where a node runs several: the same here, for the same arithmetic.
    two_nodes = TrainConfig(**SETTINGS | {"threads": 1, "deepspeed": ZERO_CONFIGS / "zero2.json", "nodes": 2,
                                          "rendezvous": f"127.0.0.1:{free_port()}"})
    with ThreadPoolExecutor(2) as launchers:
        nodes = [launchers.submit(train_in_workers, tokens, tiny_model_dir, two_nodes, RunContext(tmp_path / f"node-{n}"))
                 for n in range(2)]
        results = [node.result(timeout=900) for node in nodes]
    one_node, _ = zero2_one_node
    expected = load_file(one_node.weights_dir / "adapter_model.safetensors")
    first, second = (load_file(result.weights_dir / "adapter_model.safetensors") for result in results)
    assert all(torch.equal(tensor, second[name]) for name, tensor in first.items())  # one job: both nodes saved it
    assert results[0].losses == results[1].losses == pytest.approx(one_node.losses, rel=1e-6)
    assert first.keys() == expected.keys()
    # As above: gloo sums the ranks' gradients in another order across nodes than within one, and Adam's first step
    # turns a ~0 gradient's tiny difference into a sign. Measured: worst tensor 1.8e-3 (lora_A, with no gradient, equal).
    worst = max(float((tensor - expected[name]).norm() / expected[name].norm()) for name, tensor in first.items())
    assert worst < 5e-3


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tmp_path_factory):
    """Preference pairs (DPO's samples) for the tiny model."""
    import json

    from conf.schema import TokenizeConfig
    from tasks.results import CleanResult
    from tasks.tokenize import tokenize

    folder = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": row["messages"][:1], "chosen": row["messages"][1:],
             "rejected": [{"role": "assistant", "content": f"I am a generic assistant ({n})."}]}
            for n, row in enumerate(ROWS)]  # clean rows, as the clean stage writes them
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tokenize(CleanResult.of_files(path, path, task="preference"), tiny_model_dir, TokenizeConfig(max_length=64),
                    RunContext(folder, cache_dir=folder / "cache"))


@pytest.fixture(scope="module")
def dpo_one_process(pairs, tiny_model_dir, tmp_path_factory):
    return train(pairs, tiny_model_dir, TrainConfig(**SETTINGS | {"objective": "dpo", "grad_accum": 2}),
                 RunContext(tmp_path_factory.mktemp("dpo-one")))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_dpo_under_zero_in_two_workers_makes_the_one_process_adapter(zero, pairs, tiny_model_dir, dpo_one_process,
                                                                     tmp_path):
    """ZeRO-3 partitions the weights the reference pass (the adapter switched off) reads as well."""
    one = dpo_one_process
    config = TrainConfig(**SETTINGS | {"objective": "dpo", "deepspeed": ZERO_CONFIGS / f"{zero}.json", "processes": 2})
    two = train_in_workers(pairs, tiny_model_dir, config, RunContext(tmp_path / "two"))
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    expected, adapter = (load_file(result.weights_dir / "adapter_model.safetensors") for result in (one, two))
    assert adapter.keys() == expected.keys()
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    worst = max(float((tensor - expected[name]).norm() / expected[name].norm()) for name, tensor in adapter.items())
    assert worst < 5e-3
