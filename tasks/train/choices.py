"""What `auto` becomes in train.compile, train.low_memory and train.frozen_base for one run, and why.

Each automatic choice follows a measurement on this project's benches, not a guess: compiling pays once a run trains
more tokens than its one-off compile costs (bench/compile.py's break-even, with inductor's on-disk cache empty or
already holding this setup); recomputing activations is worth its cost where compiling wins it back (bench/train.py's
c_compile_lean against c), and in a compiled run AOTAutograd's partitioner picks what (bench/recompute.py); a 16-bit
frozen base trains no slower and holds half the memory (bench/train.py's c_bf16_base against c). The reasons become
the run's tags, and a recipe that sets a value gets that value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from conf.schema import TrainConfig
from tasks.device import TrainSetupError
from tasks.results import TokenizedData

# Tokens after which compiling pays for itself, from `python bench/compile.py` (2026-12-06, 2-core AMD EPYC, Zen 4):
# the compiled step's first-step cost over eager's, divided by what each compiled token saves.
COMPILE_PAYS_AFTER_TOKENS = {"cold": 63_000, "warm": 7_000}
# Under low_memory, the share of a compiled layer's saved activations (of what AOTAutograd's min-cut partitioner keeps
# by default) that it keeps for backward, recomputing the cheapest of the rest (`activation_memory_budget`), where
# gradient checkpointing recomputes whole layers. `python bench/recompute.py` (docs/benchmarks.md): faster and leaner
# than checkpointed layers.
COMPILED_RECOMPUTE_BUDGET = 0.3
# Under dynamic shapes Dynamo traces a module's Python floats as symbols; inductor cannot keep them so, and Dynamo then
# traced each decoder layer a second time with them constant: 11 s of every compile, cold or warm (bench/compile.py).
SPECIALIZED_FLOATS = True
WARM_MARKS = "loraflow-compiled"  # under inductor's cache: one empty file per setup this machine compiled


@dataclass(frozen=True)
class TrainChoices:
    """The settings a run trains with, each `auto` resolved; `reasons` says, per setting, what was chosen and why."""

    compile: bool
    recompute: bool
    frozen_16bit: bool
    reasons: dict[str, str]
    compile_key: str  # the compiled setup's mark once it trained (compile_key)

    @property
    def checkpoints_layers(self) -> bool:
        """Whether activations are recomputed by checkpointing whole decoder layers (where nothing is compiled)."""
        return self.recompute and not self.compile

    def compiling(self) -> contextlib.ExitStack:
        """The context training runs in. Compiled: Python floats (norm epsilons, LoRA scalings, dropout rates) are
        constants in the graph, as SPECIALIZED_FLOATS says; with `recompute`, the partitioner's activation budget."""
        context = contextlib.ExitStack()
        if self.compile:
            context.enter_context(torch._dynamo.config.patch(specialize_float=SPECIALIZED_FLOATS))
            if self.recompute:
                context.enter_context(torch._functorch.config.patch(activation_memory_budget=COMPILED_RECOMPUTE_BUDGET))
        return context

    def frozen_dtype(self, precision: str) -> torch.dtype | None:
        """The dtype LoRA's frozen base is kept in, or None where it stays as loaded (fp32)."""
        if not self.frozen_16bit:
            return None
        return torch.bfloat16 if precision == "bf16" else torch.float16

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainChoices:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def inductor_cache(cache_dir: Path) -> Path:
    """Where inductor keeps what it compiled: TORCHINDUCTOR_CACHE_DIR where the user set it, else under the machine's
    loraflow cache, so that the next night on this machine starts warm."""
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor")))


def compile_key(model_dir: str, config: TrainConfig, precision: str, recompute: bool, frozen_16bit: bool,
                task: str) -> str:
    """What decides the graphs inductor compiles: the model's architecture, torch, the settings that change the
    traced layer, and where the code lives: inductor's cache keys carry the source files' paths (a fresh clone with
    its own environment compiled from scratch, 80 s, where the marker said warm)."""
    config_file = Path(model_dir) / "config.json"
    architecture = config_file.read_text(encoding="utf-8") if config_file.is_file() else model_dir
    lora = config.lora
    code = [str(Path(__file__).resolve().parents[2]), sys.prefix]
    recomputed = recompute and f"budget {COMPILED_RECOMPUTE_BUDGET}"
    parts = [torch.__version__, architecture, precision, config.method, recomputed, frozen_16bit, task, config.attn,
             lora.r, lora.target_modules, lora.use_dora, code, SPECIALIZED_FLOATS]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def mark_warm(cache_dir: Path, key: str) -> None:
    """Remember that inductor's cache now holds this setup's compiled layers."""
    marks = inductor_cache(cache_dir) / WARM_MARKS
    marks.mkdir(parents=True, exist_ok=True)
    (marks / key).touch()


