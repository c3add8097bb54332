"""The mixed-length chat conversations the benchmarks share (seeded, made here: nothing is downloaded)."""

from __future__ import annotations

import random

WORDS = "the model data token train learn answer question python code file night run loss rank rate".split()


def conversation(rng: random.Random) -> list[dict]:
    """One to three turns; answer lengths from a few words to a few hundred, as real chat sets mix them."""
    messages = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        words = int(rng.lognormvariate(3.0, 0.9))
        messages += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 20))) + "?"},
                     {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=max(words, 1))) + "."}]
    return messages


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(count)]
