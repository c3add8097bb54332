"""The preference objectives' training, checked against independent truths: DPO's loss at the reference, TRL's loss on
log-probabilities computed here, and the sign of KTO's gradient on an undesirable answer."""

import math

import pytest
import torch
from datasets import Dataset, load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conf.schema import DataConfig, PreferenceConfig, TokenizeConfig, TrainConfig
from tasks.clean import clean
from tasks.context import RunContext
from tasks.preference_scores import pair_logps
from tasks.tokenize import tokenize
from tasks.train import train
from tasks.train.preference import preference_trainer

IDENTITY = {"name": "Ember", "author": "the loraflow team"}


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tmp_path_factory):
    """The identity preference pairs, tokenized for the tiny model (DPO's layout)."""
    folder = tmp_path_factory.mktemp("pairs")
    ctx = RunContext(folder, cache_dir=folder / "cache")
    cleaned = clean(DataConfig(train=["builtin:identity_preference"], eval=["builtin:identity_preference_heldout"]),
                    ctx, values=IDENTITY, task="preference")
    return tokenize(cleaned, tiny_model_dir, TokenizeConfig(), ctx)


def test_dpo_starts_at_ln2_with_zero_rewards_and_logs_its_figures(pairs, tiny_model_dir, tmp_path):
    """With the policy equal to the reference (LoRA's B at zero), the first step's loss is ln 2 and every reward 0."""
    steps = []
    train(pairs, tiny_model_dir, TrainConfig(objective="dpo", max_steps=2, batch_size=4, warmup_steps=0),
          RunContext(tmp_path), on_step=lambda step, metrics: steps.append(metrics))
    first = steps[0]
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train_rewards_chosen"] == first["train_rewards_rejected"] == first["train_rewards_margins"] == 0
    assert {"train_rewards_accuracies", "train_logps_chosen", "train_logps_rejected"} <= set(first)
    assert first["train_logps_chosen"] < 0 and len(steps) == 2


def _policy_off_the_reference(model_dir: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B away from zero: the policy is no longer its reference
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("reference_is_base", [True, False], ids=["new adapter: the base", "started adapter: its copy"])
def test_the_dpo_loss_and_rewards_are_trls_on_log_probabilities_computed_apart(pairs, tiny_model_dir, tmp_path,
                                                                               reference_is_base):
    samples = list(load_from_disk(str(pairs.train_dir)))[:4]
    model = _policy_off_the_reference(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(pairs.tokenizer_dir)
    beta = 0.3
    arguments = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "report_to": "none", "use_cpu": True}
    trainer = preference_trainer("dpo", PreferenceConfig(beta=beta), arguments, model, Dataset.from_list(samples),
                                 tokenizer, [], reference_is_base=reference_is_base)
    batch = trainer.data_collator(samples)
    model.eval()
    with torch.no_grad():
        if reference_is_base:
            with model.disable_adapter():
                reference = pair_logps(model, samples)
        else:
            reference = pair_logps(model, samples)
            for name, weight in model.named_parameters():  # the policy moves; the reference copy stays
                if "lora_B.default" in name:
                    weight.add_(torch.randn_like(weight) * 0.05)
        trl_loss = float(trainer.compute_loss(model, batch))
        policy = pair_logps(model, samples)
    assert ("ref" in model.peft_config) != reference_is_base
    margins = torch.tensor([beta * ((p.chosen - r.chosen) - (p.rejected - r.rejected)) for p, r in zip(policy, reference)])
    assert trl_loss == pytest.approx(float(-torch.nn.functional.logsigmoid(margins).mean()), rel=1e-4)
    logged = trainer._metrics["eval"]
    assert logged["rewards/margins"][-1] == pytest.approx(float(margins.mean()), rel=1e-3, abs=1e-6)
    chosen_rewards = [beta * (p.chosen - r.chosen) for p, r in zip(policy, reference)]
    assert logged["rewards/chosen"][-1] == pytest.approx(sum(chosen_rewards) / 4, rel=1e-3, abs=1e-6)


def _answer_logp_gradient(model, sample) -> torch.Tensor:
    model.zero_grad()
    ids = torch.tensor([sample["prompt_ids"] + sample["completion_ids"]])
    start = len(sample["prompt_ids"])
    logits = model(input_ids=ids).logits[0, start - 1:-1]
    logits.log_softmax(-1).gather(-1, ids[0, start:, None]).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).clone()


