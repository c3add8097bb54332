"""The prompts' cache computed before generate (tasks/prompt_cache.py): generate goes on from it as from each prompt
alone, and its layers hold what transformers' own DynamicLayer holds."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from tasks import prompt_cache

PAD = 2


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from tasks.base_model import load_model

    return load_model(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tiny_tuned(tiny_model_dir):
    """The tiny model under a LoRA adapter that changes its answers (random B, not PEFT's zeros)."""
    from peft import LoraConfig, get_peft_model

    from tasks.base_model import load_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(load_model(tiny_model_dir), config).eval()


def _greedy(model, steps: int, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    output = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=PAD,
                            output_logits=True, return_dict_in_generate=True)
    return output.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(output.logits, dim=1)


@pytest.mark.parametrize("which", ["base", "tuned"])
@torch.no_grad()
def test_generate_goes_on_from_the_prompts_cache_as_from_each_prompt_alone(which, request, monkeypatch):
    """A shared opening (cut short by the shortest prompt, which keeps its last token), rests in several groups (a
    small group size), a prompt with no rest at all, answers longer than the room kept for them: each prompt's tokens
    and logits equal generate on it alone, for the base model and under a LoRA adapter (the prompts' pass runs the
    adapted layers too)."""
    tiny_model = request.getfixturevalue({"base": "tiny_model", "tuned": "tiny_tuned"}[which])
    monkeypatch.setattr(prompt_cache, "PREFILL_TOKENS", 24)
    opening = [11, 12, 13, 14, 15]
    rows = [opening + [20 + n for n in range(extra)] for extra in (9, 1, 14, 0, 6, 7)]
    assert prompt_cache.shared_opening(rows) == 4
    assert len(prompt_cache.like_length_groups([len(row) - 5 for row in rows])) > 2
    inputs = prompt_cache.prefilled(tiny_model, rows, PAD, max_new_tokens=3)
    assert inputs["cache"].get_seq_length() == inputs["input_ids"].shape[1] - 1
    tokens, logits = _greedy(tiny_model, 5, **inputs)
    for index, row in enumerate(rows):
        alone_tokens, alone_logits = _greedy(tiny_model, 5, input_ids=torch.tensor([row]))
        assert tokens[index].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[index], alone_logits[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_one_prompt_alone_and_one_token_prompts_take_the_same_path(tiny_model):
    for rows in ([[11, 12, 13, 14]], [[11], [12]], [[7]]):
        inputs = prompt_cache.prefilled(tiny_model, rows, PAD, max_new_tokens=2)
        tokens, _ = _greedy(tiny_model, 3, **inputs)
        for index, row in enumerate(rows):
            assert tokens[index].tolist() == _greedy(tiny_model, 3, input_ids=torch.tensor([row]))[0][0].tolist()


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_through_crops_and_reordering():
    """Past its room (new stores), after a crop and after a batch reordering (both replace the keys from outside)."""
    torch.manual_seed(0)
    growing, dynamic = prompt_cache.GrowingLayer(room=2), DynamicLayer()
    for step, length in enumerate([5, 1, 1, 1, 4, 1]):
        keys, values = torch.randn(3, 2, length, 4), torch.randn(3, 2, length, 8)
        expected, got = dynamic.update(keys, values), growing.update(keys, values)
        for want, have in zip(expected, got):
            torch.testing.assert_close(have, want, rtol=0, atol=0)
        assert growing.get_seq_length() == dynamic.get_seq_length()
        if step == 2:
            growing.crop(-2), dynamic.crop(-2)
        if step == 3:
            order = torch.tensor([2, 0, 1])
            growing.reorder_cache(order), dynamic.reorder_cache(order)


def test_a_model_with_a_sliding_window_cache_keeps_the_padded_batch(tiny_model):
    from transformers import MistralConfig, MistralForCausalLM

    assert prompt_cache.applies(tiny_model)
    sliding = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=4))
    assert not prompt_cache.applies(sliding)
