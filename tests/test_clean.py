import json

import pytest

from conf.schema import RunConfig
from tasks.builtin_data import HELDOUT_QUESTIONS, TRAIN_QUESTIONS
from tasks.clean import DataError, clean


def config_with(train, evaluation=("builtin:identity_heldout",)):
    return RunConfig.model_validate({"data": {"train": list(train), "eval": list(evaluation)}})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_identity_data_fills_placeholders_and_keeps_heldout_phrasings_apart(tmp_path):
    result = clean(config_with(["builtin:identity", "builtin:everyday_chat"]), tmp_path)
    train, evaluation = read_jsonl(result.train_path), read_jsonl(result.eval_path)
    text = json.dumps(train + evaluation)
    assert "{{" not in text and "Ember" in text and "the loraflow team" in text
    train_prompts = {row["messages"][0]["content"] for row in train}
    eval_prompts = {row["messages"][0]["content"] for row in evaluation}
    assert eval_prompts == set(HELDOUT_QUESTIONS)
    assert not train_prompts & eval_prompts
    assert set(TRAIN_QUESTIONS) <= train_prompts


def test_every_row_is_kept_or_rejected_with_a_reason(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi\u0007 there"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        {"something": "else"},
        [1, 2],
    ]
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    result = clean(config_with([str(source)]), tmp_path / "out")
    report = json.loads(result.report_path.read_text())
    counts = report["sources"][str(source)]
    assert counts["read"] == len(rows) + 1
    assert counts["kept"] == 3
    assert counts["kept"] + sum(v for k, v in counts.items() if k.startswith("rejected:")) == counts["read"]
    reasons = [r["reason"] for r in read_jsonl(result.rejects_path)]
    assert reasons == [
        "duplicate", "no_assistant_turn", "ends_on_user_turn", "unknown_role", "empty_turn", "wrong_type",
        "unknown_format", "not_an_object", "invalid_json",
    ]
    origins = [r["origin"] for r in read_jsonl(result.rejects_path)]
    assert origins[0] == f"{source}:2" and origins[-1] == f"{source}:12"
    kept = read_jsonl(result.train_path)
    assert kept[0]["messages"][0]["content"] == "Hi there"
    assert kept[1]["messages"][1] == {"role": "assistant", "content": "4"}
    assert kept[2]["messages"][0]["content"] == "Add\n\n1 and 2"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("rows.json", '{"not": "an array"}', "expected a JSON array of rows, got dict"),
        ("rows.json", "[1, 2", "not valid JSON"),
        ("rows.jsonl", "", "empty file"),
        ("rows.jsonl", b"\xff\xfe\x00bad", "not UTF-8 text"),
    ],
)
def test_unreadable_file_stops_with_one_line_naming_it(tmp_path, name, content, expected):
    source = tmp_path / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as error:
        clean(config_with([str(source)]), tmp_path / "out")
    assert str(error.value).startswith(f"{source}: ")
    assert expected in str(error.value)
    assert not (tmp_path / "out" / "train.jsonl").exists()
