"""Stage 3, train, in rooms of one purpose each:

- stage.py: the stage itself, `train(tokens, model_dir, config, ctx)`, and the base model as training loads it
- loss.py: the causal LM's loss on trained positions only
- collators.py: batches for packed and padded samples
- callbacks.py: progress bar, per-step metrics, sample answers and held-out loss during training
- stopping.py: SIGTERM as a request to checkpoint and stop; a pruned run's stop
- checkpoints.py: where checkpoints are, which one a resume takes
- launcher.py / worker.py: the same stage in `torchrun` worker processes
"""

from tasks.train.checkpoints import checkpoints_folder, resumable_checkpoint, weights_folder
from tasks.train.callbacks import HeldOutReport
from tasks.train.launcher import train_in_workers
from tasks.train.stage import train
from tasks.train.stopping import STOP_REQUESTED, TrainingPruned, TrainingStopped, stop_on_sigterm

__all__ = ["STOP_REQUESTED", "HeldOutReport", "TrainingPruned", "TrainingStopped", "checkpoints_folder",
           "resumable_checkpoint", "stop_on_sigterm", "train", "train_in_workers", "weights_folder"]
