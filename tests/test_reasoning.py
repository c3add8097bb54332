"""Reasoning traces, per-turn weights, content parts and undesirable answers: what a row says is neither dropped nor
trained the wrong way, from the clean stage to the served answer."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import pack_dataset

from conf.schema import ConfigError, DataConfig, EvaluateConfig, TokenizeConfig, load_config
from flows.cli import main
from tasks import evaluate as evaluate_stage
from tasks.builtin_data import arithmetic_reasoning_heldout_rows, arithmetic_reasoning_rows
from tasks.chat_model import ChatRequest, TunedChatModel
from tasks.clean import clean
from tasks.context import RunContext
from tasks.results import CleanResult
from tasks.generation import Answer, HeldOut, chat_prompts
from tasks.reasoning import DEFAULT_FORMAT, Reasoning, template_field
from tasks.tokenize import IGNORE_INDEX, ChatEncoder, tokenize
from tasks.train.collators import training_collator
from tests.conftest import REPO

# A Qwen3-style template, written for these tests after Qwen3's published one: it renders `reasoning_content` in
# <think> tags on the assistant turns after the last user message, and leaves it out of earlier turns (as Qwen3 does
# at inference, where earlier turns come back without their reasoning); the last turn always gets a think block.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + message.content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + message.content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5", "reasoning_content": "Two and three make five."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8", "reasoning_content": "Four and four make eight."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def qa(answer: dict, question: str = "Q?") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant"} | answer]}


@pytest.fixture(scope="module")
def qwen3_tokenizer(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # SmolLM2's ChatML tokens, with the Qwen3-style template
    tokenizer.chat_template = QWEN3_STYLE
    return tokenizer


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX])


# The clean stage: every shape to one reasoning field and a weight of 0 where a turn must not be trained.

def test_every_reasoning_shape_becomes_one_field_and_the_report_counts_them(tmp_path):
    rows = [
        qa({"content": "A1", "reasoning_content": "R1"}),  # DeepSeek / OpenAI-compatible reasoning APIs
        qa({"content": "A2", "thinking": "R2"}, "Q2?"),  # GPT-OSS (Harmony)
        qa({"content": "A3", "reasoning": "R3"}, "Q3?"),
        qa({"content": [{"type": "reasoning", "value": "R4"}, {"type": "text", "value": "A4"}]}, "Q4?"),
        qa({"content": [{"type": "thinking", "thinking": "R5"}, {"type": "text", "text": "A5"}]}, "Q5?"),  # Anthropic
        qa({"content": "<think>\nR6\n</think>\n\nA6"}, "Q6?"),  # R1-style models' own output
        {"instruction": "Q7?", "output": "A7", "reasoning_content": "R7"},  # alpaca with a reasoning column
        {"conversations": [{"from": "human", "value": "Q8?"}, {"from": "gpt", "value": "A8", "reasoning": "R8"}]},
        {"conversations": [{"from": "user", "value": "Q9?"}, {"from": "assistant", "value":  # Bespoke-Stratos
            "<|begin_of_thought|>\n\nR9\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\nA9\n\n<|end_of_solution|>"}]},
        qa({"content": "A10"}, "Q10?"),
    ]
    result = clean(DataConfig(train=[str(write_jsonl(tmp_path / "rows.jsonl", rows))], eval=[]), RunContext(tmp_path / "out"))
    kept = read_jsonl(result.train_path)
    assert [row["messages"][-1] for row in kept[:9]] == [
        {"role": "assistant", "content": f"A{n}", "reasoning_content": f"R{n}"} for n in range(1, 10)]
    assert kept[9]["messages"][-1] == {"role": "assistant", "content": "A10"}
    report = json.loads(result.report_path.read_text())
    source = report["sources"][str(tmp_path / "rows.jsonl")]
    assert source["reasoning_rows"] == report["reasoning_rows"] == 9
    assert source["layouts"] == {
        "alpaca with reasoning_content": 1, "openai messages with <think> block": 1,
        "sharegpt conversations with begin_of_thought block": 1,
        "openai messages with content parts, thinking parts": 1, "openai messages with reasoning": 1,
        "openai messages with reasoning parts, text parts keyed value": 1,
        "openai messages with reasoning_content": 1, "openai messages with thinking": 1,
        "sharegpt conversations with reasoning": 1}


def test_weights_decide_the_trained_turns_and_a_fractional_weight_is_refused_naming_the_row(tmp_path):
    def two_turns(first: dict, second: dict | None = None) -> dict:
        return {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad."} | first,
                             {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good."}
                             | (second or {})]}
    rows = [two_turns({"weight": 0}), two_turns({"loss_weight": 0.0}, {"loss_weight": 1.0}),
            two_turns({"training": False}), two_turns({"content": [{"type": "text", "text": "Bad.", "train": False}]}),
            two_turns({"weight": 0.5}), two_turns({"weight": 0}, {"weight": 0}), two_turns({"weight": -1}),
            two_turns({"content": [{"type": "text", "text": "a", "train": False}, {"type": "text", "text": "b"}]})]
    source = write_jsonl(tmp_path / "weights.jsonl", rows)
    result = clean(DataConfig(train=[str(source)], eval=[], near_duplicate_threshold=1, dedup=False), RunContext(tmp_path / "o"))
    kept = read_jsonl(result.train_path)
    assert len(kept) == 4 and all(row["messages"][1] == {"role": "assistant", "content": "Bad.", "weight": 0}
                                  and row["messages"][3] == {"role": "assistant", "content": "Good."} for row in kept)
    rejects = read_jsonl(result.rejects_path)
    assert [(r["reason"], r["origin"]) for r in rejects] == [
        ("fractional_weight", f"{source}:5"), ("no_trained_turn", f"{source}:6"), ("invalid_weight", f"{source}:7"),
        ("partial_turn_weight", f"{source}:8")]
    report = json.loads(result.report_path.read_text())
    assert report["sources"][str(source)]["untrained_turns"] == 4
    assert "fractional_weight" in report["hints"]


def test_an_undesirable_answer_is_rejected_with_a_hint_and_a_desirable_one_is_an_ordinary_row(tmp_path):
    rows = [qa({"content": "Rude."}) | {"label": False}, {"prompt": "Q2?", "completion": "Kind.", "label": True},
            {"prompt": [{"role": "user", "content": "Q3?"}], "completion": [{"role": "assistant", "content": "Fine."}],
             "label": "false"},
            {"prompt": [{"role": "user", "content": "Q4?"}], "completion": [{"role": "assistant", "content": "Yes."}]}]
    source = write_jsonl(tmp_path / "kto.jsonl", rows)
    result = clean(DataConfig(train=[str(source)], eval=[]), RunContext(tmp_path / "out"))
    assert read_jsonl(result.train_path) == [
        {"messages": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "Kind."}]},
        {"messages": [{"role": "user", "content": "Q4?"}, {"role": "assistant", "content": "Yes."}]}]
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["undesirable_answer"] * 2
    assert "KTO" in json.loads(result.report_path.read_text())["hints"]["undesirable_answer"]


def test_a_system_column_beside_the_conversation_becomes_its_system_turn(tmp_path):
    row = {"system": "Think step by step.", "conversations": [{"from": "user", "value": "Q?"},  # OpenThoughts' layout
                                                             {"from": "assistant", "value": "A."}]}
    result = clean(DataConfig(train=[str(write_jsonl(tmp_path / "rows.jsonl", [row]))], eval=[]), RunContext(tmp_path / "out"))
    assert read_jsonl(result.train_path)[0]["messages"] == [
        {"role": "system", "content": "Think step by step."}, {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."}]


def test_content_parts_keyed_value_are_read_and_media_parts_still_rejected(tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "value": "Look"}, {"type": "text", "value": "here"}]},
                          {"role": "assistant", "content": [{"type": "text", "value": "Seen."}], "loss_weight": 1}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "value": "x.png"}]},
                          {"role": "assistant", "content": "A cat."}]},
            {"messages": [{"role": "user", "content": [{"type": "audio", "value": "x.wav"}]},
                          {"role": "assistant", "content": "A dog."}]}]
    result = clean(DataConfig(train=[str(write_jsonl(tmp_path / "parts.jsonl", rows))], eval=[]), RunContext(tmp_path / "out"))
    assert read_jsonl(result.train_path) == [{"messages": [{"role": "user", "content": "Look\nhere"},
                                                           {"role": "assistant", "content": "Seen."}]}]
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["has_images", "has_audio"]


def test_the_data_command_names_each_new_layout(tmp_path, capsys):
    rows = [qa({"content": "A", "reasoning_content": "R"}), {"prompt": "P?", "completion": "C."},
            qa({"content": [{"type": "text", "value": "V."}], "weight": 1}, "Q2?")]
    path = write_jsonl(tmp_path / "new.jsonl", rows)
    assert main(["data", str(path), "--json", "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)[str(path)]
    assert report["format"] == "openai+prompt_completion"
    assert report["layouts"] == {"openai messages with reasoning_content": 1,
                                 "openai messages with text parts keyed value, weight": 1}


# The tokenize stage: reasoning rendered as the template renders it, trained, masked or dropped; weights honoured.

def test_a_qwen3_style_template_renders_the_reasoning_itself_and_the_ids_equal_apply_chat_template(qwen3_tokenizer):
    assert template_field(QWEN3_STYLE) == "reasoning_content"
    expected = qwen3_tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]
    encoder = ChatEncoder(qwen3_tokenizer, TokenizeConfig(max_length=512))
    sample, _ = encoder.encode(TWO_TURNS)
    assert sample["input_ids"] == expected
    # The earlier turn is trained as the template shows it later: without its reasoning (as inference will see it).
    assert trained_text(qwen3_tokenizer, sample) == (
        "5<|im_end|><think>\nFour and four make eight.\n</think>\n\n8<|im_end|>")
    assert dict(encoder.reasoning_counts) == {"turns": 2, "rendered": 1, "not_rendered": 1}


def test_mask_keeps_the_reasoning_in_the_context_without_loss_and_drop_removes_it(qwen3_tokenizer):
    masked, _ = ChatEncoder(qwen3_tokenizer, TokenizeConfig(max_length=512, reasoning="mask")).encode(TWO_TURNS)
    trained, _ = ChatEncoder(qwen3_tokenizer, TokenizeConfig(max_length=512)).encode(TWO_TURNS)
    assert masked["input_ids"] == trained["input_ids"]
    assert trained_text(qwen3_tokenizer, masked) == "5<|im_end|>8<|im_end|>"
    dropper = ChatEncoder(qwen3_tokenizer, TokenizeConfig(max_length=512, reasoning="drop"))
    dropped, _ = dropper.encode(TWO_TURNS)
    plain = [{key: value for key, value in m.items() if key != "reasoning_content"} for m in TWO_TURNS]
    assert dropped["input_ids"] == qwen3_tokenizer.apply_chat_template(plain, tokenize=True, return_dict=True)["input_ids"]
    assert "Four and four" not in qwen3_tokenizer.decode(dropped["input_ids"])
    assert dropper.reasoning_counts["dropped"] == 2


def test_a_template_without_reasoning_gets_the_documented_format_before_the_answer(tokenizer):
    assert template_field(tokenizer.chat_template) is None
    conversation = TWO_TURNS[:2]
    sample, _ = ChatEncoder(tokenizer, TokenizeConfig(max_length=512)).encode(conversation)
    answer = DEFAULT_FORMAT.format(reasoning="Two and three make five.") + "5"
    plain = [conversation[0], {"role": "assistant", "content": answer}]
    assert sample["input_ids"] == tokenizer.apply_chat_template(plain, tokenize=True, return_dict=True)["input_ids"]
    assert trained_text(tokenizer, sample) == answer + "<|im_end|>"
    custom = TokenizeConfig(max_length=512, reasoning_format="Steps: {reasoning}\nSo: ")
    sample, _ = ChatEncoder(tokenizer, custom).encode(conversation)
    assert trained_text(tokenizer, sample) == "Steps: Two and three make five.\nSo: 5<|im_end|>"


def test_reasoning_spelling_a_control_token_is_data_not_a_turn(tokenizer):
    forged = [TWO_TURNS[0], {"role": "assistant", "content": "5", "reasoning_content": "x<|im_end|>y"}]
    sample, _ = ChatEncoder(tokenizer, TokenizeConfig(max_length=512)).encode(forged)
    assert sample["input_ids"].count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3  # system, user, assistant


def test_a_turn_weighted_zero_is_in_the_context_but_not_trained(tokenizer):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad answer.", "weight": 0},
                    {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good answer."}]
    sample, _ = ChatEncoder(tokenizer, TokenizeConfig(max_length=512)).encode(conversation)
    unweighted = [{key: value for key, value in m.items() if key != "weight"} for m in conversation]
    assert sample["input_ids"] == tokenizer.apply_chat_template(unweighted, tokenize=True, return_dict=True)["input_ids"]
    assert trained_text(tokenizer, sample) == "Good answer.<|im_end|>"


def test_packed_loss_equals_unpacked_with_weighted_turns_and_reasoning(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    encoder = ChatEncoder(tokenizer, TokenizeConfig(max_length=256, reasoning="mask"))
    samples = [encoder.encode([{"role": "user", "content": f"Question {n}?"},
                               {"role": "assistant", "content": f"Skip {n}.", "weight": 0},
                               {"role": "user", "content": "Once more?"},
                               {"role": "assistant", "content": f"Answer {n}.", "reasoning_content": f"Step {n}."}])[0]
               for n in range(5)]
    total, count = 0.0, 0
    for sample in samples:
        labels = torch.tensor([sample["labels"]])
        n = int((labels[0, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            total += model(input_ids=torch.tensor([sample["input_ids"]]), labels=labels).loss.item() * n
        count += n
    rows = pack_dataset(Dataset.from_list(samples), 160, strategy="bfd")
    assert 1 < len(rows) < len(samples)
    batch = training_collator(tokenizer, packed=True, attn="sdpa")(list(rows))
    with torch.no_grad():
        assert model(**batch, use_cache=False).loss.item() == pytest.approx(total / count, abs=1e-4)


def test_the_reasoning_settings_travel_with_the_saved_tokenizer(model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [qa({"content": "5", "reasoning_content": "Two and three."})])
    tokens = tokenize(CleanResult.of_files(rows, rows), model_dir,
                      TokenizeConfig(reasoning="mask", reasoning_format="<r>{reasoning}</r>"), RunContext(tmp_path))
    assert tokens.reasoning == {"turns": 2, "rendered": 2}  # the train and the eval row
    saved = Reasoning.of(AutoTokenizer.from_pretrained(tokens.tokenizer_dir))
    assert saved == Reasoning("mask", "<r>{reasoning}</r>", None)
    reloaded = AutoTokenizer.from_pretrained(tokens.tokenizer_dir)
    reloaded.save_pretrained(tmp_path / "again")  # as the Trainer saves it beside the adapter
    assert Reasoning.of(AutoTokenizer.from_pretrained(tmp_path / "again")) == saved
    # Earlier turns of a prompt are rendered as training rendered them.
    history = [TWO_TURNS[0], TWO_TURNS[1], TWO_TURNS[2]]
    assert "<r>Two and three make five.</r>5" in chat_prompts(reloaded, [history])[0]


def test_a_reasoning_format_without_its_slot_or_a_closing_marker_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    for bad in ("'no slot'", "'<think>{reasoning}'"):
        recipe.write_text(f"tokenize: {{reasoning_format: {bad}}}\n")
        with pytest.raises(ConfigError, match="tokenize.reasoning_format"):
            load_config(recipe)


# Generation: answers are split into reasoning and answer; metrics score the answer alone.

@pytest.mark.parametrize("text, parts", [
    ("<think>\nadd them\n</think>\n\n5", ("add them", "5")),
    ("add them\n</think>\n\n5", ("add them", "5")),  # the prompt opened the block
    ("<think>\nstill thinking", ("still thinking", "")),  # cut off while reasoning
    ("5", ("", "5")),
])
def test_a_generated_text_splits_into_reasoning_and_answer(text, parts):
    assert Reasoning().split(text) == parts


def test_evaluation_scores_the_answer_alone_and_counts_the_answers_that_reasoned(tokenizer, monkeypatch):
    questions = HeldOut([[{"role": "user", "content": "2+3?"}]] * 2, ["2+3?"] * 2, ["5", "5"], True)
    monkeypatch.setattr(HeldOut, "outputs", lambda *args: ["<think>\n2 + 3 = 5\n</think>\n\n5", "6"])
    monkeypatch.setattr(evaluate_stage, "heldout_loss", lambda model, samples: 1.0)
    config = EvaluateConfig(metrics=["builtin:exact_match"])
    metrics = evaluate_stage.GenerationMetrics(config, chat=True, identity_name="Ember")
    scored = evaluate_stage._score(None, tokenizer, [], questions, metrics, config, "fp32")
    assert scored.outputs == ["5", "6"] and scored.reasoning == ["2 + 3 = 5", ""] and scored.pairs == []
    assert scored.generated == ["<think>\n2 + 3 = 5\n</think>\n\n5", "6"]  # what train/serve parity compares
    assert scored.scores["exact_match"] == 0.5 and scored.scores["reasoning_share"] == 0.5
    # The samples table: a reasoning column for each model that reasoned, in every row (MLflow's table needs them).
    rows = evaluate_stage._with_reasoning([{"prompt": "a"}, {"prompt": "b"}], {"base": ["", ""], "tuned": scored.reasoning})
    assert rows == [{"prompt": "a", "tuned_reasoning": "2 + 3 = 5"}, {"prompt": "b", "tuned_reasoning": ""}]


def test_the_openai_answer_carries_reasoning_content_beside_the_content(tokenizer):
    model = TunedChatModel()
    model.tokenizer = tokenizer
    request = ChatRequest([{"role": "user", "content": "2+3?"}], max_tokens=64, temperature=0.0, prompt_tokens=9)
    message = model.completion(request, Answer("<think>\n2 + 3 = 5\n</think>\n\n5", 14, True), "m")["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"}
    assert model.completion(request, Answer("5", 2, True), "m")["choices"][0]["message"] == {"role": "assistant",
                                                                                               "content": "5"}


# The shipped recipe's data: worked steps whose result is the answer.

def test_the_arithmetic_problems_answer_what_their_steps_compute_and_held_out_people_are_never_trained():
    train, heldout = arithmetic_reasoning_rows(), arithmetic_reasoning_heldout_rows()
    for row in train + heldout:
        answer = row["messages"][-1]
        assert answer["reasoning_content"].rstrip(".").endswith(f"= {answer['content']}")
    first_words = lambda rows: {row["messages"][0]["content"].split()[0] for row in rows}  # noqa: E731
    assert not (first_words(heldout) - {"There"}) & first_words(train)
    config = load_config(REPO / "conf" / "reasoning_sft.yaml")
    assert config.data.train == ["builtin:arithmetic_reasoning"] and config.registry.primary_metric == "exact_match"
