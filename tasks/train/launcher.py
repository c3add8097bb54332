"""The train stage in several processes (DeepSpeed, `processes` > 1, `nodes` > 1): `torchrun` workers, one job for
all. Several nodes meet at torchrun's c10d rendezvous; each node's launcher runs its own workers and reads its own
outcome (every node saves the weights), and only the node whose job names an MLflow run logs.

The job is a pydantic model written as JSON and validated again by every worker (tasks/train/worker.py), so a job
either arrives whole or is refused, never read by position.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from conf.schema import TrainConfig
from tasks.context import RunContext
from tasks.generation import SamplePrompts
from tasks.results import TokenizedData, TrainResult
from tasks.train.checkpoints import checkpoints_folder, resumable_checkpoint
from tasks.train.stopping import STOP_REQUESTED, TrainingStopped


class WorkerJob(BaseModel):
    """What every worker trains, and where rank 0 writes the outcome and logs (`unlogged_record`: the run's offline
    record when its tracking server went away)."""

    tokens: TokenizedData
    model_dir: str
    config: TrainConfig
    ctx: RunContext
    resume_from: Path | None = None
    samples: SamplePrompts | None = None
    outcome_path: Path
    unlogged_record: Path | None = None


class WorkerOutcome(BaseModel):
    """Rank 0's answer: the trained result, or the step and checkpoint a stop request ended at."""

    result: TrainResult | None = None
    stopped_at: int | None = None
    checkpoint: Path | None = None


def _rendezvous(config: TrainConfig, tokens: TokenizedData) -> list[str]:
    """One machine: torchrun's standalone rendezvous. Several: c10d at `config.rendezvous`, under an id every node
    derives alike from the tokenized data they all prepared (its content hash), so no node need be told it."""
    if config.nodes == 1:
        return ["--standalone"]
    return [f"--nnodes={config.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={config.rendezvous}",
            f"--rdzv-id=loraflow-{tokens.cache_key[:16]}"]


def train_in_workers(tokens: TokenizedData, model_dir: str, config: TrainConfig, ctx: RunContext, *,
                     resume_from: Path | None = None, samples: SamplePrompts | None = None,
                     unlogged_record: Path | None = None) -> TrainResult:
    """The train stage in `config.processes` torchrun workers (on each of `config.nodes` machines) attached to MLflow
    run `ctx.run_id`; this node's first worker logs and saves. A stop request here (SIGTERM) is passed on to the
    workers, which checkpoint and stop together."""
    out_dir = ctx.work_dir / "train"
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path, outcome_path = out_dir / "worker_job.json", (out_dir / "worker_outcome.json").resolve()
    outcome_path.unlink(missing_ok=True)
    job = WorkerJob(tokens=tokens, model_dir=model_dir, config=config, ctx=ctx, resume_from=resume_from,
                    samples=samples, outcome_path=outcome_path, unlogged_record=unlogged_record)
    job_path.write_text(job.model_dump_json(), encoding="utf-8")
    # torchrun's folder for its workers' logs, with the run's outputs: without --log-dir it makes one in /tmp per launch.
    command = [sys.executable, "-m", "torch.distributed.run", *_rendezvous(config, tokens),
               f"--nproc_per_node={config.processes}", f"--log-dir={(out_dir / 'torchrun').resolve()}",
               "-m", "tasks.train.worker", str(job_path.resolve())]
    workers = subprocess.Popen(command, env=os.environ | ({"MLFLOW_RUN_ID": ctx.run_id} if ctx.run_id else {}))
    passed_on = False
    while workers.poll() is None:
        if STOP_REQUESTED.wait(timeout=0.5) and not passed_on:
            workers.send_signal(signal.SIGTERM)
            passed_on = True
    if not outcome_path.exists():
        raise RuntimeError(f"training workers exited with code {workers.returncode} and no result; see their output above")
    outcome = WorkerOutcome.model_validate_json(outcome_path.read_text(encoding="utf-8"))
    if outcome.result is None:
        raise TrainingStopped(outcome.stopped_at, outcome.checkpoint)
    if STOP_REQUESTED.is_set():  # asked as the workers finished their last step: stop before evaluation
        raise TrainingStopped(outcome.result.steps, resumable_checkpoint(checkpoints_folder(out_dir)))
    return outcome.result