def planned_tokens(tokens: TokenizedData, config: TrainConfig) -> int:
    """Tokens the run will train: its steps times the rows a step takes (every process, every machine) times the
    mean row."""
    per_row = tokens.train_tokens / max(tokens.train_rows, 1)
    return int(config.max_steps * config.batch_size * config.grad_accum * config.processes * config.nodes * per_row)


def _why_not_compiled(config: TrainConfig, task: str) -> str | None:
    """Where compiling is not measured to pay (or cannot run), the reason; None where the break-even decides."""
    if torch.cuda.is_available():
        return "measured slower on a GPU (docs/benchmarks-gpu.md)"
    if config.method == "qlora":
        return "method qlora (bitsandbytes' 4-bit layers)"
    if config.objective != "sft":
        return f"objective {config.objective} (measured for SFT)"
    if task != "causal_lm":
        return "a task head (measured for the causal LM)"
    if config.in_workers:
        return "torchrun workers (measured in one process)"
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) for inductor"
    return None


def choose_training(tokens: TokenizedData, model_dir: str, config: TrainConfig, precision: str,
                    cache_dir: Path) -> TrainChoices:
    """Resolve every `auto` of `config` for this run on this machine."""
    reasons: dict[str, str] = {}
    sixteen_bit = precision in ("bf16", "fp16")
    if config.frozen_base == "16bit" and not sixteen_bit:
        raise TrainSetupError(f"train.frozen_base: 16bit needs precision bf16 or fp16 (this run: {precision})")
    if config.frozen_base != "auto":
        frozen_16bit = config.frozen_base == "16bit"
        reasons["frozen_base"] = f"{config.frozen_base}: set by the recipe"
    elif config.method != "lora" or not sixteen_bit:
        frozen_16bit = False
        reasons["frozen_base"] = ("fp32: method " + config.method if config.method != "lora"
                                  else f"fp32: precision {precision}")
    elif config.in_workers and config.low_memory is not True:
        frozen_16bit = False
        reasons["frozen_base"] = "fp32: torchrun workers (measured in one process)"
    else:
        frozen_16bit = True
        reasons["frozen_base"] = f"16bit: {precision}, no slower than fp32 at half the base's memory"

    # With compiling, activations are recomputed unless the recipe says not: the setup compiled is the same either way.
    key = compile_key(model_dir, config, precision, config.low_memory is not False, frozen_16bit, tokens.task)
    if config.compile != "auto":
        compiled = config.compile
        reasons["compile"] = f"{str(compiled).lower()}: set by the recipe"
    elif (why_not := _why_not_compiled(config, tokens.task)) is not None:
        compiled = False
        reasons["compile"] = f"false: {why_not}"
    else:
        cache = "warm" if (inductor_cache(cache_dir) / WARM_MARKS / key).exists() else "cold"
        planned, pays_after = planned_tokens(tokens, config), COMPILE_PAYS_AFTER_TOKENS[cache]
        compiled = planned >= pays_after
        reasons["compile"] = (f"{str(compiled).lower()}: {planned:,} tokens planned, compiling pays after "
                              f"{pays_after:,} ({cache} cache)")

    if config.low_memory != "auto":
        recompute = config.low_memory
        reasons["low_memory"] = f"{str(recompute).lower()}: set by the recipe"
    else:
        recompute = compiled
        reasons["low_memory"] = ("true: compiled, which wins back more than recomputing costs (the partitioner keeps "
                                 f"{COMPILED_RECOMPUTE_BUDGET:.0%} of each layer's activations)" if compiled
                                 else "false: not compiled, recomputing would cost speed")
    return TrainChoices(compiled, recompute, frozen_16bit, reasons, key)
