"""Another machine of a multi-node training (train.nodes > 1): the recipe's data prepared here, this node's torchrun
workers joined to the rendezvous. The machine that runs the flow (`loraflow run`, or the nightly deployment) logs
the run and registers the weights; this one trains its share and keeps a copy of the weights.

A Prefect flow, so a deployment launches it on a pool whose workers are the other machines (one flow run per node);
`loraflow train-node` runs the same without Prefect.
"""

from __future__ import annotations

import socket

from prefect import flow

from conf.schema import UserError, load_config
from flows.stages import prepare_data
from tasks.base_model import resolve_base_model
from tasks.context import RunContext
from tasks.results import TrainResult
from tasks.train import stop_on_sigterm, train_in_workers


def join_training(recipe: str, overrides: list[str]) -> TrainResult:
    config = load_config(recipe, overrides)
    if config.train.nodes == 1:
        raise UserError(f"{recipe}: train.nodes is 1: a node joins a training of several (-o train.nodes=N "
                        "-o train.rendezvous=HOST:PORT, as the flow's machine runs it)")
    model_dir = resolve_base_model(config.base_model)
    ctx = RunContext(config.output_dir / f"node-{socket.gethostname()}", seed=config.seed,
                     trust_remote_code=config.trust_remote_code)
    data = prepare_data(config, model_dir, ctx)
    print(f"loraflow: joining a {config.train.nodes}-node training at {config.train.rendezvous} "
          f"(data {data.cleaned.data_hash[:12]})", flush=True)
    with stop_on_sigterm():
        return train_in_workers(data.tokens, model_dir, config.train, ctx)


@flow(name="train-node")
def train_node(recipe: str, overrides: list[str] | None = None) -> str:
    """One other node's share of a multi-node training; returns where its copy of the weights is."""
    return str(join_training(recipe, overrides or []).weights_dir)
