"""A guard suite at work on SmolLM2: trained hard on one identity answer, the model wins its own held-out rows and
loses everyday ones, and its guard keeps it from becoming champion."""

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.slow
RECIPE = REPO / "conf" / "identity_sft.yaml"  # its guard: builtin:everyday_chat_heldout, eval_loss, 0.05
NAME = "loraflow-guarded"
# Identity rows alone (no everyday chat to keep), at 5x the recipe's learning rate: everyday answers degrade.
OVERRIDES = ["data.train=[builtin:identity]", "train.learning_rate=5e-3", "train.max_steps=12",
             "evaluate.max_new_tokens=16", f"registry.model_name={NAME}"]


def test_a_model_that_forgets_everyday_chat_is_refused_by_its_guard_though_it_beats_the_base(capsys):
    assert main(["run", str(RECIPE), *(f"-o{o}" for o in OVERRIDES)]) == 0
    out = capsys.readouterr().out
    run_id = next(line.split()[2] for line in out.splitlines() if line.startswith("MLflow run:"))
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["tuned_identity_share"] > metrics["base_identity_share"]  # its own rule alone would promote it
    key = "guard_builtin_everyday_chat_heldout"
    assert metrics[f"{key}_tuned_eval_loss"] > metrics[f"{key}_base_eval_loss"] + 0.05
    version = MlflowClient().get_model_version(NAME, "1")
    assert version.tags["loraflow.guard_decided"] == "builtin:everyday_chat_heldout"
    assert version.tags["loraflow.promotion"].startswith("guard builtin:everyday_chat_heldout: eval_loss ")
    assert "(not promoted): guard builtin:everyday_chat_heldout" in out
    assert not MlflowClient().get_registered_model(NAME).aliases.get("champion")
