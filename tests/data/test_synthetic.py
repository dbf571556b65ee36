"""Tests of the embedded synthetic suite, on a tiny language and a small vocabulary."""

import collections
import os
import random

import numpy as np
import pytest
import seqio

from gqa_t5x.data import metrics, span_corruption, vocab
from gqa_t5x.data import synthetic as syn
from gqa_t5x.data.synthetic import language as sl

TINY_LANGUAGE = sl.LanguageConfig(
    seed=3, num_entities=30, num_attributes=4, values_per_attribute=5, num_relations=3,
    num_nouns=40, num_verbs=20, num_adjectives=20, num_prepositions=3)
TINY = syn.SuiteConfig(
    language=TINY_LANGUAGE, seed=7, doc_entities=3, doc_facts_per_entity=(1, 2), doc_clauses=3,
    qa_entities=3, qa_attributes=2, qa_clauses=0, vocab_size=300, vocab_training_docs=150,
    num_examples={"train": 300, "validation": 30, "test": 30})
# So few words that clauses repeat: the checks below cannot pass by the luck of unique inputs.
REPETITIVE = syn.SuiteConfig(
    language=sl.LanguageConfig(num_entities=2, num_nouns=2, num_verbs=2, num_adjectives=1,
                               num_prepositions=1),
    translate_pp_rate=0.0)
