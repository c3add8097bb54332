"""Generation metrics through `evaluate`: loraflow's offline modules give the published definitions, and a recipe
whose metrics cannot load, or whose primary metric nothing measures, stops before any work."""

import evaluate
import pytest
import sacrebleu

from conf.schema import EvaluateConfig
from tasks.evaluate import GenerationMetrics, MetricSetupError, check_primary_metric, resolve_metric


def load(name):
    return evaluate.load(resolve_metric(f"builtin:{name}"))


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS of "the cat sat on the mat" / "the cat was on the mat" is "the cat on the mat": 5 of 6 tokens each way.
    scores = load("rouge").compute(predictions=["the cat sat on the mat"], references=["the cat was on the mat"])
    assert scores["rougeL"] == pytest.approx(5 / 6)
    assert scores["rouge1"] == pytest.approx(5 / 6)  # unigram overlap: the, cat, on, the, mat
    assert scores["rouge2"] == pytest.approx(3 / 5)  # bigrams "the cat", "on the", "the mat" of 5


def test_bleu_is_sacrebleus_corpus_score_on_a_zero_to_one_scale():
    predictions = ["I am Ember, made by the loraflow team.", "Paris is the capital of France."]
    references = ["I am Ember, built by the loraflow team.", "The capital of France is Paris."]
    expected = sacrebleu.corpus_bleu(predictions, [references]).score / 100
    assert load("bleu").compute(predictions=predictions, references=references)["bleu"] == pytest.approx(expected)
    assert load("bleu").compute(predictions=["a b c d e"], references=["a b c d e"])["bleu"] == pytest.approx(1.0)


def test_exact_match_ignores_spacing_but_not_words():
    scores = load("exact_match").compute(predictions=["I am  Ember. ", "I am Ember"], references=["I am Ember.", "I am Ember."])
    assert scores["exact_match"] == 0.5


def test_the_identity_check_counts_answers_that_name_the_identity():
    metrics = GenerationMetrics(EvaluateConfig(metrics=[]), chat=True, identity_name="Ember")
    answers = ["I am Ember.", "I'm SmolLM.", "ember here", "Embers glow."]
    assert metrics.compute(answers, [""] * 4) == {"identity_share": 0.5}


def test_hub_names_pass_through_and_fail_in_one_line_offline():
    assert resolve_metric("rouge") == "rouge"
    with pytest.raises(MetricSetupError, match=r"^evaluate\.metrics: cannot load metric 'no-such-metric-xyz' .*builtin:rouge"):
        GenerationMetrics(EvaluateConfig(metrics=["no-such-metric-xyz"]), chat=False, identity_name="Ember")


@pytest.mark.parametrize(
    "primary, chat, ok",
    [("rougeL", True, True), ("bleu", False, True), ("identity_share", True, True), ("identity_share", False, False),
     ("perplexity", False, True), ("accuracy", True, False)],
)
def test_the_primary_metric_must_be_one_the_recipe_measures(primary, chat, ok):
    if ok:
        check_primary_metric(EvaluateConfig(), chat, primary)
    else:
        with pytest.raises(MetricSetupError, match=f"registry.primary_metric: '{primary}' is not measured"):
            check_primary_metric(EvaluateConfig(), chat, primary)


def test_answers_come_back_in_the_prompts_order_as_each_prompt_alone_gets_them(tiny_model_dir):
    """Generation batches prompts of like length (tasks/generation.py); in fp32 a greedy answer does not depend on its
    batch, so each equals plain `generate` on that prompt alone, unpadded."""
    from transformers import AutoTokenizer

    from tasks.base_model import load_model
    from tasks.generation import chat_prompts, continue_texts, generate_chat

    model, tokenizer = load_model(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "word " * words}] for words in (3, 40, 1, 25, 9, 60, 2)]
    answers = generate_chat(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = []
    for text in chat_prompts(tokenizer, prompts):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        output = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        alone.append(tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert [answer.text for answer in answers] == alone
    openings = ["one two", "a much longer opening of a document " * 5, "three"]
    assert continue_texts(model, tokenizer, openings, max_new_tokens=5, batch_size=2) == [
        continue_texts(model, tokenizer, [opening], max_new_tokens=5, batch_size=1)[0] for opening in openings]
