"""Tests for gqa_t5x.metrics against hand-computed values and direct rouge-score/sacrebleu calls."""

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gqa_t5x.data import metrics

# ---------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_perfect_and_disjoint():
    texts = ["The cat sat on the mat. It was happy.", "Dogs bark loudly at night."]
    assert metrics.rouge(texts, texts) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeLsum": 100.0}
    )
    disjoint = metrics.rouge(["alpha beta gamma delta"], ["one two three four"])
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}


def test_rouge1_hand_computed():
    # Overlap {the, cat}: precision 2/3, recall 2/4, F = 2PR/(P+R) = 4/7.
    # Bigrams: {the cat} shared of 2 predicted and 3 reference bigrams: F = 2(1/2)(1/3)/(5/6).
    result = metrics.rouge(["the cat ran away"], ["the cat sat"])
    assert result["rouge1"] == pytest.approx(100 * 4 / 7)
    assert result["rouge2"] == pytest.approx(100 * 0.4)


def test_rouge_matches_rouge_score_on_one_example():
    target = "The storm hit the coast on Monday. Thousands lost power! Repairs will take weeks."
    prediction = "A storm hit the coast. Power was lost by thousands. Repairs take weeks."
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
    # One sentence per line, written out by hand.
    expected = scorer.score(
        target="The storm hit the coast on Monday.\nThousands lost power!\n"
        "Repairs will take weeks.",
        prediction="A storm hit the coast.\nPower was lost by thousands.\nRepairs take weeks.",
    )
    result = metrics.rouge([target], [prediction])
    for key in ("rouge1", "rouge2", "rougeLsum"):
        assert result[key] == pytest.approx(100 * expected[key].fmeasure)


def test_rouge_lsum_uses_sentence_splits():
    # Summary-level LCS on sentences differs from LCS on the whole text when sentence order moves.
    target = "b c d. a e f."
    prediction = "a e f. b c d."
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"])
    whole = scorer.score(target, prediction)["rougeL"].fmeasure
    split = scorer.score("b c d.\na e f.", "a e f.\nb c d.")["rougeLsum"].fmeasure
    assert split == pytest.approx(1.0) and whole < 0.6
    assert metrics.rouge([target], [prediction])["rougeLsum"] == pytest.approx(100 * split)


def test_rouge_bootstrap_mid_is_seeded_and_near_the_mean():
    targets = ["a b c d", "a b", "c d e f g", "x y z", "a a b b"]
    predictions = ["a b c", "b", "c d x", "x y z", "b b"]
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    per_example = [scorer.score(t, p)["rouge1"].fmeasure for t, p in zip(targets, predictions)]
    state = np.random.get_state()
    first = metrics.rouge(targets, predictions, score_keys=("rouge1",))
    second = metrics.rouge(targets, predictions, score_keys=("rouge1",))
    assert first == second
    # The global numpy generator is left as it was.
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])
    # The bootstrap median of 1000 resampled means sits close to the plain mean.
    assert first["rouge1"] == pytest.approx(100 * np.mean(per_example), abs=3.0)


def test_split_sentences():
    assert metrics.split_sentences("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    assert metrics.split_sentences('He said "stop." Then left.') == [
        'He said "stop."',
        "Then left.",
    ]
    assert metrics.split_sentences("Pi is 3.14 today.\nNext line") == [
        "Pi is 3.14 today.",
        "Next line",
    ]
    assert metrics.split_sentences("  \n ") == []


def test_rouge_length_mismatch():
    with pytest.raises(ValueError, match="1 targets but 2 predictions"):
        metrics.rouge(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------------
# BLEU


def test_bleu_perfect_and_disjoint():
    refs = ["the cat sat on the mat today", "a dog ran in the park at noon"]
    assert metrics.bleu(refs, refs) == {"bleu": pytest.approx(100.0)}
    assert metrics.bleu(["one two three four five"], ["six seven eight nine ten"])[
        "bleu"
    ] == pytest.approx(0.0)


def test_bleu_hand_computed():
    # Precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty.
    result = metrics.bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    expected = 100 * math.exp(np.mean(np.log([5 / 6, 3 / 5, 2 / 4, 1 / 3])))
    assert result["bleu"] == pytest.approx(expected, rel=1e-6)


def test_bleu_matches_sacrebleu():
    targets = ["Das Haus ist klein.", "Der Hund bellt laut, sehr laut.", "Wir gehen heute."]
    predictions = ["Das Haus ist gross.", "Der Hund bellt laut.", "Wir gehen morgen heute."]
    expected = sacrebleu.corpus_bleu(
        predictions, [targets], tokenize="intl", smooth_method="exp"
    ).score
    assert metrics.bleu(targets, predictions)["bleu"] == pytest.approx(expected)
    assert 0.0 < expected < 100.0


def test_bleu_multiple_references():
    targets = [["the cat is here", "a cat is here"], ["it rains now", "rain falls now"]]
    predictions = ["a cat is here", "it rains now"]
    expected = sacrebleu.corpus_bleu(
        predictions,
        [["the cat is here", "it rains now"], ["a cat is here", "rain falls now"]],
        tokenize="intl",
        smooth_method="exp",
    ).score
    assert metrics.bleu(targets, predictions)["bleu"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="same number of references"):
        metrics.bleu([["a"], ["b", "c"]], ["a", "b"])


# ---------------------------------------------------------------------------------------------
# TriviaQA


def test_normalize_answer():
    assert metrics.normalize_answer("The  U.S.A.!") == "u s"
    assert metrics.normalize_answer("An apple_pie") == "apple pie"
    assert metrics.normalize_answer("\u2018Theatre\u2019") == "theatre"


def test_trivia_qa_hand_computed():
    targets = [["Obama", "President Obama"], ["The Beatles", "Beatles (band)"]]
    predictions = ["Barack Obama Jr", "beatles"]
    # Example 1: vs "obama" P=1/3, R=1 -> F1 1/2; vs "president obama" P=1/3, R=1/2 -> 2/5.
    # Example 2: "beatles" == normalized "The Beatles" -> EM 1, F1 1.
    result = metrics.trivia_qa(targets, predictions)
    assert result["f1"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert result["em"] == pytest.approx(50.0)


def test_trivia_qa_perfect_disjoint_and_bare_string():
    assert metrics.trivia_qa([["Paris"]], ["paris."]) == {"f1": 100.0, "em": 100.0}
    assert metrics.trivia_qa([["Paris"]], ["London"]) == {"f1": 0.0, "em": 0.0}
    assert metrics.trivia_qa(["Paris"], ["Paris"]) == {"f1": 100.0, "em": 100.0}
    with pytest.raises(ValueError, match="example 0 has no answer aliases"):
        metrics.trivia_qa([[]], ["x"])


def test_trivia_qa_postprocess_keeps_aliases():
    example = {"answers": np.array([b"Paris", b"Paris, France"], dtype=object)}
    assert metrics.trivia_qa_postprocess(b"Paris", example=example, is_target=True) == [
        "Paris",
        "Paris, France",
    ]
    assert metrics.trivia_qa_postprocess(b"Lyon", example=example, is_target=False) == "Lyon"
    assert metrics.trivia_qa_postprocess("Lyon") == "Lyon"
