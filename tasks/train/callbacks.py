"""What the Trainer reports while it trains: a progress bar, per-step metrics, and sample answers every few steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from transformers import ProgressCallback, TrainerCallback

from tasks.device import autocast, peak_memory_mb
from tasks.heldout import heldout_loss
from tasks.generation import SamplePrompts

PREFERENCE_LOGS = ("rewards/", "logps/", "logits/", "kl", "nll_loss", "log_odds")
StepLogger = Callable[[int, dict[str, float]], None]
SampleLogger = Callable[[int, list[dict]], None]


@dataclass(frozen=True)
class HeldOutReport:
    """Held-out loss every `every_steps` steps to `on_loss(step, loss)`; its answering True stops training there (a
    sweep's pruner judged the point hopeless)."""

    every_steps: int
    on_loss: Callable[[int, float], bool]


class ProgressBarOnly(ProgressCallback):
    """The Trainer's progress bar without its per-step dict printout (the steps go to MLflow instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class StepMetrics(TrainerCallback):
    """Turn the Trainer's per-step logs into loss, learning rate, grad norm and non-padding tokens/s (and a
    preference objective's rewards, margins, accuracies and log-probabilities, as train_rewards_margins and so on)."""

    def __init__(self, on_step: StepLogger):
        self.on_step = on_step
        self.last_time = time.perf_counter()
        self.first_tokens = self.last_tokens = 0
        self.losses: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed Trainer starts from the checkpoint's token count; this process's speed counts from here.
        self.first_tokens = self.last_tokens = int(state.num_input_tokens_seen)
        self.last_time = time.perf_counter()

    @property
    def tokens(self) -> int:
        return self.last_tokens - self.first_tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = int(state.num_input_tokens_seen)
        metrics = {
            "train_loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs.get("grad_norm", 0.0)),
            "tokens_per_s": (tokens - self.last_tokens) / max(now - self.last_time, 1e-9),
            "tokens_seen": float(tokens),
            "peak_memory_mb": peak_memory_mb(),
        }
        # A preference objective's own figures, as TRL logs them (rewards/margins, logps/chosen, kl, ...).
        metrics |= {f"train_{key.replace('/', '_')}": float(value) for key, value in logs.items()
                    if key.startswith(PREFERENCE_LOGS) and isinstance(value, int | float)}
        self.last_time, self.last_tokens = now, tokens
        self.losses.append(metrics["train_loss"])
        self.on_step(state.global_step, metrics)


class AnswerSamplePrompts(TrainerCallback):
    """Every `every_steps` steps the model in training answers the fixed sample prompts (greedy), for `on_samples`.

    Every process generates (under ZeRO-3 each holds a shard of the weights the others need); rank 0 logs.
    """

    def __init__(self, samples: SamplePrompts, tokenizer, precision: str, on_samples: SampleLogger):
        self.samples, self.tokenizer, self.precision, self.on_samples = samples, tokenizer, precision, on_samples

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.samples.every_steps:
            return
        model.eval()
        with autocast(self.precision):
            answers = self.samples.answer(model, self.tokenizer)
        model.train()
        self.on_samples(state.global_step, [{"prompt": shown, "answer": answer}
                                            for shown, answer in zip(self.samples.shown, answers)])


class HeldOutLossEvery(TrainerCallback):
    """Every `report.every_steps` steps (and at the last), the held-out loss of the model in training, measured as
    evaluation measures it after training, goes to `report.on_loss`; True from it stops training (`stopped_at`)."""

    def __init__(self, samples: list[dict], report: HeldOutReport, precision: str):
        self.samples, self.report, self.precision = samples, report, precision
        self.stopped_at: int | None = None
        self.last_loss = float("nan")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.report.every_steps and state.global_step < state.max_steps:
            return
        model.eval()
        with autocast(self.precision):
            self.last_loss = heldout_loss(model, self.samples)
        model.train()
        if self.report.on_loss(state.global_step, self.last_loss) and state.global_step < state.max_steps:
            self.stopped_at = state.global_step
            control.should_training_stop = True