LENGTHS = {
    "span_corruption": {"inputs": 64, "targets": span_corruption.targets_length_for(64)},
    "summarize": {"inputs": 160, "targets": 48},
    "translate": {"inputs": 48, "targets": 48},
    "qa": {"inputs": 96, "targets": 8},
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


@pytest.fixture(scope="module")
def tiny_tasks(cache_dir):
    return syn.register_synthetic_tasks(TINY, cache_dir=cache_dir, prefix="test_synthetic")


def _key(ex):
    return ex.get("inputs", ex.get("text"))


@pytest.mark.parametrize("task", syn.TASKS)
def test_examples_are_deterministic_and_depend_on_the_seed(task):
    a = syn.generate_examples(task, "train", 5, config=TINY)
    b = syn.generate_examples(f"synthetic_{task}", "train", 5, config=TINY)
    c = syn.generate_examples(task, "train", 5, seed=8, config=TINY)
    assert a == b
    assert [_key(x) for x in a] != [_key(x) for x in c]
    assert len({_key(x) for x in a}) > 1


@pytest.mark.parametrize("task,config", [(t, TINY) for t in syn.TASKS]
                         + [("translate", REPETITIVE)])
def test_splits_are_disjoint(task, config):
    inputs = {split: [_key(x) for x in syn.generate_examples(task, split, n, config=config)]
              for split, n in (("train", 300), ("validation", 60), ("test", 60))}
    train, validation, test = (set(inputs[s]) for s in ("train", "validation", "test"))
    assert not train & validation
    assert not train & test
    assert not validation & test
    if config is REPETITIVE:  # inputs repeat, so disjointness must come from the split rule
        assert len(train) < 300 and len(validation) < 60


def test_summarize_targets_are_exactly_the_title_facts_in_order():
    lang = sl.get_language(TINY_LANGUAGE)
    fact_words = set(lang.attributes) | set(lang.relations)
    for ex in syn.generate_examples("summarize", "validation", 30, config=TINY):
        assert ex["inputs"].startswith("summarize: ")
        title, body = ex["inputs"][len("summarize: "):].split(": ", 1)
        sentences = [s.strip() + "." for s in body.split(".") if s.strip()]
        # Independent parse: a fact is `SUBJECT attribute-or-relation OBJECT.`
        expected = [s for s in sentences
                    if s.split()[0] == title and len(s.split()) == 3
                    and s.split()[1] in fact_words]
        assert expected, ex
        assert ex["targets"] == " ".join(expected)
        # The document talks about other entities too.
        subjects = {s.split()[0] for s in sentences if s.split()[1] in fact_words}
        assert len(subjects) > 1


def test_qa_answer_is_in_the_context_and_unambiguous():
    lang = sl.get_language(TINY_LANGUAGE)
    answers = []
    for ex in syn.generate_examples("qa", "validation", 30, config=TINY):
        question, context = ex["inputs"].removeprefix("question: ").split(" context: ")
        entity, attribute = question.rstrip("?").split()
        facts = [s.split() for s in context.rstrip(".").split(". ")]
        matching = [f[2] for f in facts if f[0] == entity and f[1] == attribute]
        assert matching == [ex["targets"]]
        assert ex["answers"] == [ex["targets"]]
        assert ex["targets"] in lang.values[lang.attributes.index(attribute)]
        # Neither the entity nor the attribute alone pins the answer down.
        assert sum(f[0] == entity for f in facts) == TINY.qa_attributes
        assert sum(f[1] == attribute for f in facts) == TINY.qa_entities
        answers.append(ex["targets"])
    assert len(set(answers)) > 3


def test_translation_is_a_function_of_the_source():
    examples = syn.generate_examples("translate", "train", 300, config=REPETITIVE)
    translations = collections.defaultdict(set)
    for ex in examples:
        translations[ex["inputs"]].add(ex["targets"])
    assert all(len(t) == 1 for t in translations.values())
    assert len(translations) < len(examples)  # some sources repeat, so the check has teeth


def test_target_rendering_by_hand():
    lang = sl.get_language(TINY_LANGUAGE)
    n1, n3 = lang.nouns[0], lang.nouns[2]
    adj, verb, prep = lang.adjectives[0], lang.verbs[0], lang.prepositions[0]
    clause = sl.Clause(
        subject=sl.NounPhrase(noun=n1, adjective=adj, definite=True, plural=True),
        verb=verb, tense="past",
        obj=sl.NounPhrase(entity=lang.entities[0]),
        preposition=prep, oblique=sl.NounPhrase(noun=n3, definite=False, plural=False))
    t, case = lang.target_words, lang.case_suffixes
    assert lang.render_source(clause) == " ".join([
        lang.determiners[(True, True)], adj, n1, lang.auxiliaries["past"], verb,
        lang.entities[0], prep, lang.determiners[(False, False)], n3]) + "."
    assert lang.render_target(clause) == " ".join([
        lang.target_article, t[n1] + lang.plural_suffix + case["nom"],
        t[adj] + lang.adjective_plural_suffix,
        t[n3] + case["obl"], t[prep],
        lang.entities[0] + case["acc"],
        t[verb] + lang.tense_suffixes["past"] + lang.agreement_suffix]) + "."


def test_lexicons_are_disjoint_and_zipfian():
    lang = sl.get_language(sl.LanguageConfig())
    source = (lang.nouns + lang.verbs + lang.adjectives + lang.prepositions + lang.attributes
              + lang.relations + [w for vs in lang.values for w in vs]
              + [e.lower() for e in lang.entities] + list(lang.determiners.values()))
    target = list(lang.target_words.values()) + [lang.target_article]
    assert len(set(source)) == len(source)
    assert len(set(target)) == len(target)
    assert not set(source) & set(target)
    assert len(source) + len(target) > 3000
    rng = random.Random(0)
    counts = collections.Counter(lang.sample_noun(rng) for _ in range(20000))
    ranks = [counts[w] for w in lang.nouns[:4]]
    assert ranks == sorted(ranks, reverse=True)
    # p(rank 1) / p(rank 2) = 2 ** 1.1 for the default exponent.
    assert ranks[0] / ranks[1] == pytest.approx(2 ** 1.1, rel=0.1)


def test_vocabulary_is_deterministic_cached_and_t5_like(tmp_path, cache_dir):
    first = syn.ensure_sentencepiece_model(TINY, str(tmp_path / "a"))
    second = syn.ensure_sentencepiece_model(TINY, str(tmp_path / "b"))
    with open(first, "rb") as f, open(second, "rb") as g:
        assert f.read() == g.read()
    mtime = os.path.getmtime(first)
    assert syn.ensure_sentencepiece_model(TINY, str(tmp_path / "a")) == first
    assert os.path.getmtime(first) == mtime
    assert [p for p in os.listdir(tmp_path / "a")] == [os.path.basename(first)]
    v = syn.suite_vocabulary(str(tmp_path / "a"), config=TINY)
    assert v.vocab_size == TINY.vocab_size + TINY.extra_ids
    assert (v.tokenizer.pad_id(), v.eos_id, v.unk_id) == (vocab.PAD_ID, vocab.EOS_ID, vocab.UNK_ID)
    text = syn.generate_examples("summarize", "validation", 1, config=TINY)[0]["inputs"]
    ids = v.encode(text)
    assert vocab.UNK_ID not in ids
    assert v.decode(ids) == text
    # Another config, another cache entry.
    assert syn.sentencepiece_model_path(TINY, cache_dir) != syn.sentencepiece_model_path(
        syn.DEFAULT_CONFIG, cache_dir)


def test_registration_is_lazy_and_idempotent(tmp_path):
    names = [f"lazy_synthetic_{t}" for t in syn.TASKS]
    tasks = syn.register_synthetic_tasks(TINY, cache_dir=str(tmp_path), prefix="lazy_synthetic")
    assert sorted(tasks) == sorted(names)
    assert not os.listdir(tmp_path)  # nothing trained before the vocabulary is used
    syn.register_synthetic_tasks(TINY, cache_dir=str(tmp_path), prefix="lazy_synthetic")
    assert set(names) <= set(seqio.TaskRegistry.names())
    # the prefix's mixtures too, holding the prefix's tasks (registering twice replaced them)
    union = seqio.get_mixture_or_task("lazy_synthetic_table1_mixture")
    assert sorted(t.name for t in union.tasks) == sorted(names[1:])
    for name in syn.SYNTHETIC_FEATURE_LENGTHS:  # the default suite: tasks and mixtures
        assert name in set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    for name in [n for n in seqio.MixtureRegistry.names() if n.startswith("lazy_synthetic")]:
        seqio.MixtureRegistry.remove(name)
    for name in names:
        seqio.TaskRegistry.remove(name)


def _decode(vocabulary, ids):
    ids = [int(i) for i in ids if i != 0]
    assert ids[-1] == vocab.EOS_ID
    return vocabulary.decode(ids[:-1])


@pytest.mark.parametrize("task", ["summarize", "translate", "qa"])
def test_tasks_through_seqio(tiny_tasks, task):
    t = tiny_tasks[f"test_synthetic_{task}"]
    lengths = LENGTHS[task]
    ds = t.get_dataset(lengths, split="validation", shuffle=False)
    examples = list(ds.take(5).as_numpy_iterator())
    expected = syn.generate_examples(task, "validation", 5, config=TINY)
    v = t.output_features["targets"].vocabulary
    for ex, ref in zip(examples, expected):
        assert ex["inputs_pretokenized"].decode() == ref["inputs"]
        assert _decode(v, ex["inputs"]) == ref["inputs"]
        assert _decode(v, ex["targets"]) == ref["targets"]
    converted = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
    batch = next(converted.batch(4).as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (4, lengths["inputs"])
    assert batch["decoder_target_tokens"].shape == (4, lengths["targets"])
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:],
                                  batch["decoder_target_tokens"][:, :-1])
    if task == "qa":
        target = t.postprocess_fn(examples[0]["targets_pretokenized"], example=examples[0],
                                  is_target=True)
        assert target == expected[0]["answers"]
        assert t.metric_fns[0]([target], [expected[0]["targets"]]) == {"f1": 100.0, "em": 100.0}


