"""The train stage as one `torchrun` worker process: `python -m torch.distributed.run ... -m tasks.train.worker JOB`.

train_in_workers (tasks/train/launcher.py) writes JOB and launches the workers. A worker process is an edge of its
own, as the flow's Prefect task is for one process: each node's first worker (local rank 0) writes the outcome where
JOB says, and logs each step to the MLflow run JOB names (or, should its tracking server go away, to the run's
unlogged record); only the flow's node names a run, and other workers log nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tasks.tracking import recording_unlogged, sample_logger, step_logger
from tasks.train.launcher import WorkerJob, WorkerOutcome
from tasks.train.stage import train
from tasks.train.stopping import STOP_REQUESTED, TrainingStopped


def main(job_path: str) -> int:
    job = WorkerJob.model_validate_json(Path(job_path).read_text(encoding="utf-8"))
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())
    is_rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0
    logs = is_rank_zero and job.ctx.run_id is not None
    with recording_unlogged(job.ctx.run_id, job.unlogged_record):
        try:
            result = train(job.tokens, job.model_dir, job.config, job.ctx, resume_from=job.resume_from,
                           samples=job.samples,
                           on_step=step_logger(job.ctx.run_id) if logs else lambda step, metrics: None,
                           on_samples=sample_logger(job.ctx.run_id) if logs else lambda step, rows: None)
            outcome = WorkerOutcome(result=result)
        except TrainingStopped as stopped:
            outcome = WorkerOutcome(stopped_at=stopped.step, checkpoint=stopped.checkpoint)
    if is_rank_zero:
        job.outcome_path.write_text(outcome.model_dump_json(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
