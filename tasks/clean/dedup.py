"""Near-duplicate detection: MinHash LSH over word 3-grams, signatures made a chunk of rows at a time."""

from __future__ import annotations

import string
import zlib

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix  # private, so datasketch is pinned; a test compares with MinHash


PUNCTUATION_TO_SPACE = str.maketrans(dict.fromkeys(string.punctuation, " "))


NEAR_DUPLICATE_PERMUTATIONS = 32


GRAM_MIX = (0x9E3779B1, 0x85EBCA77)  # odd multipliers that make a 3-gram's hash depend on word order


class _WordHashes(dict):
    """crc32 of each word, computed once per distinct word (deterministic across runs, unlike hash())."""

    def __missing__(self, word: str) -> int:
        self[word] = value = zlib.crc32(word.encode())
        return value


class NearDuplicates:
    """MinHash LSH (datasketch) over word 3-grams, case and ASCII punctuation ignored: is a kept row this close?

    Signatures are made for a chunk of rows at once. datasketch's `MinHash.update_batch` spends most of its
    time on per-row numpy overhead, so `signatures` applies the same steps (its fmix32 pre-mix, its affine32
    permutations, the column minimum) to a whole chunk's 3-grams in one array operation; a test checks that
    each row's signature equals datasketch's own MinHash of the same 3-grams. The index itself is datasketch's.
    """

    def __init__(self, threshold: float):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NEAR_DUPLICATE_PERMUTATIONS)
        self.permutations = MinHash(num_perm=NEAR_DUPLICATE_PERMUTATIONS, scheme="affine32").permutations
        self.word_hashes = _WordHashes()
        self.count = 0

    def signatures(self, texts: list[str]) -> np.ndarray:
        """One MinHash signature row per text, computed for all texts together.

        A text's 3-grams are hashed from its words' crc32 values: (h1 * GRAM_MIX[0] ^ h2 * GRAM_MIX[1] ^ h3)
        mod 2**32; a text of fewer than three words counts as one 3-gram padded with zeros.
        """
        word_hashes, lengths = [], []
        for text in texts:
            words = text.lower().translate(PUNCTUATION_TO_SPACE).split() or [""]
            word_hashes += map(self.word_hashes.__getitem__, words)
            word_hashes += (0, 0)  # padding: a text of one or two words still has one 3-gram of its own
            lengths.append(len(words))
        hashes = np.array(word_hashes, dtype=np.uint32)
        grams = hashes[:-2] * np.uint32(GRAM_MIX[0]) ^ hashes[1:-1] * np.uint32(GRAM_MIX[1]) ^ hashes[2:]
        slots = np.array(lengths) + 2
        counts = np.maximum(slots - 4, 1)  # 3-grams per text
        firsts = np.cumsum(counts) - counts  # each text's first row in the selected 3-grams
        selected = grams[np.repeat(np.cumsum(slots) - slots - firsts, counts) + np.arange(counts.sum())]
        a, b = self.permutations
        return np.minimum.reduceat(_fmix(selected, 32)[:, None] * a + b, firsts, axis=0)

    def matches(self, signature: np.ndarray) -> list[int]:
        """The ids of the added rows this close to `signature`."""
        return self.lsh.query(LeanMinHash(seed=1, hashvalues=signature, scheme="affine32"))

    def add(self, signature: np.ndarray) -> int:
        self.lsh.insert(self.count, LeanMinHash(seed=1, hashvalues=signature, scheme="affine32"), check_duplication=False)
        self.count += 1
        return self.count - 1