def test_span_corruption_task(tiny_tasks):
    t = tiny_tasks["test_synthetic_span_corruption"]
    lengths = LENGTHS["span_corruption"]
    ds = t.get_dataset(lengths, split="validation", shuffle=False, seed=0)
    examples = list(ds.take(3).as_numpy_iterator())
    assert examples
    v = t.output_features["targets"].vocabulary
    first_sentinel = v.vocab_size - 1
    for ex in examples:
        assert len(ex["inputs"]) <= lengths["inputs"]
        assert len(ex["targets"]) <= lengths["targets"]
        assert ex["targets"][0] == first_sentinel
        assert first_sentinel in ex["inputs"]
        assert ex["inputs"][-1] == ex["targets"][-1] == vocab.EOS_ID
        # Every non-sentinel input token comes from the documents' tokens.
        plain = [i for i in ex["inputs"][:-1] if i < v.vocab_size - TINY.extra_ids]
        assert vocab.UNK_ID not in plain and plain


def test_baselines_on_hand_made_inputs():
    assert syn.baseline_predictions(
        "qa", ["question: Ab col? context: Cd col red. Ab size big. Ab col blue."],
        "attribute") == ["red"]
    assert syn.baseline_predictions(
        "synthetic_qa", ["question: Ab col? context: Cd col red. Ab size big. Ab col blue."],
        "entity") == ["big"]
    doc = "summarize: Ab: Ab col red. Cd likes Ab. Cd col blue. x y z."
    assert syn.baseline_predictions("summarize", [doc], "title_sentences") == [
        "Ab col red. Cd likes Ab."]
    assert syn.baseline_predictions("summarize", [doc], "title_subject") == ["Ab col red."]
    assert syn.baseline_predictions("summarize", [doc], "lead") == [
        "Ab col red. Cd likes Ab. Cd col blue."]
    assert syn.baseline_predictions("translate", ["translate: a b."], "copy") == ["a b."]
    with pytest.raises(ValueError, match="no baseline strategy 'copy' for task 'qa'"):
        syn.baseline_predictions("qa", ["question: a b? context: "], "copy")


