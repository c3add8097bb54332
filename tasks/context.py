"""The per-run facts every stage may need, as one small typed value the flow hands down."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tasks.base_model import cache_root


@dataclass(frozen=True)
class RunContext:
    """Where a run writes (`work_dir`, a folder per stage under it), the machine's cache, the seed, whether remote
    code may run, and the MLflow run its bookkeeping goes to (None in a notebook: the stages never log)."""

    work_dir: Path
    run_id: str | None = None
    cache_dir: Path = field(default_factory=cache_root)
    seed: int = 0
    trust_remote_code: bool = False

    def under(self, name: str) -> RunContext:
        """The same run, writing under work_dir/name (a second model scored in the run: the champion)."""
        return dataclasses.replace(self, work_dir=self.work_dir / name)
