"""The train stage as one `torchrun` worker process: `python -m torch.distributed.run ... -m tasks.train_worker SPEC`.

train_in_workers (tasks/train.py) writes SPEC (a JSON of train()'s arguments) and launches the workers. Rank 0
logs each step to the MLflow run named in SPEC (or, should its tracking server go away, to the run's unlogged
record) and writes the result where SPEC says; other ranks log nothing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from conf.schema import TrainConfig
from tasks.generation import SamplePrompts
from tasks.labels import Head
from tasks.tracking import recording_unlogged, sample_logger, step_logger
from tasks.train import STOP_REQUESTED, TrainingStopped, result_as_json, train


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    record = Path(spec["unlogged_record"]) if spec["unlogged_record"] else None
    with recording_unlogged(spec["run_id"], record):
        return _train(spec)


def _train(spec: dict) -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())
    is_rank_zero = int(os.environ.get("RANK", "0")) == 0
    on_step = step_logger(spec["run_id"]) if is_rank_zero else (lambda step, metrics: None)
    on_samples = sample_logger(spec["run_id"]) if is_rank_zero else (lambda step, rows: None)
    samples = SamplePrompts(**spec["samples"]) if spec["samples"] else None
    try:
        result = train(
            Path(spec["train_dir"]), Path(spec["tokenizer_dir"]), spec["model_dir"], TrainConfig.model_validate(spec["config"]),
            spec["seed"], Path(spec["out_dir"]), on_step,
            Path(spec["resume_from"]) if spec["resume_from"] else None, spec["trust_remote_code"], samples, on_samples,
            Head(**spec["head"] | {"labels": tuple(spec["head"]["labels"])}) if spec["head"] else None,
        )
        outcome = result_as_json(result)
    except TrainingStopped as stopped:
        outcome = {"stopped_at": stopped.step, "checkpoint": str(stopped.checkpoint)}
    if is_rank_zero:
        Path(spec["result_path"]).write_text(json.dumps(outcome), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
