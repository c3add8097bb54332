"""Task heads without training: labelled rows cleaned and rejected with their reasons, word tags aligned to sub-tokens
the standard way, the head metrics against hand-computed values, and entity spans with character offsets."""

import json

import evaluate
import pytest

from conf.schema import DataConfig, TokenizeConfig
from tasks.clean import clean
from tasks.context import RunContext
from tasks.labels import entity_spans, label_order, words_of
from tasks.metrics import resolve_metric
from tasks.tokenize import IGNORE_INDEX, encode_labelled_rows, load_head_tokenizer


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def rejects_by_reason(result) -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = {}
    for line in result.rejects_path.read_text(encoding="utf-8").splitlines():
        reject = json.loads(line)
        reasons.setdefault(reject["reason"], []).append(reject["origin"])
    return reasons


def test_classification_rows_from_csv_and_jsonl_keep_their_labels_and_reject_what_is_broken(tmp_path):
    train = write(tmp_path / "train.csv", 'review,stars\nGreat food,good\n"Slow, cold service",bad\nFine,good\n'
                                          "Loved it,good\nno label here,\ntoo,many,fields\n")
    more = write(tmp_path / "more.jsonl", '{"review": "Awful", "stars": "bad"}\n{"review": "Yes", "stars": true}\n'
                                          '{"stars": "good"}\n{"review": "Meh", "stars": 7}\n')
    held_out = write(tmp_path / "eval.jsonl", '{"review": "Tasty", "stars": "good"}\n'
                                              '{"review": "So-so", "stars": "neutral"}\n')
    data = DataConfig(train=[train, more], eval=[held_out], columns={"text": "review", "label": "stars"},
                      near_duplicate_threshold=1.0, min_class_rows=3)
    result = clean(data, RunContext(tmp_path / "out"), task="sequence_classification")

    rows = [json.loads(line) for line in result.train_path.read_text().splitlines()]
    assert rows[:2] == [{"text": "Great food", "label": "good"}, {"text": "Slow, cold service", "label": "bad"}]
    assert [r["label"] for r in rows] == ["good", "bad", "good", "good", "bad", "7"]  # an integer, without names
    assert result.labels == ("7", "bad", "good")
    assert rejects_by_reason(result) == {
        "no_label": [f"{train}:6"], "wrong_field_count": [f"{train}:7"], "invalid_label": [f"{more}:2"],
        "no_text": [f"{more}:3"], "unseen_label": [f"{held_out}:2"]}
    report = json.loads(result.report_path.read_text())
    assert report["labels"] == {"7": {"train": 1, "eval": 0}, "bad": {"train": 2, "eval": 0},
                                "good": {"train": 3, "eval": 1}}
    assert report["warnings"] == ["class 7: 1 train examples, fewer than data.min_class_rows (3)",
                                  "class bad: 2 train examples, fewer than data.min_class_rows (3)"]
    assert report["sources"][held_out] == {"format": "classification", "read": 2, "kept": 1,
                                           "rejected": {"unseen_label": 1}}
    assert result.train_rows + result.eval_rows + result.rejected_rows == 6 + 4 + 2  # every row accounted for


