"""SentencePiece vocabularies with T5's conventions.

The paper's models use T5's public SentencePiece model (32,000 pieces) plus 100 sentinel ids
(`<extra_id_0>` is the last id, `vocab_size - 1`, counting down), 32,100 ids in all (T5.1.1 pads
its embedding table to 32,128). Its path is configurable, so that nothing is fetched where the
default cannot be reached:

1. the `path` argument of `get_vocabulary`,
2. the environment variable `GQA_T5X_VOCAB`,
3. `DEFAULT_VOCAB_PATH` (a Google Cloud Storage path; only read when the vocabulary is first used).

`train_sentencepiece` trains small models with the same id conventions (pad 0, eos 1, unk 2, no
bos) for tests and for the embedded synthetic suite.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm
import seqio

DEFAULT_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_EXTRA_IDS = 100
VOCAB_ENV_VAR = "GQA_T5X_VOCAB"

# T5's reserved ids.
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


def default_vocab_path() -> str:
    """The SentencePiece model path used when none is given: `$GQA_T5X_VOCAB` or the T5 default."""
    return os.environ.get(VOCAB_ENV_VAR) or DEFAULT_VOCAB_PATH


def get_vocabulary(
    path: str | None = None, extra_ids: int = DEFAULT_EXTRA_IDS
) -> seqio.SentencePieceVocabulary:
    """A seqio SentencePiece vocabulary with `extra_ids` sentinel ids appended.

    Args:
      path: SentencePiece model file; None means `default_vocab_path()`. The file is read lazily
        by seqio, on first use.
      extra_ids: number of sentinel ids (`<extra_id_0>` = `vocab_size - 1`, counting down).

    Returns:
      `seqio.SentencePieceVocabulary`; `vocab_size` = pieces in the model + `extra_ids`.
    """
    if extra_ids < 0:
        raise ValueError(f"get_vocabulary: extra_ids={extra_ids} must be >= 0")
    path = path or default_vocab_path()
    return _Vocabulary(path, extra_ids=extra_ids)


class _Vocabulary(seqio.SentencePieceVocabulary):
    """seqio's vocabulary, whose first read says which file it could not read and how to give
    a local one, instead of a TensorFlow file-system error (the default path is on Google Cloud
    Storage, which most machines cannot read)."""

    def _model_context(self):
        try:
            return super()._model_context()
        except Exception as e:  # TensorFlow's file-system errors share no base class with OSError
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"cannot read the SentencePiece vocabulary {self._sentencepiece_model_file} "
                f"({detail}); the T5 vocabulary must be given as a local path: download "
                f"{DEFAULT_VOCAB_PATH} and set {VOCAB_ENV_VAR}=/path/to/sentencepiece.model"
            ) from None


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    user_defined_symbols: Sequence[str] = (),
    byte_fallback: bool = False,
    hard_vocab_limit: bool = True,
    max_sentence_length: int = 16384,
) -> str:
    """Trains a SentencePiece model with T5's id conventions and writes it to `model_path`.

    Ids: pad 0, eos 1, unk 2, no bos, as in T5's vocabulary, so `seqio.SentencePieceVocabulary`
    treats the result like T5's. Training is deterministic: one thread, input in the given order,
    no sampling of input sentences, so equal `texts` and settings give byte-identical models.

    Args:
      texts: training sentences (one string each; newlines inside a string are kept as spaces).
      model_path: where to write the `.model` file (its parent directory is created). The `.vocab`
        listing SentencePiece usually writes beside it is not written.
      vocab_size: number of pieces, including pad, eos and unk (sentinels are added later by
        `get_vocabulary(extra_ids=...)`).
      model_type: "unigram" (T5's), "bpe", "char" or "word".
      character_coverage: fraction of characters covered; 1.0 keeps every character seen.
      user_defined_symbols: pieces that are always kept whole.
      byte_fallback: encode unknown characters as bytes instead of unk.
      hard_vocab_limit: if False, `vocab_size` is an upper bound (useful for tiny corpora).
      max_sentence_length: longest sentence, in bytes, used for training.

    Returns:
      `model_path`.
    """
    sentences = [t.replace("\n", " ") for t in texts]
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise ValueError(f"train_sentencepiece: no non-empty text to train {model_path} on")
    if vocab_size < 4:
        raise ValueError(
            f"train_sentencepiece: vocab_size={vocab_size} must be >= 4 "
            "(pad, eos and unk take ids 0-2)"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        user_defined_symbols=list(user_defined_symbols),
        byte_fallback=byte_fallback,
        hard_vocab_limit=hard_vocab_limit,
        max_sentence_length=max_sentence_length,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    parent = os.path.dirname(model_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(model_path, "wb") as f:
        f.write(model.getvalue())
    return model_path
