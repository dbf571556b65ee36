"""Tests for gqa_t5x.vocab: T5 id conventions, sentinels, determinism, configuration."""

import pytest
import sentencepiece as spm

from gqa_t5x.data import vocab

TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "a bad cafe fed a big hedge; a jade cab had a deb.",
    "grouped query attention shares keys and values between heads!",
    "multi query attention keeps a single key and value head?",
] * 8


def _train(tmp_path, name="spm.model", vocab_size=48):
    return vocab.train_sentencepiece(
        TEXTS, str(tmp_path / name), vocab_size, hard_vocab_limit=False
    )


def test_train_sentencepiece_uses_t5_ids(tmp_path):
    path = _train(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert 3 < sp.get_piece_size() <= 48
    text = "the lazy fox shares a key"
    assert sp.decode(sp.encode(text)) == text


def test_train_sentencepiece_is_deterministic(tmp_path):
    a = _train(tmp_path, "a.model")
    b = _train(tmp_path, "sub/b.model")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_train_sentencepiece_rejects_empty_text(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no non-empty text"):
        vocab.train_sentencepiece(["", "  "], str(tmp_path / "x.model"), 32)
    with pytest.raises(ValueError, match="vocab_size=3"):
        vocab.train_sentencepiece(TEXTS, str(tmp_path / "x.model"), 3)


def test_get_vocabulary_appends_sentinels_counting_down(tmp_path):
    path = _train(tmp_path)
    base = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    v = vocab.get_vocabulary(path, extra_ids=7)
    assert v.vocab_size == base + 7
    assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
    # T5: <extra_id_0> is the last id, then counting down.
    for k in range(7):
        assert v.tokenizer.id_to_piece(v.vocab_size - 1 - k).endswith(f"<extra_id_{k}>")
    assert v.encode("<extra_id_0>")[-1] == v.vocab_size - 1
    text = "the quick dog"
    assert v.decode(v.encode(text)) == text


def test_vocab_path_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(vocab.VOCAB_ENV_VAR, raising=False)
    assert vocab.default_vocab_path() == "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
    # Building the default vocabulary reads nothing: seqio loads the model on first use.
    assert vocab.get_vocabulary().sentencepiece_model_file == vocab.DEFAULT_VOCAB_PATH
    path = _train(tmp_path)
    monkeypatch.setenv(vocab.VOCAB_ENV_VAR, path)
    v = vocab.get_vocabulary()
    assert v.sentencepiece_model_file == path
    assert v.vocab_size == spm.SentencePieceProcessor(model_file=path).get_piece_size() + 100
    other = str(tmp_path / "other.model")
    assert vocab.get_vocabulary(other).sentencepiece_model_file == other


def test_get_vocabulary_rejects_negative_extra_ids():
    import pytest

    with pytest.raises(ValueError, match="extra_ids=-1"):
        vocab.get_vocabulary("x.model", extra_ids=-1)


def test_unreadable_vocabulary_names_it_and_gqa_t5x_vocab(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(ValueError) as e:
        _ = vocab.get_vocabulary(missing).vocab_size
    message = str(e.value)
    assert message.startswith(f"cannot read the SentencePiece vocabulary {missing} (")
    assert "must be given as a local path" in message
    assert "GQA_T5X_VOCAB=/path/to/sentencepiece.model" in message
    assert "\n" not in message
