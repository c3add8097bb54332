"""What Prefect and MLflow cost on top of the stages' own work, for the default recipe.

One run of the fine-tuning flow in this process, on the default recipe (into experiment and registered model
`loraflow-bench`, so the user's own registry is left alone). The plain stage functions the tasks call (clean,
tokenize, train, evaluate, register) are timed where the tasks call them; training's per-step MLflow logging
is timed apart and counted as overhead. The baseline, measured in the same run, is the sum of those stage
times; the overhead is the flow's wall time minus it (Prefect's task and flow runs; MLflow's run, parameters,
metrics, artifacts and data-set inputs), plus what starting Prefect's server cost the command: as `loraflow run`
does, it is started as a subprocess before the heavy imports, and the time spent starting it and then waiting for
it is counted. The MLflow calls are also timed by kind, to show where the overhead goes.

    python bench/overhead.py [--max-steps N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402

from conf.environment import apply_tool_defaults  # noqa: E402

apply_tool_defaults()
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # as the command line does

from flows.prefect_server import start_in_background  # noqa: E402

_began = time.perf_counter()
wait_for_prefect = start_in_background()
prefect_start_seconds = time.perf_counter() - _began

import flows.stages  # noqa: E402
import tasks.tracking  # noqa: E402
from conf.schema import load_config  # noqa: E402
from flows.finetune import finetune  # noqa: E402
from flows.runs import preflight  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "conf" / "identity_sft.yaml"
seconds: dict[str, float] = defaultdict(float)


def timed(module, name: str, key: str) -> None:
    """Replace `module.name` with a wrapper adding its wall time to seconds[key]."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - started

    setattr(module, name, wrapper)


def timed_logger_factory(module, name: str, key: str) -> None:
    """Replace a factory of per-step logging callbacks so that the callbacks it makes are timed."""
    factory = getattr(module, name)

    def make(*args, **kwargs):
        log = factory(*args, **kwargs)

        def timed_log(*log_args):
            started = time.perf_counter()
            log(*log_args)
            seconds[key] += time.perf_counter() - started

        return timed_log

    setattr(module, name, make)


def timed_tracking_calls() -> None:
    """Time each kind of MLflow call the stages make (tasks/tracking.py applies every one through APPLY)."""
    for op, apply in list(tasks.tracking.APPLY.items()):
        def timed_apply(client, run_id, entry, apply=apply, op=op):
            started = time.perf_counter()
            try:
                return apply(client, run_id, entry)
            finally:
                seconds[f"mlflow {op}"] += time.perf_counter() - started

        tasks.tracking.APPLY[op] = timed_apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, help="train this many steps instead of the recipe's")
    args = parser.parse_args()
    overrides = ["experiment=loraflow-bench", "registry.model_name=loraflow-bench"]
    overrides += [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    config = load_config(RECIPE, overrides)
    began = time.perf_counter()
    preflight(config)
    preflight_seconds = time.perf_counter() - began
    # The stages as the flow's Prefect tasks call them (flows/stages.py), each timed without its MLflow logging.
    timed(flows.stages, "clean", "clean")
    timed(flows.stages, "tokenize", "tokenize")
    timed(flows.stages, "train", "train")
    timed(flows.stages, "evaluate_tuned", "evaluate")
    timed(flows.stages, "register", "register")
    timed_logger_factory(flows.stages, "step_logger", "train_step_logging")
    timed_tracking_calls()

    prefect_wait_seconds = wait_for_prefect()
    started = time.perf_counter()
    summary = finetune(config)
    wall = time.perf_counter() - started

    train_compute = seconds["train"] - seconds["train_step_logging"]
    stages = seconds["clean"] + seconds["tokenize"] + train_compute + seconds["evaluate"] + seconds["register"]
    prefect_server = prefect_start_seconds + prefect_wait_seconds
    overhead = wall - stages + prefect_server
    print(f"run {summary.run_id}, {config.train.max_steps} steps")
    print(f"preflight         {preflight_seconds:7.1f} s (before the flow, as in `loraflow run`; not counted: it checks the "
          "recipe, the data files, the tokenizer and opens the tracking store)")
    for key in ("clean", "tokenize", "evaluate", "register"):
        print(f"stage {key:<9} {seconds[key]:7.1f} s")
    print(f"stage train     {train_compute:7.1f} s (its per-step MLflow logging, {seconds['train_step_logging']:.1f} s, "
          "counted as overhead)")
    print(f"stages (baseline) {stages:7.1f} s")
    print(f"flow wall time    {wall:7.1f} s")
    print(f"Prefect server    {prefect_server:7.1f} s (started in the background before the imports: "
          f"{prefect_start_seconds:.1f} s to begin, {prefect_wait_seconds:.1f} s waited for)")
    print(f"overhead          {overhead:7.1f} s (flow wall time - stages + Prefect server)")
    calls = {key.removeprefix("mlflow "): value for key, value in seconds.items() if key.startswith("mlflow ")}
    print(f"  of which MLflow logging calls {sum(calls.values()):.1f} s: "
          + ", ".join(f"{op} {value:.2f}" for op, value in sorted(calls.items(), key=lambda item: -item[1])))
    print(f"overhead_share: {overhead / (wall + prefect_server):.3f}")


if __name__ == "__main__":
    main()
