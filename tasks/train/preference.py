"""The preference objectives through TRL's own trainers and losses: DPO (`DPOTrainer`), KTO (`KTOTrainer`), and
the reference-free ORPO (`ORPOTrainer`) and SimPO (`CPOTrainer` with its SimPO loss), the last two from
`trl.experimental`.

They train on the tokenize stage's samples, rendered as SFT renders conversations (tasks/tokenize.py), so TRL's own
tokenizing step is skipped. With LoRA or QLoRA the reference is the base with the adapter switched off, or, when
training starts from an adapter (`train.init_adapter`), TRL's frozen copy of that adapter ("ref"): no second model
in memory either way. TRL logs rewards, margins, accuracies and log-probabilities per step (StepMetrics passes them
on).
"""

from __future__ import annotations

import torch
import trl.kernels.chunked_logprob
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from conf.schema import PreferenceConfig

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a starting adapter
# Without Triton (a CPU), TRL's fused LM head scores every position in fp32 tiles of TOKEN_CHUNK_SIZE tokens x 32768
# vocabulary entries: at its 4096, 512 MB a tile, several alive at once, which set a DPO step's peak memory. At 1024
# the same step peaked 2.7 to 2.9 GB lower at the same speed (4 pairs of 512 tokens). TRL has no setting for it.
CPU_TOKENS_PER_LOGIT_TILE = 1024


class TokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on samples already tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`), batched by `length`
    (group_by_length, as SFT batches unpacked samples: a pair's rows are padded to its batch's longest)."""

    def _prepare_dataset(self, dataset: Dataset, processing_class, args, dataset_name: str) -> Dataset:
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "length"]  # the sampler reads it; the collator does not


class TokenizedKTOTrainer(KTOTrainer):
    """KTOTrainer on samples already tokenized (`prompt_ids`, `completion_ids`, `label`)."""

    def _prepare_dataset(self, dataset: Dataset, processing_class, args, dataset_name: str) -> Dataset:
        if not self.calculate_KL:
            return dataset
        # TRL builds the KL term's mismatched pairs inside the tokenizing step skipped here; the same rotation: each
        # prompt with the completion before it, within each batch of per_device_train_batch_size samples.
        return dataset.map(
            lambda batch: {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]},
            batched=True, batch_size=args.per_device_train_batch_size)


class _TokenizedPairs:
    """ORPO's and CPO's trainers tokenize prompt/chosen/rejected strings row by row in `tokenize_row`; here a row is
    the tokenize stage's ids, laid out as their collator reads them (each side the prompt and the answer, labels on
    the answer alone). Hand-written: these trainers have no way to take tokenized pairs."""

    def tokenize_row(self, feature: dict, model=None) -> dict:
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = feature[f"{side}_ids"]
            row |= {f"{side}_input_ids": prompt + answer, f"{side}_attention_mask": [1] * (len(prompt) + len(answer)),
                    f"{side}_labels": [-100] * len(prompt) + answer}
        return row

    def _track_num_input_tokens(self, inputs):
        """The Trainer counts `input_ids`, which these batches hold per side: both sides' real tokens are counted."""
        if self.args.include_num_input_tokens_seen != "no":
            tokens = sum(inputs[f"{side}_attention_mask"].sum() for side in ("chosen", "rejected"))
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens.to(self.args.device)).sum().item()


def _reference_free_trainer(objective: str, preference: PreferenceConfig, arguments: dict, model, train_dataset,
                            tokenizer, callbacks) -> Trainer:
    # Imported here: trl.experimental warns on import that its API is unstable, which only these objectives use.
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class TokenizedORPOTrainer(_TokenizedPairs, ORPOTrainer):
        pass

    class TokenizedCPOTrainer(_TokenizedPairs, CPOTrainer):
        pass

    # Their collator pads every *_input_ids, *_attention_mask and *_labels column, so columns stay; samples were cut
    # to tokenize.max_length already.
    common = {"beta": preference.beta, "max_length": max(train_dataset["length"]), "remove_unused_columns": False,
              "train_sampling_strategy": "group_by_length"}
    if objective == "orpo":
        args, trainer_class = ORPOConfig(**arguments | common), TokenizedORPOTrainer
    else:
        args = CPOConfig(**arguments | common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=preference.simpo_gamma)
        trainer_class = TokenizedCPOTrainer
    return trainer_class(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                         callbacks=callbacks)


def preference_trainer(objective: str, preference: PreferenceConfig, arguments: dict, model: PreTrainedModel,
                       train_dataset: Dataset, tokenizer: PreTrainedTokenizerBase, callbacks: list[TrainerCallback],
                       *, reference_is_base: bool) -> Trainer:
    """TRL's trainer for `objective` (dpo, kto, orpo or simpo) with the run's training `arguments` (what
    TrainingArguments takes) and the recipe's preference settings. Samples were cut to tokenize.max_length already: TRL cuts nothing.

    `reference_is_base`: the model's adapter is new, so the reference is the base with the adapter switched off;
    else (an adapter training started from) TRL's frozen copy of the adapter as it was."""
    if not torch.cuda.is_available():
        trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE = CPU_TOKENS_PER_LOGIT_TILE
    if objective in ("orpo", "simpo"):
        return _reference_free_trainer(objective, preference, arguments, model, train_dataset, tokenizer, callbacks)
    common = {"beta": preference.beta, "max_length": None}
    if preference.loss_type is not None:
        common["loss_type"] = preference.loss_type
    if objective == "dpo":
        args = DPOConfig(**arguments | {"train_sampling_strategy": "group_by_length"}, **common)
        trainer_class = TokenizedDPOTrainer
    else:
        # KTO's KL term pairs each sample with its neighbour in a fixed-order batch (TRL requires sequential
        # sampling): the samples are shuffled once, by the run's seed, instead of every epoch.
        args = KTOConfig(**arguments | {"train_sampling_strategy": "sequential"}, **common,
                         desirable_weight=preference.desirable_weight, undesirable_weight=preference.undesirable_weight)
        train_dataset = train_dataset.shuffle(seed=args.seed)
        trainer_class = TokenizedKTOTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                            callbacks=callbacks)
    if reference_is_base and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        # TRL copies any adapter it is given; a new one's copy is the base itself, at the cost of LoRA's compute in
        # every reference pass. Without it TRL switches the adapter off for the reference.
        model.delete_adapter(REFERENCE_ADAPTER)
    return trainer
