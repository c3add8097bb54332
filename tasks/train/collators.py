"""Batches as each model and packing needs them: packed rows with per-sample positions, or padded samples."""

from __future__ import annotations

from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as PaddingFreeCollator

from tasks.labels import Head


class PackedRowsCollator:
    """Packed rows as a (batch, row length) tensor with position_ids restarting per sample and no attention mask,
    from which transformers builds a block-diagonal mask per row.

    TRL's padding-free mode flattens the whole batch into one sequence: right for FlashAttention's variable-length
    kernels, but with SDPA or eager the mask then spans the whole batch (8 rows of 512 tokens: one 4096 x 4096
    mask per layer) and training ran slower than padded batches. TRL has no rows-kept mode without an attention
    mask, hence this wrapper. Each row's padded tail gets position 0 at every token (one-token "samples") and
    label -100; a sample's first token is never a target, so no loss crosses a sample boundary.
    """

    def __init__(self, pad_token_id: int):
        self.collate = PaddingFreeCollator(pad_token_id=pad_token_id, return_position_ids=True)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        del batch["attention_mask"]
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def training_collator(tokenizer, packed: bool, attn: str, head: Head | None = None):
    """Packed rows: flattened into one padding-free sequence for FlashAttention 2, kept as rows otherwise (both
    with position_ids per sample); unpacked samples: padded to the longest in the batch (a task head's labels: one
    per text, or padded with -100 per token)."""
    if head is not None:
        if head.task == "token_classification":
            return DataCollatorForTokenClassification(tokenizer)
        return DataCollatorWithPadding(tokenizer)
    if packed and attn == "flash_attention_2":
        return PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    if packed:
        return PackedRowsCollator(tokenizer.pad_token_id)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