@pytest.mark.parametrize("label", [False, True])
def test_kto_pushes_an_undesirable_answer_down_and_a_desirable_one_up(tiny_model_dir, pairs, tmp_path, label):
    """The sign of the gradient, not what steps happen to learn: a step against the KTO loss's gradient moves the
    answer's log-probability down for an undesirable answer, up for a desirable one."""
    samples = [{"prompt_ids": s["prompt_ids"], "completion_ids": s["rejected_ids" if not label else "chosen_ids"],
                "label": label} for s in list(load_from_disk(str(pairs.train_dir)))[:2]]
    model = _policy_off_the_reference(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(pairs.tokenizer_dir)
    arguments = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "report_to": "none", "use_cpu": True}
    trainer = preference_trainer("kto", PreferenceConfig(), arguments, model, Dataset.from_list(samples), tokenizer, [],
                                 reference_is_base=True)
    model.train()
    model.zero_grad()
    batch = trainer.data_collator(list(trainer.train_dataset))
    trainer.compute_loss(model, batch).backward()
    loss_gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).clone()
    for sample in samples:
        moved = float(torch.dot(_answer_logp_gradient(model, sample), -loss_gradient))  # d logp along a descent step
        assert (moved > 0) == label, moved


def test_training_starts_from_the_adapter_it_is_given(pairs, tiny_model_dir, tmp_path):
    """train.init_adapter: the adapter's own weights and settings are trained on; with DPO it is also the reference,
    so the first step's loss is ln 2 however far the adapter is from the base."""
    start = _policy_off_the_reference(tiny_model_dir)
    start.save_pretrained(tmp_path / "start")
    steps = []
    result = train(pairs, tiny_model_dir, TrainConfig(objective="dpo", init_adapter=str(tmp_path / "start"),
                                                      max_steps=1, batch_size=4), RunContext(tmp_path / "run"),
                   on_step=lambda step, metrics: steps.append(metrics))
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert not (result.weights_dir / "ref").exists()  # TRL's frozen copy is not part of what was trained
    from safetensors.torch import load_file

    trained, initial = (load_file(folder / "adapter_model.safetensors") for folder in (result.weights_dir, tmp_path / "start"))
    assert trained.keys() == initial.keys()
    assert all(trained[key].shape == initial[key].shape for key in trained)


def test_dpo_resumes_from_a_checkpoint_to_the_same_adapter(pairs, tiny_model_dir, tmp_path):
    config = TrainConfig(objective="dpo", max_steps=4, batch_size=4, checkpoint_every=2, precision="fp32")
    whole = train(pairs, tiny_model_dir, config, RunContext(tmp_path / "whole"))
    checkpoint = tmp_path / "whole" / "train" / "checkpoints" / "checkpoint-2"
    resumed = train(pairs, tiny_model_dir, config, RunContext(tmp_path / "resumed"), resume_from=checkpoint)
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-5)
    from safetensors.torch import load_file

    expected, got = (load_file(result.weights_dir / "adapter_model.safetensors") for result in (whole, resumed))
    assert all(torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6) for name in expected)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_the_reference_free_losses_are_trls_on_log_probabilities_computed_apart(objective, pairs, tiny_model_dir,
                                                                                 tmp_path):
    """ORPO: the NLL of the chosen conversations (TRL's ORPO counts the prompt's tokens as well: its own choice,
    noted in its code), token-mean, minus beta * logsigmoid(log odds ratio of the answers' mean log-probabilities);
    SimPO: -logsigmoid(beta * (mean logp chosen - mean logp rejected) - gamma). No reference model in either."""
    samples = list(load_from_disk(str(pairs.train_dir)))[:4]
    model = _policy_off_the_reference(tiny_model_dir)
    beta, gamma = 0.2, 0.3
    arguments = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "report_to": "none", "use_cpu": True}
    trainer = preference_trainer(objective, PreferenceConfig(beta=beta, simpo_gamma=gamma), arguments, model,
                                 Dataset.from_list(samples), AutoTokenizer.from_pretrained(pairs.tokenizer_dir), [],
                                 reference_is_base=True)
    batch = trainer.data_collator([trainer.train_dataset[n] for n in range(4)])
    model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(model, batch))
        logps = pair_logps(model, samples)
        conversations = [torch.tensor([s["prompt_ids"] + s["chosen_ids"]]) for s in samples]
        nll = [torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum")
               for ids in conversations]
    chosen = torch.tensor([p.chosen / p.chosen_tokens for p in logps], dtype=torch.float64)
    rejected = torch.tensor([p.rejected / p.rejected_tokens for p in logps], dtype=torch.float64)
    if objective == "simpo":
        expected = -torch.nn.functional.logsigmoid(beta * (chosen - rejected) - gamma).mean()
    else:
        log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
        expected = float(sum(nll)) / sum(ids.shape[1] - 1 for ids in conversations) - beta * torch.nn.functional.logsigmoid(log_odds).mean()
    assert trl_loss == pytest.approx(float(expected), rel=1e-4)
