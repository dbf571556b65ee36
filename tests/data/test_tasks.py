"""Tests for gqa_t5x.tasks and gqa_t5x.span_corruption.

TFDS data is mocked (`tfds.testing.mock_data`, generated from the builders' feature specs) and the
vocabulary is a tiny SentencePiece model trained here; nothing is downloaded.
"""

import importlib

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from gqa_t5x.data import metrics, span_corruption, tasks, vocab

EXTRA_IDS = 20
NUM_MOCK_EXAMPLES = 6
SHORT = {"inputs": 32, "targets": 16}


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    texts = [
        "summarize the article about a big cafe in a hidden bay.",
        "each bad fig fed a jade hedge; gab, jab, dig.",
        "translate english to german: the house is small.",
        "question: who wrote it? context: a chef baked a cake.",
    ] * 10
    path = str(tmp_path_factory.mktemp("spm") / "tiny.model")
    vocab.train_sentencepiece(texts, path, 64, hard_vocab_limit=False)
    v = vocab.get_vocabulary(path, extra_ids=EXTRA_IDS)
    tasks.register_tasks(vocabulary=v)
    yield v
    tasks.register_tasks()  # leave the default registrations behind


@pytest.fixture
def mock_tfds(monkeypatch):
    # Mocked builders have no split metadata; seqio asks a source for its size to decide on
    # in-memory caching, so answer with the mocked count.
    monkeypatch.setattr(
        seqio.TfdsDataSource, "num_input_examples", lambda self, split: NUM_MOCK_EXAMPLES
    )
    with tfds.testing.mock_data(
        num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        yield


def _nonpad(row):
    return row[row != 0]


def _check_enc_dec_batch(batch, lengths, batch_size):
    assert set(batch) == {
        "encoder_input_tokens",
        "decoder_target_tokens",
        "decoder_input_tokens",
        "decoder_loss_weights",
    }
    assert batch["encoder_input_tokens"].shape == (batch_size, lengths["inputs"])
    for key in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"):
        assert batch[key].shape == (batch_size, lengths["targets"])
    for i in range(batch_size):
        inputs = _nonpad(batch["encoder_input_tokens"][i])
        targets = batch["decoder_target_tokens"][i]
        # EOS (id 1) ends both sequences exactly once; everything after is padding.
        assert inputs[-1] == 1 and np.sum(inputs == 1) == 1
        assert _nonpad(targets)[-1] == 1 and np.sum(targets == 1) == 1
        n = len(_nonpad(targets))
        assert np.all(targets[:n] != 0) and np.all(targets[n:] == 0)
        # Teacher forcing: decoder inputs are the targets shifted right behind a 0.
        np.testing.assert_array_equal(
            batch["decoder_input_tokens"][i], np.concatenate([[0], targets[:-1]])
        )
        np.testing.assert_array_equal(batch["decoder_loss_weights"][i], targets != 0)


def _first_batch(name, lengths, batch_size=2, seed=0):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(sequence_length=lengths, split="validation", shuffle=False, seed=seed)
    converter = seqio.EncDecFeatureConverter(pack=False)
    ds = converter(ds, lengths).batch(batch_size)
    return next(iter(ds.as_numpy_iterator()))


@pytest.mark.parametrize(
    "name, prefix",
    [
        ("cnn_dailymail", "summarize: "),
        ("arxiv", "summarize: "),
        ("pubmed", "summarize: "),
        ("media_sum", "summarize: "),
        ("multi_news", "summarize: "),
        ("wmt14_ende", "translate English to German: "),
        ("trivia_qa", "question: "),
    ],
)
def test_fine_tuning_task_batches(name, prefix, tiny_vocab, mock_tfds):
    task = seqio.get_mixture_or_task(name)
    assert task.output_features["inputs"].vocabulary is tiny_vocab
    ex = next(iter(task.get_dataset(SHORT, "validation", shuffle=False).as_numpy_iterator()))
    assert ex["inputs_pretokenized"].decode().startswith(prefix)
    # Tokens are seqio's encoding of the text, truncated, with EOS last.
    expected = tiny_vocab.encode(ex["inputs_pretokenized"].decode())[: SHORT["inputs"] - 1]
    np.testing.assert_array_equal(ex["inputs"], expected + [1])
    batch = _first_batch(name, SHORT)
    _check_enc_dec_batch(batch, SHORT, 2)


def test_trivia_qa_keeps_answer_aliases(tiny_vocab, mock_tfds):
    task = seqio.get_mixture_or_task("trivia_qa")
    ex = next(iter(task.get_dataset(SHORT, "validation", shuffle=False).as_numpy_iterator()))
    aliases = metrics.trivia_qa_postprocess(ex["targets_pretokenized"], example=ex, is_target=True)
    assert aliases[0] == ex["targets_pretokenized"].decode()
    assert all(isinstance(a, str) for a in aliases)
    assert b" context: " in ex["inputs_pretokenized"]
    assert task.postprocess_fn(aliases[0], example=ex, is_target=False) == aliases[0]
    assert metrics.trivia_qa([aliases], [aliases[0]])["em"] == 100.0


def test_task_metrics_and_splits(tiny_vocab):
    rouge_tasks = ["cnn_dailymail", "arxiv", "pubmed", "media_sum", "multi_news"]
    for name in rouge_tasks:
        assert seqio.get_mixture_or_task(name).metric_fns == [metrics.rouge]
    assert seqio.get_mixture_or_task("wmt14_ende").metric_fns == [metrics.bleu]
    assert seqio.get_mixture_or_task("trivia_qa").metric_fns == [metrics.trivia_qa]
    assert seqio.get_mixture_or_task("c4_span_corruption").metric_fns == []
    for name in tasks.TASKS:
        assert "validation" in seqio.get_mixture_or_task(name).splits


def test_ablation_mixture_batches(tiny_vocab, mock_tfds):
    mixture = seqio.get_mixture_or_task("ablation_mixture")
    assert sorted(t.name for t in mixture.tasks) == ["cnn_dailymail", "multi_news", "trivia_qa"]
    assert len({mixture.get_rate(t) for t in mixture.tasks}) == 1
    ds = mixture.get_dataset(SHORT, "validation", shuffle=False, seed=0)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, SHORT).batch(3)
    _check_enc_dec_batch(next(iter(ds.as_numpy_iterator())), SHORT, 3)


