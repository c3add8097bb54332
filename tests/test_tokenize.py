import pytest

from tasks.tokenize import IGNORE_INDEX, SampleRejected, encode_conversation

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Ember."},
    {"role": "user", "content": "And who made you?"},
    {"role": "assistant", "content": "The loraflow team."},
]


def test_ids_are_exactly_the_chat_templates_ids(tokenizer):
    encoded = encode_conversation(tokenizer, CONVERSATION, max_length=512)
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert encoded["input_ids"] == expected


def test_labels_cover_exactly_each_assistant_turn_and_its_end_token(tokenizer):
    encoded = encode_conversation(tokenizer, CONVERSATION, max_length=512)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = [IGNORE_INDEX] * len(encoded["input_ids"])
    for index, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        # Token-level truth from the template itself: where the generation prompt ends, and the turn's own ids.
        start = len(tokenizer.apply_chat_template(CONVERSATION[:index], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
        answer = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [end_of_turn]
        assert encoded["input_ids"][start : start + len(answer)] == answer
        expected[start : start + len(answer)] = answer
    assert encoded["labels"] == expected


def test_a_sample_past_max_length_is_rejected(tokenizer):
    with pytest.raises(SampleRejected, match="too_long"):
        encode_conversation(tokenizer, CONVERSATION, max_length=10)
