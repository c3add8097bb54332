"""How a model ranks the two answers of held-out preference pairs: what evaluation reports for DPO and KTO runs.

- `preference_accuracy`: the share of pairs whose chosen answer has the higher length-normalised log-probability
  (the mean per answer token). It needs no reference, so the base and the tuned model are scored the same way.
- `reward_margin` and `reward_accuracy`: DPO's implicit reward, beta * (log pi(y|x) - log pi_ref(y|x)) summed over
  the answer, of the chosen answer minus the rejected one, with the evaluation's base model as the reference; the
  mean margin, and the share of pairs where it is positive. The base model is its own reference: 0 for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFERENCE_METRICS = ("preference_accuracy", "reward_margin", "reward_accuracy")


@dataclass(frozen=True)
class PairLogps:
    """The summed log-probabilities of a pair's answers, and their lengths in tokens."""

    chosen: float
    rejected: float
    chosen_tokens: int
    rejected_tokens: int

    @property
    def prefers_chosen(self) -> bool:
        return self.chosen / self.chosen_tokens > self.rejected / self.rejected_tokens


def _answer_logp(model, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return float(logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).sum())


@torch.no_grad()
def pair_logps(model, samples: list[dict]) -> list[PairLogps]:
    """For each held-out sample with both answers (an unpaired row has one), its answers' log-probabilities."""
    return [PairLogps(_answer_logp(model, s["prompt_ids"], s["chosen_ids"]),
                      _answer_logp(model, s["prompt_ids"], s["rejected_ids"]), len(s["chosen_ids"]),
                      len(s["rejected_ids"]))
            for s in samples if s.get("chosen_ids") and s.get("rejected_ids")]


def preference_accuracy(pairs: list[PairLogps]) -> float:
    return sum(pair.prefers_chosen for pair in pairs) / len(pairs) if pairs else float("nan")


def reward_scores(policy: list[PairLogps], reference: list[PairLogps], beta: float) -> dict[str, float]:
    """The mean implicit reward margin of `policy` over `reference` on the same pairs, and the share above 0."""
    margins = [beta * ((mine.chosen - ref.chosen) - (mine.rejected - ref.rejected))
               for mine, ref in zip(policy, reference, strict=True)]
    if not margins:
        return {"reward_margin": float("nan"), "reward_accuracy": float("nan")}
    return {"reward_margin": sum(margins) / len(margins),
            "reward_accuracy": sum(margin > 0 for margin in margins) / len(margins)}