@pytest.mark.parametrize("name", ["table1_mixture", "summarization_mixture"])
def test_table1_mixtures_batch_every_task(name, tiny_vocab, mock_tfds):
    mixture = seqio.get_mixture_or_task(name)
    assert len({mixture.get_rate(t) for t in mixture.tasks}) == 1
    ds = mixture.get_dataset(SHORT, "validation", shuffle=False, seed=0)
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, SHORT).batch(4)
    _check_enc_dec_batch(next(iter(ds.as_numpy_iterator())), SHORT, 4)
    # after re-registering the tasks the mixtures hold the new ones, not stale copies
    tasks.register_tasks(vocabulary=tiny_vocab, data_dir="/elsewhere")
    for task in seqio.get_mixture_or_task(name).tasks:
        assert task.source.tfds_dataset.data_dir == "/elsewhere"
    tasks.register_tasks(vocabulary=tiny_vocab)


def test_c4_span_corruption_batches(tiny_vocab, mock_tfds):
    lengths = tasks.feature_lengths("c4_span_corruption", {"inputs": 32})
    assert lengths == {"inputs": 32, "targets": 8}  # 34 tokens: 5 noise in 2 spans
    base_size = tiny_vocab.vocab_size - EXTRA_IDS
    batch = _first_batch("c4_span_corruption", lengths, batch_size=2)
    _check_enc_dec_batch(batch, lengths, 2)
    for i in range(2):
        inputs = _nonpad(batch["encoder_input_tokens"][i])
        targets = _nonpad(batch["decoder_target_tokens"][i])
        # Full chunks: exactly the T5 lengths, both with EOS.
        assert len(inputs) == 32 and len(targets) == 8
        sentinels = [t for t in targets if t >= base_size]
        assert sentinels == [tiny_vocab.vocab_size - 1, tiny_vocab.vocab_size - 2]
        assert [t for t in inputs if t >= base_size] == sentinels
        assert targets[0] == tiny_vocab.vocab_size - 1
        pieces = [tiny_vocab.tokenizer.id_to_piece(int(t)) for t in sentinels]
        assert pieces[0].endswith("<extra_id_0>") and pieces[1].endswith("<extra_id_1>")


