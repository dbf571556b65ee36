"""Tests of gqa_t5x.sanity on a tiny suite: baselines against hand-computed references, and one
short end-to-end run through the library's training and evaluation."""

import collections
import json
import math
import string

import numpy as np
import pytest
import sacrebleu

from gqa_t5x.data import synthetic as syn
from gqa_t5x.data.synthetic import language as sl
from gqa_t5x.experiments import sanity
from gqa_t5x.training import evaluate

TINY = syn.SuiteConfig(
    language=sl.LanguageConfig(seed=3, num_entities=30, num_attributes=4, values_per_attribute=5,
                               num_relations=3, num_nouns=40, num_verbs=20, num_adjectives=20,
                               num_prepositions=3),
    seed=7, doc_entities=3, doc_facts_per_entity=(1, 2), doc_clauses=3, qa_entities=3,
    qa_attributes=2, qa_clauses=0, vocab_size=300, vocab_training_docs=150,
    num_examples={"train": 300, "validation": 30, "test": 30})
QA_LENGTHS = {"inputs": 96, "targets": 8}


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("sanity_cache"))
    return syn.register_synthetic_tasks(TINY, cache_dir=cache, prefix="test_sanity")


def test_translate_copy_baseline_is_sacrebleu_of_the_source():
    examples = syn.generate_examples("translate", "validation", 10, config=TINY)
    sources = [ex["inputs"][len("translate: "):] for ex in examples]
    want = sacrebleu.corpus_bleu(sources, [[ex["targets"] for ex in examples]]).score
    got = sanity.text_baselines("translate", 10, TINY)
    assert got == {"copy": pytest.approx(want)}


def test_qa_baselines_by_hand():
    examples = syn.generate_examples("qa", "validation", 20, config=TINY)
    hits = collections.Counter()
    for ex in examples:
        question, context = ex["inputs"].split(" context: ")
        entity, attribute = question.removeprefix("question: ").rstrip("?").split()
        facts = [s.split() for s in context.rstrip(".").split(". ")]
        first_of_entity = next(f[2] for f in facts if f[0] == entity)
        first_of_attribute = next(f[2] for f in facts if f[1] == attribute)
        hits["entity"] += first_of_entity == ex["targets"]
        hits["attribute"] += first_of_attribute == ex["targets"]
    got = sanity.text_baselines("qa", 20, TINY)
    assert got == {k: pytest.approx(100 * hits[k] / 20) for k in ("attribute", "entity")}


def test_unigram_baseline_counts_the_tokenized_targets(tiny_tasks):
    vocabulary = tiny_tasks["test_sanity_qa"].output_features["targets"].vocabulary
    eos = vocabulary.eos_id

    def ids(split, n):
        return [vocabulary.encode(ex["targets"])[:QA_LENGTHS["targets"] - 1] + [eos]
                for ex in syn.generate_examples("qa", split, n, config=TINY)]

    counts = collections.Counter(i for t in ids("train", 50) for i in t)
    total = sum(counts.values())
    top = counts.most_common(1)[0][0]
    val = [i for t in ids("validation", 10) for i in t]
    want_accuracy = np.mean([i == top for i in val])
    want_loss = -np.mean([math.log((counts[i] + 1) / (total + vocabulary.vocab_size))
                          for i in val])
    got = sanity.unigram_baseline("test_sanity_qa", QA_LENGTHS, num_train=50, num_eval=10)
    assert got["token_accuracy"] == pytest.approx(want_accuracy)
    assert got["loss"] == pytest.approx(want_loss)


@pytest.mark.slow
def test_run_task_trains_evaluates_and_tabulates(tiny_tasks, tmp_path):
    size = sanity.ModelSize(emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                            num_layers=1)
    result = sanity.run_task("qa", str(tmp_path / "qa"), steps=4, batch_size=4, size=size,
                             num_eval=8, eval_batch_size=4, feature_lengths=QA_LENGTHS,
                             config=TINY, prefix="test_sanity")
    assert result.steps == 4 and result.metric == "em"
    # EM by hand on the checkpoint's greedy predictions of the same 8 examples: TriviaQA's
    # normalization (lowercase, punctuation to spaces, no articles), then string equality.
    out = tmp_path / "predictions.jsonl"
    evaluate.infer(str(out), checkpoint_path=str(tmp_path / "qa" / "checkpoint_4"),
                   settings=evaluate.EvalSettings(mixture_or_task_name="test_sanity_qa",
                                                  feature_lengths=QA_LENGTHS, batch_size=4,
                                                  num_examples=8))
    records = [json.loads(line) for line in out.read_text().splitlines()]

    def normalize(text):
        text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
        return " ".join(w for w in text.split() if w not in ("a", "an", "the"))

    em = 100.0 * np.mean([normalize(r["prediction"]) == normalize(r["targets"]) for r in records])
    assert len(records) == 8 and result.model == pytest.approx(em)
    scored = sanity.text_baselines("qa", 8, TINY)
    assert result.baselines == pytest.approx({"entity": scored["entity"]})
    assert result.heuristics == pytest.approx({"attribute": scored["attribute"]})
    assert math.isfinite(result.details["first_train_loss"])
    assert (tmp_path / "qa" / "checkpoint_4").is_dir()
    table = sanity.sanity_table([result], 8)
    assert table.splitlines()[2].startswith("| qa | 4 | ")
    with pytest.raises(ValueError, match="unknown synthetic task 'q'"):
        sanity.run_task("q", str(tmp_path / "q"))
    with pytest.raises(ValueError, match="needs its own task prefix"):
        sanity.run_task("qa", str(tmp_path / "q"), config=TINY)


def test_teacher_forced_metrics_against_numpy(tiny_tasks):
    """Per-token cross-entropy and argmax accuracy over the validation targets, recomputed in
    numpy from the network's logits (not through the model's loss code)."""
    import jax
    import seqio

    from gqa_t5x.training import models

    name = "test_sanity_qa"
    vocab_size = tiny_tasks[name].output_features["targets"].vocabulary.vocab_size
    model = models.build_model(models.model_config(
        "tiny", vocab_size=-(-vocab_size // 128) * 128, emb_dim=32, num_heads=4, num_kv_heads=2,
        head_dim=8, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0))
    params = model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 8),
                                "decoder_input_tokens": (1, 8)})["params"]
    got = sanity.teacher_forced_metrics(model, params, name, QA_LENGTHS, num_examples=7,
                                        batch_size=4)

    ds = tiny_tasks[name].get_dataset(QA_LENGTHS, split="validation", shuffle=False, seed=0,
                                      use_cached=False).take(7)
    batch = next(seqio.EncDecFeatureConverter(pack=False)(ds, QA_LENGTHS).batch(7)
                 .as_numpy_iterator())
    logits = np.asarray(model.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], enable_dropout=False), np.float64)
    targets = batch["decoder_target_tokens"]
    mask = targets > 0
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    assert mask.sum() > 7
    assert got["loss"] == pytest.approx(nll[mask].mean(), rel=1e-5)
    assert got["token_accuracy"] == pytest.approx((logits.argmax(-1) == targets)[mask].mean())
