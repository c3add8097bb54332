"""Training that starts from an adapter (`train.init_adapter`): a registered version, a run's adapter, a folder, or a
recipe trained first in the same flow run, so that SFT -> DPO is one run of one recipe.

The first stage is a run of its own, nested under the run it feeds in the MLflow UI (its parent), never registered;
the second records where it started (`loraflow.init_adapter`). A resumed second stage starts from the adapter it
recorded, not from a new first stage.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from conf.schema import RunConfig
from tasks.context import RunContext
from tasks.logged_model import fetch_adapter
from tasks.tracking import set_tags

INIT_ADAPTER_TAG = "loraflow.init_adapter"
FIRST_STAGE_TAG = "loraflow.first_stage"


def names_recipe(init_adapter: str | None) -> bool:
    """Whether `train.init_adapter` is a recipe to train first rather than an adapter."""
    return init_adapter is not None and init_adapter.endswith((".yaml", ".yml"))


def starting_adapter(config: RunConfig, ctx: RunContext, *, first_stage: tuple[str, Path] | None = None,
                     resumed: bool = False) -> RunConfig:
    """The recipe with `train.init_adapter` as a local adapter folder, recorded on the run: the first stage's
    (run id, adapter folder) when it just ran, the one this run recorded when it resumes, else the one named."""
    spec = config.train.init_adapter
    if spec is None:
        return config
    if first_stage is not None:
        run_id, folder = first_stage
        set_tags(run_id, {MLFLOW_PARENT_RUN_ID: ctx.run_id})
        set_tags(ctx.run_id, {FIRST_STAGE_TAG: run_id})
        spec = str(folder)
    elif resumed and names_recipe(spec):
        spec = mlflow.get_run(ctx.run_id).data.tags[INIT_ADAPTER_TAG]
    folder = fetch_adapter(spec, ctx.work_dir / "init_adapter", config.base_model)
    set_tags(ctx.run_id, {INIT_ADAPTER_TAG: spec})
    return config.model_copy(update={"train": config.train.model_copy(update={"init_adapter": str(folder)})})
