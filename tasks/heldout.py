"""Held-out loss: what evaluation reports after training and what training reports every few steps (a sweep's
pruner reads it), measured one way. Its own module, so that neither stage imports the other."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, samples: list[dict]) -> float:
    """Mean cross-entropy per trained token over all samples (token-weighted, not sample-weighted)."""
    total, count = 0.0, 0
    for sample in samples:
        ids = torch.tensor([sample["input_ids"]], device=model.device)
        labels = torch.tensor([sample["labels"]], device=model.device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = labels[0, 1:]
        total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count
