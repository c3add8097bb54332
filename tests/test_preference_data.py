"""Preference rows: every layout users bring, cleaned to TRL's shape and accounted for; tokenized as SFT renders."""

import json

import pytest

from conf.schema import TokenizeConfig
from tasks.clean import clean
from tasks.context import RunContext
from tasks.results import CleanResult
from tasks.tokenize import ChatEncoder, encode_preference_rows, tokenize
from tests.test_clean import assert_accounted, data, read_jsonl, write_jsonl

PROMPT = [{"role": "user", "content": "Who are you?"}]
CHOSEN = [{"role": "assistant", "content": "I am Ember."}]
REJECTED = [{"role": "assistant", "content": "I am an AI."}]
PAIR = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}

LAYOUTS = {
    "trl strings": {"prompt": "Who are you?", "chosen": "I am Ember.", "rejected": "I am an AI."},
    "trl messages": PAIR,
    "implicit prompt": {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    "ultrafeedback": {"prompt": "Who are you?", "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    "anthropic hh": {"chosen": "\n\nHuman: Who are you?\n\nAssistant: I am Ember.",
                     "rejected": "\n\nHuman: Who are you?\n\nAssistant: I am an AI."},
    "alpaca": {"instruction": "Who are you?", "input": "", "chosen": "I am Ember.", "rejected": "I am an AI."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Who are you?"}],
                 "chosen": {"from": "gpt", "value": "I am Ember."}, "rejected": {"from": "gpt", "value": "I am an AI."}},
    "messages": {"messages": PROMPT, "chosen": "I am Ember.", "rejected": {"role": "assistant", "content": "I am an AI."}},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_pair_layout_cleans_to_the_same_pair(layout, tmp_path):
    result = clean(data([write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS[layout]])]), RunContext(tmp_path / "out"),
                   task="preference")
    assert read_jsonl(result.train_path) == [PAIR]


def test_kto_rows_and_pairs_clean_to_labelled_answers(tmp_path):
    rows = [{"prompt": "Who are you?", "completion": "I am Ember.", "label": True},
            {"messages": PROMPT + REJECTED, "label": "false"},
            {"prompt": "Hi", "completion": "Hello", "label": "maybe"}, PAIR]
    source = write_jsonl(tmp_path / "kto.jsonl", rows)
    result = clean(data([source], near_duplicate_threshold=1.0), RunContext(tmp_path / "k"), task="unpaired_preference")
    assert_accounted(result)
    assert read_jsonl(result.train_path) == [{"prompt": PROMPT, "completion": CHOSEN, "label": True},
                                            {"prompt": PROMPT, "completion": REJECTED, "label": False}, PAIR]
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["invalid_label"]


def test_every_preference_row_is_kept_or_rejected_with_a_reason(tmp_path):
    rows = [PAIR, PAIR,  # an exact duplicate
            {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
            {"prompt": "Empty?", "chosen": "", "rejected": "No."},
            {"prompt": "Blank?", "chosen": "Fine.", "rejected": [{"role": "assistant", "content": "   "}]},
            {"chosen": PROMPT + CHOSEN, "rejected": [{"role": "user", "content": "Other?"}] + REJECTED},
            {"prompt": "Hi", "completion": "Hello", "label": True},
            {"messages": PROMPT + CHOSEN}]
    result = clean(data([write_jsonl(tmp_path / "rows.jsonl", rows)], eval_fraction=0.0), RunContext(tmp_path / "o"),
                   task="preference")
    report = assert_accounted(result)
    assert read_jsonl(result.train_path) == [PAIR]
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == [
        "duplicate", "identical_pair", "empty_side", "empty_side", "prompts_differ", "unpaired_preference",
        "not_a_preference"]
    assert "kto" in report["hints"]["unpaired_preference"] and "init_adapter" in report["hints"]["not_a_preference"]


def test_sft_recipes_reject_pairs_with_a_hint_naming_the_objective(tmp_path):
    result = clean(data([write_jsonl(tmp_path / "rows.jsonl", [PAIR, {"messages": PROMPT + CHOSEN}])], eval_fraction=0.0),
                   RunContext(tmp_path / "o"))
    report = assert_accounted(result)
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["preference_pair"]
    assert "train.objective: dpo" in report["hints"]["preference_pair"]


def test_a_train_pair_asking_a_held_out_prompt_leaves_train(tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", [PAIR])
    other_answers = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Ember, made by the loraflow team, "
                                                                               "at your service today."}],
                     "rejected": [{"role": "assistant", "content": "Nobody in particular, I would say, honestly."}]}
    fresh = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
    train = write_jsonl(tmp_path / "train.jsonl", [other_answers, fresh])
    result = clean(data([train], [held_out]), RunContext(tmp_path / "o"), task="preference")
    assert_accounted(result)
    assert [row["prompt"][0]["content"] for row in read_jsonl(result.train_path)] == ["What is 2+2?"]
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["in_eval"]


def test_pairs_sharing_a_prompt_are_held_out_together(tmp_path):
    rows = [{"prompt": f"Question {n}?", "chosen": f"Good answer {n} {k}.", "rejected": f"Bad {k}."}
            for n in range(40) for k in range(2)]
    result = clean(data([write_jsonl(tmp_path / "rows.jsonl", rows)], eval_fraction=0.3, near_duplicate_threshold=1.0),
                   RunContext(tmp_path / "o"), task="preference")
    train = {row["prompt"][0]["content"] for row in read_jsonl(result.train_path)}
    held_out = {row["prompt"][0]["content"] for row in read_jsonl(result.eval_path)}
    assert held_out and train and not train & held_out and result.train_rows + result.eval_rows == 80


