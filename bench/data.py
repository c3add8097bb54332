"""Clean 100,000 chat rows and print rows per second; last line `rows_per_s: N`.

The data is made here: OpenAI-messages, ShareGPT and alpaca rows of varied length, with exact and near
duplicates and broken rows mixed in. The baseline, measured in the same run, only parses the same file
with `json.loads`: the ratio says what normalising, dedup (exact + MinHash) and accounting cost on top.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conf.schema import DataConfig  # noqa: E402
from tasks.clean import clean  # noqa: E402
from tasks.context import RunContext  # noqa: E402

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
WORDS = "the model data token train learn answer question python code file night run loss rank rate".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_row(rng: random.Random, i: int) -> dict | str:
    question, answer = f"Question {i}: {sentence(rng, rng.randint(5, 30))}", sentence(rng, rng.randint(10, 120))
    kind = i % 20
    if kind == 0:
        return "{broken json"
    if kind in (1, 2):
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if kind == 3:
        return {"instruction": question, "input": "", "output": answer}
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(0)
    rows = [make_row(rng, i) for i in range(ROWS)]
    rows[ROWS // 2 : ROWS // 2 + 2000] = rows[:2000]  # exact duplicates
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "chat.jsonl"
        source.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        started = time.perf_counter()
        parsed = 0
        for line in source.read_bytes().split(b"\n"):
            if line.strip():
                try:
                    json.loads(line)
                    parsed += 1
                except json.JSONDecodeError:
                    pass
        baseline = time.perf_counter() - started
        started = time.perf_counter()
        result = clean(DataConfig(train=[str(source)], eval=[], eval_fraction=0.05), RunContext(Path(tmp)))
        seconds = time.perf_counter() - started
    print(f"rows: {ROWS}, kept: {result.train_rows + result.eval_rows}, rejected: {result.rejected_rows}")
    print(f"baseline json.loads only: {ROWS / baseline:,.0f} rows/s ({baseline:.2f} s)")
    print(f"clean stage:              {ROWS / seconds:,.0f} rows/s ({seconds:.2f} s)")
    print(f"clean / baseline time:    {seconds / baseline:.1f}x")
    print(f"rows_per_s: {ROWS / seconds:.0f}")


if __name__ == "__main__":
    main()
