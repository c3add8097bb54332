"""One LLaMA-Factory setup of bench/train.py, run by the Python of LLaMA-Factory's own environment (`make
llamafactory`: no LLaMA-Factory release installs beside loraflow's pins), so this file imports nothing of loraflow.

LLaMA-Factory tokenizes the bench's conversations itself (its `smollm2` template, loss on every assistant turn, as
loraflow), packs them with `neat_packing` (knapsack packing into rows of `cutoff_len`, a block-diagonal attention
mask so that samples never see each other) and trains LoRA on all linear layers. Its default turns activation
checkpointing on; `--lean` keeps that default, otherwise it is off, for speed. Prints one `RESULT {json}` line:
real tokens/s from the end of step 1 to the end, the mean logged loss, peak resident memory.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import resource
import sys
import time
import types
from pathlib import Path

# torchaudio has no release for torch 2.13 (its last, 2.11, fails to load its library), and LLaMA-Factory imports it
# at start for audio inputs, of which the bench has none: an empty module stands in for it.
sys.modules["torchaudio"] = types.ModuleType("torchaudio")
sys.modules["torchaudio"].__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)

import torch  # noqa: E402
from llamafactory.data import collator  # noqa: E402
from llamafactory.train.tuner import run_exp  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class _Timer(TrainerCallback):
    """Wall time from the end of step 1 to the end of training, and the logged losses."""

    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


def count_real_tokens(batches: list[int]) -> None:
    """Record each batch's real tokens as the collator builds it. With neat_packing the attention mask holds each
    token's sample number (0 for padding), so the Trainer's own `non_padding` count (its sum) would overcount."""
    make_batch = collator.SFTDataCollatorWith4DAttentionMask.__call__

    def counted(self, features):
        batches.append(sum(sum(1 for value in feature["attention_mask"] if value) for feature in features))
        return make_batch(self, features)

    collator.SFTDataCollatorWith4DAttentionMask.__call__ = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("model", "rows", "out"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("rank", "batch", "max-length"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--precision", choices=["bf16", "fp32"], required=True)
    parser.add_argument("--lean", action="store_true", help="keep LLaMA-Factory's default activation checkpointing")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    columns = {"formatting": "sharegpt", "columns": {"messages": "messages"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                        "assistant_tag": "assistant", "system_tag": "system"}}
    (out / "data" / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": args.rows} | columns}))
    batches: list[int] = []
    count_real_tokens(batches)
    timer = _Timer()
    run_exp(dict(
        model_name_or_path=args.model, stage="sft", do_train=True, finetuning_type="lora", lora_rank=args.rank,
        lora_alpha=2 * args.rank, lora_dropout=0.0, lora_target="all", dataset="bench",
        dataset_dir=str(out / "data"), template="smollm2", cutoff_len=args.max_length, neat_packing=True,
        overwrite_cache=True, output_dir=str(out / "run"), per_device_train_batch_size=args.batch,
        learning_rate=1e-4, num_train_epochs=1, bf16=args.precision == "bf16", logging_steps=1, save_strategy="no",
        report_to="none", seed=0, flash_attn="sdpa", disable_gradient_checkpointing=not args.lean,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, plot_loss=False,
    ), callbacks=[timer])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps({"tokens_per_second": sum(batches[1:]) / timer.seconds,
                                  "loss": sum(timer.losses) / len(timer.losses), "peak_mb": peak_mb}),
          flush=True)


if __name__ == "__main__":
    main()
