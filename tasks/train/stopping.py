"""Stopping on request: SIGTERM (a reboot, a worker shut down) asks training to checkpoint and stop, on every
process together, so the run resumes from that checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback

# Set by a SIGTERM handler (stop_on_sigterm); the Trainer checks it after every step, saves a checkpoint, stops.
STOP_REQUESTED = threading.Event()


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM) after saving a checkpoint; the run can be resumed from it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class TrainingPruned(Exception):
    """Training stopped early because its held-out loss said the run was not worth finishing (a sweep's pruner)."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"pruned at step {step} (held-out loss {loss:.4f})")
        self.step, self.loss = step, loss


class StopWhenRequested(TrainerCallback):
    """After each step: if any process was asked to stop, every process saves a checkpoint and stops together."""

    stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        requested = torch.tensor(float(STOP_REQUESTED.is_set()), device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX)
        if requested.item() and state.global_step < state.max_steps:
            self.stopped = control.should_save = control.should_training_stop = True


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While training, SIGTERM asks for a checkpoint and a clean stop instead of killing the process.

    The request lasts for this training only: it is cleared when the block ends, so a long-lived process (a served
    deployment) starts its next training unstopped. Only the main thread can take signals; elsewhere the process's
    own handling stays as it was.
    """
    STOP_REQUESTED.clear()
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())
    except ValueError:
        previous = None
    try:
        yield
    finally:
        STOP_REQUESTED.clear()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