def test_registration_is_idempotent(tiny_vocab):
    names = tasks.register_tasks(vocabulary=tiny_vocab)
    assert names == (*tasks.TASKS, "ablation_mixture", "summarization_mixture",
                     "translation_mixture", "qa_mixture", "table1_mixture")
    tasks.register_tasks(vocabulary=tiny_vocab, data_dir="/nonexistent/tfds")
    assert seqio.get_mixture_or_task("cnn_dailymail").source.tfds_dataset.data_dir == (
        "/nonexistent/tfds"
    )
    importlib.reload(tasks)  # registers the defaults again, must not raise
    assert set(tasks.TASKS) <= set(seqio.TaskRegistry.names())
    assert "ablation_mixture" in seqio.MixtureRegistry.names()
    tasks.register_tasks(vocabulary=tiny_vocab)
    assert seqio.get_mixture_or_task("trivia_qa").output_features["targets"].vocabulary is (
        tiny_vocab
    )


def test_register_tasks_source_overrides(tiny_vocab, monkeypatch):
    monkeypatch.setenv(tasks.DATA_DIR_ENV_VAR, "/env/tfds")
    tasks.register_tasks(vocabulary=tiny_vocab, tfds_names={"media_sum": "media_sum:1.0.0"})
    source = seqio.get_mixture_or_task("media_sum").source
    assert source.tfds_dataset.data_dir == "/env/tfds"
    with pytest.raises(KeyError, match="unknown tasks"):
        tasks.register_tasks(vocabulary=tiny_vocab, tfds_names={"imdb": "imdb"})
    monkeypatch.delenv(tasks.DATA_DIR_ENV_VAR)
    tasks.register_tasks(vocabulary=tiny_vocab)


def test_feature_lengths_are_the_papers():
    paper = {
        "c4_span_corruption": (512, 114),
        "cnn_dailymail": (512, 256),
        "arxiv": (2048, 512),
        "pubmed": (2048, 512),
        "media_sum": (2048, 512),
        "multi_news": (2048, 512),
        "wmt14_ende": (512, 256),
        "trivia_qa": (2048, 32),
    }
    for name, (inputs, targets) in paper.items():
        assert tasks.feature_lengths(name) == {"inputs": inputs, "targets": targets}
    assert tasks.feature_lengths("trivia_qa", {"targets": 8}) == {"inputs": 2048, "targets": 8}
    assert tasks.feature_lengths("c4_span_corruption", {"inputs": 128})["targets"] == 29
    with pytest.raises(KeyError, match="unknown task"):
        tasks.feature_lengths("squad")
    with pytest.raises(KeyError, match="unknown features"):
        tasks.feature_lengths("arxiv", {"input": 10})


# ---------------------------------------------------------------------------------------------
# Span corruption, against T5's arithmetic redone here and against the original token stream.


def _t5_lengths(inputs_length, density=0.15, mean_span=3.0):
    """Brute force: the longest token count whose corrupted inputs (+ EOS) fit inputs_length."""
    best = None
    for tokens in range(1, 4 * inputs_length):
        noise = int(round(tokens * density))
        spans = int(round(noise / mean_span))
        if (tokens - noise) + spans + 1 <= inputs_length:
            best = (tokens, noise + spans + 1)
    return best