def test_token_rows_from_conll_and_hf_shape_with_label_names(tmp_path):
    conll = write(tmp_path / "train.conll", "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                                            "German JJ B-NP B-MISC\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n"
                                            "lonely\n\nBad X PERSON\nTagging X I-LOC\n")
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    hf = write(tmp_path / "hf.jsonl", '{"tokens": ["John", "Smith", "left"], "ner_tags": [1, 2, 0]}\n'
                                      '{"tokens": ["one", "two"], "ner_tags": [0]}\n'
                                      '{"tokens": ["x"], "ner_tags": [9]}\n'
                                      '{"tokens": ["a b"], "ner_tags": [0]}\n'
                                      '{"tokens": [], "ner_tags": []}\n')
    held_out = write(tmp_path / "eval.jsonl", '{"tokens": ["Paris"], "ner_tags": ["B-LOC"]}\n'
                                              '{"tokens": ["Anna"], "ner_tags": ["B-PER"]}\n')
    data = DataConfig(train=[conll, hf], eval=[held_out], label_names=names, near_duplicate_threshold=1.0)
    result = clean(data, RunContext(tmp_path / "out"), task="token_classification")

    rows = [json.loads(line) for line in result.train_path.read_text().splitlines()]
    assert rows == [{"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
                    {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
                    {"tokens": ["John", "Smith", "left"], "tags": ["B-PER", "I-PER", "O"]}]
    assert result.labels == ("O", "B-MISC", "B-ORG", "B-PER", "I-PER")
    assert rejects_by_reason(result) == {
        "no_label": [f"{conll}:10"], "invalid_tag": [f"{conll}:12"], "tags_mismatch": [f"{hf}:2"],
        "invalid_label": [f"{hf}:3"], "invalid_token": [f"{hf}:4"], "no_tokens": [f"{hf}:5"],
        "unseen_label": [f"{held_out}:1"]}


def test_word_tags_go_on_each_words_first_subtoken_as_an_independent_word_by_word_reading_says(model_dir):
    tokenizer = load_head_tokenizer(model_dir)
    words = ["Schwarzenegger", "visited", "Reykjavik", "'s", "harbour", "with", "UNICEF", "."]
    tags = ["B-PER", "O", "B-LOC", "O", "O", "O", "B-ORG", "O"]
    label_ids = {tag: number for number, tag in enumerate(label_order(set(tags)))}
    [(sample, truncated)] = encode_labelled_rows(tokenizer, [{"tokens": words, "tags": tags}], label_ids,
                                                 TokenizeConfig(max_length=64), {})

    # Independently of offsets: decode the tokens one by one and walk the sentence; a token that starts a word
    # carries that word's tag, every other token -100.
    text, position, word, expected = " ".join(words), 0, -1, []
    for token in sample["input_ids"]:
        piece = tokenizer.decode([token])
        if piece.startswith(" "):
            position, piece = position + 1, piece[1:]
        assert text[position : position + len(piece)] == piece
        starts_word = position == 0 or text[position - 1] == " "
        word += starts_word
        expected.append(label_ids[tags[word]] if starts_word else IGNORE_INDEX)
        position += len(piece)
    assert position == len(text) and word == len(words) - 1
    assert len(sample["input_ids"]) > len(words)  # some words are several tokens: the test has teeth
    assert sample["labels"] == expected and not truncated
    assert tokenizer.decode(sample["input_ids"]) == text  # the model reads the sentence, spaces and all
    assert sample["tokens"] == words

    [(cut, was_cut)] = encode_labelled_rows(tokenizer, [{"tokens": words, "tags": tags}], label_ids,
                                            TokenizeConfig.model_construct(max_length=5, too_long="truncate"), {})
    assert was_cut and cut["labels"] == expected[:5] and len(cut["input_ids"]) == 5
    assert cut["tokens"] == words[: sum(label != IGNORE_INDEX for label in expected[:5])]
    rejected: dict[str, int] = {}
    assert not list(encode_labelled_rows(tokenizer, [{"tokens": words, "tags": tags}], label_ids,
                                         TokenizeConfig.model_construct(max_length=5, too_long="reject"), rejected))
    assert rejected == {"too_long": 1}


def test_classification_metric_against_hand_computed_values():
    metric = evaluate.load(resolve_metric("builtin:classification"))
    scores = metric.compute(predictions=["cat", "dog", "cat", "cat", "bird", "dog"],
                            references=["cat", "dog", "dog", "cat", "dog", "bird"])
    # cat: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 0.8; dog: tp 1, fp 1, fn 2 -> P 1/2, R 1/3, F1 0.4; bird: all wrong, 0.
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["f1_cat"] == pytest.approx(0.8) and scores["f1_dog"] == pytest.approx(0.4)
    assert scores["f1_bird"] == 0.0
    assert scores["f1"] == pytest.approx((0.8 + 0.4 + 0.0) / 3)
    assert scores["precision"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert scores["recall"] == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_seqeval_metric_is_entity_level_and_strict_iob2_against_hand_computed_values():
    metric = evaluate.load(resolve_metric("builtin:seqeval"))
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"], ["O", "B-LOC"]]
    predicted = [["B-PER", "I-PER", "O", "B-LOC"],  # both entities right
                 ["B-ORG", "O", "O"],  # ORG cut short: wrong extent, so a false positive and a miss
                 ["O", "I-LOC"]]  # I- without B-: no entity in strict IOB2 (lenient conlleval would count it)
    scores = metric.compute(predictions=predicted, references=gold)
    # gold entities 5 (PER, LOC, ORG, LOC); predicted entities 3 (PER, LOC, ORG-short); right 2.
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert scores["accuracy"] == pytest.approx(7 / 9)  # words with the right tag
    assert scores["f1_PER"] == 1.0 and scores["f1_ORG"] == 0.0
    assert scores["f1_LOC"] == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_entities_come_with_character_offsets_into_the_text():
    text = "Anna  Schmidt flew to New York, then Oslo."
    words = words_of(text)
    assert [word for word, _, _ in words] == ["Anna", "Schmidt", "flew", "to", "New", "York", ",", "then", "Oslo", "."]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O", "O", "I-LOC", "O"]
    spans = entity_spans(words, tags, [0.9, 0.7, 1, 1, 0.8, 0.6, 1, 1, 0.5, 1], text)
    assert [(s["entity"], s["text"], s["start"], s["end"]) for s in spans] == [
        ("PER", "Anna  Schmidt", 0, 13), ("LOC", "New York", 22, 30), ("LOC", "Oslo", 37, 41)]
    assert all(text[s["start"] : s["end"]] == s["text"] for s in spans)
    assert spans[0]["score"] == pytest.approx(0.8)