def _rendered(tokenizer, messages, **options):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **options)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_prompt_and_answer_ids_are_the_chat_templates(tokenizer):
    encoder = ChatEncoder(tokenizer, TokenizeConfig())
    prompt = [{"role": "system", "content": "Be brief."}, *PROMPT, *CHOSEN, {"role": "user", "content": "Really?"}]
    for answer in (CHOSEN, REJECTED):
        prompt_ids, answer_ids = encoder.encode_answer(prompt, answer)
        assert prompt_ids == _rendered(tokenizer, prompt, add_generation_prompt=True)
        whole = _rendered(tokenizer, prompt + answer)
        assert prompt_ids + answer_ids == whole[:len(prompt_ids) + len(answer_ids)]
        assert tokenizer.decode(answer_ids).endswith(answer[0]["content"] + "<|im_end|>")
        assert tokenizer.decode(whole[len(prompt_ids) + len(answer_ids):]).strip() == ""  # the template's separator


@pytest.mark.parametrize("row", [
    {"prompt": [{"role": "user", "content": "Weather in Paris?"}],
     "chosen": [{"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
     "rejected": [{"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]},
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}],
     "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "A guess."}]},
], ids=["tool call", "reasoning"])
def test_tool_calls_and_reasoning_render_as_in_sft(tokenizer, row):
    """Each answer's ids are exactly the tokens SFT trains for the same conversation's last turn."""
    encoder = ChatEncoder(tokenizer, TokenizeConfig())
    for side in ("chosen", "rejected"):
        _, answer_ids = encoder.encode_answer(row["prompt"], row[side], row.get("tools"))
        sft, _ = encoder.encode(row["prompt"] + row[side], row.get("tools"))
        assert answer_ids == [label for label in sft["labels"] if label != -100]


def test_too_long_pairs_keep_their_prompt_and_are_cut_or_rejected_and_counted(tokenizer, tmp_path):
    long_pair = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "word " * 60}], "rejected": REJECTED}
    rows = write_jsonl(tmp_path / "rows.jsonl", [PAIR, long_pair])
    for too_long, kept, truncated in (("reject", 1, 0), ("truncate", 2, 1)):
        config = TokenizeConfig(max_length=64, too_long=too_long)
        rejected: dict[str, int] = {}
        samples = list(encode_preference_rows(ChatEncoder(tokenizer, config), read_jsonl(rows), rejected, kto=False,
                                              held_out=False))
        assert len(samples) == kept and sum(cut for _, cut in samples) == truncated
        assert rejected == ({"too_long": 1} if too_long == "reject" else {})
        assert all(len(s["prompt_ids"]) + max(len(s["chosen_ids"]), len(s["rejected_ids"])) <= 64 for s, _ in samples)
        assert samples[-1][0]["prompt_ids"] == _rendered(tokenizer, PROMPT, add_generation_prompt=True)
    rejected = {}
    assert not list(encode_preference_rows(ChatEncoder(tokenizer, TokenizeConfig(max_length=16, too_long="truncate")),
                                           [PAIR], rejected, kto=False, held_out=False))
    assert rejected == {"prompt_too_long": 1}


def test_kto_trains_each_side_of_a_pair_with_its_label(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [PAIR, {"prompt": PROMPT, "completion": REJECTED, "label": False}])
    tokens = tokenize(CleanResult.of_files(path, path, task="unpaired_preference"), model_dir, TokenizeConfig(),
                      RunContext(tmp_path, cache_dir=tmp_path / "cache"))
    from datasets import load_from_disk

    train = list(load_from_disk(str(tokens.train_dir)))
    assert [sample["label"] for sample in train] == [True, False, False]
    assert train[1]["completion_ids"] == train[2]["completion_ids"] != train[0]["completion_ids"]
    held_out = list(load_from_disk(str(tokens.eval_dir)))
    assert held_out[1]["chosen_ids"] == [] and held_out[1]["rejected_ids"] == train[2]["completion_ids"]
    assert json.loads((tokens.train_dir.parent / "summary.json").read_text())["train_samples"] == 3


def test_a_pair_with_its_prompt_under_another_name_is_read_once_the_name_is_mapped(tmp_path):
    """Intel's orca_dpo_pairs layout: system, question, chosen, rejected."""
    row = {"system": "Be brief.", "question": "Who are you?", "chosen": "I am Ember.", "rejected": "I am an AI."}
    source = write_jsonl(tmp_path / "orca.jsonl", [row])
    unmapped = clean(data([source]), RunContext(tmp_path / "a"), task="preference")
    assert [r["reason"] for r in read_jsonl(unmapped.rejects_path)] == ["no_prompt"]
    assert "data.columns" in assert_accounted(unmapped)["hints"]["no_prompt"]
    mapped = clean(data([source], columns={"instruction": "question"}), RunContext(tmp_path / "b"), task="preference")
    assert read_jsonl(mapped.train_path) == [{"prompt": [{"role": "system", "content": "Be brief."}, *PROMPT],
                                              "chosen": CHOSEN, "rejected": REJECTED}]


def test_loraflow_data_reads_preference_rows_for_a_preference_objective(tmp_path, capsys):
    from flows.cli import main

    source = write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS["alpaca"], LAYOUTS["sharegpt"] | {"rejected": "Same."},
                                                     {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}])
    assert main(["data", str(source), "--objective", "dpo"]) == 0
    assert "read 3, kept 2, rejected: identical_pair 1" in capsys.readouterr().out
    assert main(["data", str(source)]) == 0
    assert "rejected: preference_pair 3" in capsys.readouterr().out