def test_random_spans_helper_matches_t5_numbers():
    assert span_corruption.random_spans_helper(512, 0.15, 3.0) == (568, 114)
    # 568 tokens: 85 noise in 28 spans; inputs 483 + 28 + EOS = 512, targets 85 + 28 + EOS = 114.
    for inputs_length in (32, 64, 128, 256, 512, 626):
        assert span_corruption.random_spans_helper(inputs_length, 0.15, 3.0) == _t5_lengths(
            inputs_length
        )


def _runs(mask):
    """Run lengths of a boolean array, and the value of the first run."""
    change = np.flatnonzero(np.diff(mask.astype(int))) + 1
    bounds = np.concatenate([[0], change, [len(mask)]])
    return np.diff(bounds), bool(mask[0])


def test_random_spans_noise_mask_counts():
    seeds = tf.constant([[1, 2], [3, 4]], tf.int32)
    for length, noise, spans in [(100, 15, 5), (568, 85, 28), (34, 5, 2)]:
        mask = span_corruption.random_spans_noise_mask(length, 0.15, seeds, 3.0).numpy()
        assert mask.shape == (length,) and mask.sum() == noise
        runs, first_is_noise = _runs(mask)
        # Non-noise first, then alternating, ending on a noise span.
        assert not first_is_noise and len(runs) == 2 * spans and mask[-1]


def _reconstruct(inputs, targets, min_sentinel):
    """Inverse of span corruption: put each target span back in place of its sentinel."""
    spans, current = {}, None
    for t in targets.tolist():
        if t >= min_sentinel:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs.tolist():
        out.extend(spans[t] if t >= min_sentinel else [t])
    return out


def test_span_corruption_reconstructs_the_token_stream():
    vocab_size = 200  # sentinels 199, 198, ...; document tokens stay below 100
    v = seqio.PassThroughVocabulary(size=vocab_size)
    features = {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, 100, size=n).astype(np.int32) for n in (37, 120, 5, 300, 64)]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    lengths = {"inputs": 64, "targets": 14}
    tokens_length, targets_length = _t5_lengths(64)
    assert (tokens_length, targets_length) == (70, 14)
    with seqio.utils.map_seed_manager(42):
        out = list(span_corruption.span_corruption(ds, lengths, features).as_numpy_iterator())
    stream = np.concatenate(docs)
    assert len(out) == int(np.ceil(len(stream) / tokens_length))
    rebuilt = []
    for i, ex in enumerate(out):
        piece = stream[i * tokens_length : (i + 1) * tokens_length]
        rebuilt.extend(_reconstruct(ex["inputs"], ex["targets"], 100))
        if len(piece) == tokens_length:
            # No EOS yet (the task appends it): inputs 63, targets 13.
            assert len(ex["inputs"]) == 63 and len(ex["targets"]) == 13
            sentinels = [t for t in ex["targets"] if t >= 100]
            assert sentinels == [199, 198, 197]
            assert [t for t in ex["inputs"] if t >= 100] == sentinels
    np.testing.assert_array_equal(rebuilt, stream)


def test_span_corruption_is_seeded():
    v = seqio.PassThroughVocabulary(size=200)
    features = {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}
    tokens = np.arange(3, 143, dtype=np.int32)

    def run(seed):
        ds = tf.data.Dataset.from_tensors({"targets": tokens})
        with seqio.utils.map_seed_manager(seed):
            ds = span_corruption.span_corruption(ds, {"inputs": 64, "targets": 14}, features)
            return [ex["inputs"].tolist() for ex in ds.as_numpy_iterator()]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_span_corruption_rejects_short_targets():
    v = seqio.PassThroughVocabulary(size=200)
    features = {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}
    ds = tf.data.Dataset.from_tensors({"targets": np.arange(3, 50, dtype=np.int32)})
    with pytest.raises(ValueError, match="targets length 100 is shorter than 114"):
        span_corruption.span_corruption(ds, {"inputs": 512, "targets": 100}, features)
