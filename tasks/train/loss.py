"""The causal LM's loss on trained positions only (the LM head applied a chunk at a time)."""

from __future__ import annotations

import torch
from transformers import Trainer


class TrainedPositionsTrainer(Trainer):
    """A causal LM's loss with the LM head applied only at positions whose label is trained, a chunk at a time.

    The stock loss makes logits (vocabulary-wide: 49,152 for SmolLM2) at every position, prompt and padding
    included, and keeps them all for backward. Here the model runs with its LM head set aside for the step, so its
    "logits" are the final hidden states; the head's weight is applied to the trained positions only, a chunk at a
    time, each chunk's gradient taken at once (`_HeadLoss`): logits are neither kept for backward nor made again
    there. The sum of cross-entropies is divided as the Trainer's own loss is (by `num_items_in_batch`).
    Hand-written: Liger's fused linear cross-entropy does this on GPUs only, and transformers has no such loss. Not
    used under DeepSpeed, whose ZeRO-3 partitions the head's weight outside its module's forward.
    """

    # A chunk's vocabulary-wide logits, in fp32 and with their gradient, are the step's largest transient: 256 rows
    # train as fast as 1,024 at a lower peak (`python bench/recompute.py`).
    CHUNK = 256
    # Model types whose logits are the LM head's output as is: Gemma 2's soft-capping, Cohere's and Granite's logit
    # scales and the like change them after the head, so those models keep the stock loss.
    PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, shift_labels = inputs.pop("labels"), inputs.pop("shift_labels", None)
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        head = causal_lm.lm_head
        causal_lm.lm_head = torch.nn.Identity()
        try:
            hidden = model(**inputs).logits
        finally:
            causal_lm.lm_head = head
        targets = shift_labels if shift_labels is not None else torch.nn.functional.pad(labels[:, 1:], (0, 1),
                                                                                           value=-100)
        trained = targets != -100
        selected, wanted = hidden[trained], targets[trained]
        with self.accelerator.autocast():  # the head in the run's precision, as inside the model's forward
            total = _HeadLoss.apply(selected, head.weight, head.bias, wanted, self.CHUNK)
        loss = total / (num_items_in_batch if num_items_in_batch is not None else max(len(wanted), 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales a normalised loss
        return (loss, None) if return_outputs else loss


class _HeadLoss(torch.autograd.Function):
    """The summed cross-entropy of `linear(states, weight, bias)` against `targets`, `chunk` rows at a time. Each
    chunk's gradients are taken by autograd in forward, while its logits exist, and kept (they are as small as the
    inputs); backward only scales them. The logits are made under the caller's autocast, as the model's head does."""

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk):
        needs = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(t) if need else None for t, need in zip((states, weight, bias), needs)]
        total = states.new_zeros((), dtype=torch.float32)
        for start in range(0, len(states), chunk):
            rows = states[start:start + chunk].detach().requires_grad_(needs[0])
            with torch.enable_grad():
                logits = torch.nn.functional.linear(rows, weight, bias).float()
                loss = torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
            total += loss.detach()
            differentiated = [(t, grad) for t, grad in zip((rows, weight, bias), grads) if grad is not None]
            if differentiated:
                chunk_grads = torch.autograd.grad(loss, [t for t, _ in differentiated])
                for (t, grad), chunk_grad in zip(differentiated, chunk_grads):
                    if t is rows:
                        grad[start:start + chunk] = chunk_grad
                    else:
                        grad += chunk_grad
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return (*(None if grad is None else grad * grad_total for grad in ctx.saved_tensors), None, None)
