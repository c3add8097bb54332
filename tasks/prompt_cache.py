"""The KV cache of a batch of prompts, computed before `generate` goes on from it, and a cache layer that decoding
writes into in place. For generation on a CPU.

On a CPU the prompts' pass is bound by arithmetic: every padded position costs as much as a real one, and a batch
pads each prompt to its longest. Chat prompts also open alike (the template's system prompt and header are the
same tokens in every prompt). So here the opening every prompt of the batch shares is computed once, the rest of
the prompts in groups of like length (each padded to its own longest), and both are laid into one cache:

    [shared opening | each prompt's rest, padded on the left]

`generate` reads that layout with its attention mask as it reads a left-padded batch: the same positions, the same
keys. It feeds each prompt's last token itself, as its first step. Serving engines do the same with prefix caching
and unpadded prefill (vLLM, SGLang); transformers' `generate` does neither, so it is hand-written here.

While decoding, `DynamicLayer` copies each layer's whole cache into a new tensor for every new token;
`GrowingLayer` writes the token into room kept after the prompts instead.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

PREFILL_TOKENS = 512  # a group's padded tokens: GEMMs of a few hundred rows already run at full speed on a CPU
ANSWER_ROOM = 256  # positions kept for the answers at first; a longer answer doubles the stores


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of stores with `room` positions to spare; a new token is
    written into them, and the stores are replaced by larger ones only when full."""

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0
        self.key_store = self.value_store = self._view = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is not self._view:  # replaced outside `update` (reset, crop, beam search): start from them
            keys, values = self.keys, self.values
            self.key_store = self.value_store = self._view = None
            self.length = 0
            if keys is not None and keys.numel():
                self.write(keys, values, 0)
        self.write(key_states, value_states, self.length)
        return self.keys, self.values

    def reserve(self, batch: int, keys: torch.Tensor, values: torch.Tensor, positions: int) -> None:
        """Stores for `batch` rows and `positions` positions (plus room) like `keys` and `values`, holding what the
        layer has; zeros elsewhere, so positions never written stay finite under the attention mask."""
        key_store = keys.new_zeros(batch, keys.shape[1], positions + self.room, keys.shape[-1])
        value_store = values.new_zeros(batch, values.shape[1], positions + self.room, values.shape[-1])
        if self.length:
            key_store[:, :, : self.length] = self.key_store[:, :, : self.length]
            value_store[:, :, : self.length] = self.value_store[:, :, : self.length]
        self.key_store, self.value_store = key_store, value_store

    def write(self, keys: torch.Tensor, values: torch.Tensor, at: int, rows: list[int] | None = None) -> None:
        """`keys` and `values` at positions `at` on, for `rows` of the batch (all of them by default)."""
        end = at + keys.shape[-2]
        if self.key_store is None:
            self.reserve(keys.shape[0], keys, values, end)
        elif end > self.key_store.shape[-2]:  # full: twice the length, so that long answers copy it rarely
            self.reserve(self.key_store.shape[0], keys, values, max(end, 2 * self.length))
        rows = slice(None) if rows is None else rows
        self.key_store[rows, :, at:end] = keys
        self.value_store[rows, :, at:end] = values
        self.length = max(self.length, end)
        self.keys = self._view = self.key_store[:, :, : self.length]
        self.values = self.value_store[:, :, : self.length]
        self.is_initialized, self.device = True, keys.device


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s, one per layer of the model."""

    def __init__(self, layers: list[GrowingLayer]):
        Cache.__init__(self, layers=layers)


def applies(model) -> bool:
    """On a CPU, for a model whose every layer keeps an ordinary growing cache (no sliding window, no linear
    attention, no layer sharing another's) and whose decoder takes a cache and positions (remote code may not)."""
    if model.device.type != "cpu":
        return False
    layers = DynamicCache(config=model.config).layers
    taken = inspect.signature(model.get_decoder().forward).parameters
    return (bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
            and {"cache", "position_ids", "attention_mask"} <= taken.keys())


def shared_opening(rows: list[list[int]]) -> int:
    """How many tokens every row opens with, leaving each row at least its last token (generate's first step)."""
    shortest = min(len(row) for row in rows) - 1
    length = 0
    while length < shortest and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


def like_length_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices in groups of like length, longest first; a group holds one row at least, and more while padded to
    its longest it stays within PREFILL_TOKENS."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda index: -lengths[index]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= PREFILL_TOKENS:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@torch.no_grad()
def prefilled(model, rows: list[list[int]], pad_token_id: int, max_new_tokens: int) -> dict:
    """`generate`'s input_ids, attention_mask and cache for the prompts' token `rows` (none empty), with every token
    but each prompt's last already in the cache, which keeps room for answers of `max_new_tokens`."""
    room = min(max_new_tokens, ANSWER_ROOM)
    count = len(rows)
    opening = shared_opening(rows) if count > 1 else 0
    rests = [row[opening:-1] for row in rows]
    width = opening + max(len(rest) for rest in rests)  # the cached positions
    input_ids = torch.full((count, width + 1), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        tail = len(row) - opening
        input_ids[index, :opening], input_ids[index, -tail:] = torch.tensor(row[:opening]), torch.tensor(row[opening:])
        attention_mask[index, :opening] = attention_mask[index, -tail:] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)

    decoder = model.get_decoder()
    layers = [GrowingLayer(room) for _ in DynamicCache(config=model.config).layers]
    shared = DynamicCache()
    if opening:
        decoder(input_ids=input_ids[:1, :opening], cache=shared, use_cache=True)
        for layer, computed in zip(layers, shared.layers):
            layer.reserve(count, computed.keys, computed.values, width)
            layer.write(computed.keys.expand(count, -1, -1, -1), computed.values.expand(count, -1, -1, -1), 0)
    for group in like_length_groups([len(rest) for rest in rests]):
        longest = len(rests[group[0]])
        if not longest:
            continue
        columns = slice(width - longest, width)
        mask = torch.cat([attention_mask[group, :opening], attention_mask[group, columns]], dim=1)
        cache = DynamicCache()
        for index, layer in enumerate(shared.layers):
            cache.update(layer.keys.expand(len(group), -1, -1, -1), layer.values.expand(len(group), -1, -1, -1), index)
        decoder(input_ids=input_ids[group, columns], attention_mask=mask, cache=cache, use_cache=True,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, opening:])
        for layer, computed in zip(layers, cache.layers):
            if layer.key_store is None:
                layer.reserve(count, computed.keys, computed.values, width)
            layer.write(computed.keys[:, :, opening:], computed.values[:, :, opening:], width - longest, group)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": GrowingCache(layers)}
