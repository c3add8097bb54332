"""Where checkpoints land and which one a resume continues from."""

from __future__ import annotations

import shutil
from pathlib import Path


def checkpoints_folder(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def weights_folder(out_dir: Path, method: str) -> Path:
    """Where training saves what it trained: the adapter, or the whole model for method full."""
    return out_dir / ("model" if method == "full" else "adapter")


def resumable_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint, after removing any newer one cut off mid-save.

    The Trainer writes trainer_state.json last and not atomically (its own `get_last_checkpoint` would pick
    a half-written folder after a kill -9), so this is written here.
    """
    folders = sorted(checkpoints_dir.glob("checkpoint-*"), key=lambda folder: int(folder.name.split("-")[1]))
    while folders and not (folders[-1] / "trainer_state.json").exists():
        shutil.rmtree(folders.pop())
    return folders[-1] if folders else None