def test_trivial_baselines_leave_headroom():
    examples = syn.generate_examples("qa", "validation", 40, config=TINY)
    answers = [ex["answers"] for ex in examples]
    inputs = [ex["inputs"] for ex in examples]
    for strategy in ("attribute", "entity"):
        assert metrics.trivia_qa(answers, syn.baseline_predictions("qa", inputs, strategy))[
            "em"] < 80
    examples = syn.generate_examples("summarize", "validation", 20, config=TINY)
    copy = syn.baseline_predictions("summarize", [ex["inputs"] for ex in examples], "copy")
    assert metrics.rouge([ex["targets"] for ex in examples], copy)["rouge1"] < 50


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown synthetic task 'sumarize'"):
        syn.generate_examples("sumarize", "train", 1, config=TINY)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        syn.generate_examples("qa", "dev", 1, config=TINY)
    with pytest.raises(ValueError, match="num_nouns=0"):
        sl.LanguageConfig(num_nouns=0)
    bad = syn.SuiteConfig(language=TINY_LANGUAGE, qa_entities=100)
    with pytest.raises(ValueError, match="num_entities=100"):
        syn.generate_examples("qa", "train", 1, config=bad)


def test_default_qa_is_one_entity_profile_with_filler_clauses():
    config = syn.DEFAULT_CONFIG
    lang = sl.get_language(config.language)
    attribute_words = set(lang.attributes)
    for ex in syn.generate_examples("qa", "validation", 20):
        question, context = ex["inputs"].removeprefix("question: ").split(" context: ")
        entity, attribute = question.rstrip("?").split()
        sentences = [s.split() for s in context.rstrip(".").split(". ")]
        facts = [s for s in sentences if len(s) == 3 and s[1] in attribute_words]
        assert len(facts) == config.qa_attributes
        assert len(sentences) == config.qa_attributes + config.qa_clauses
        assert {f[0] for f in facts} == {entity}
        assert len({f[1] for f in facts}) == config.qa_attributes  # each attribute once
        assert [f[2] for f in facts if f[1] == attribute] == [ex["targets"]]
