"""The embedded synthetic suite: seqio tasks that mirror the paper's, generated from a seed.

Four tasks over the synthetic language of `synthetic_language` (no third-party text, nothing
downloaded):

| task                        | inputs -> targets                                   | metric   |
| --------------------------- | --------------------------------------------------- | -------- |
| `synthetic_span_corruption` | T5 span corruption of documents (uptraining corpus) | -        |
| `synthetic_summarize`       | long document -> the facts about its title entity   | ROUGE-1  |
| `synthetic_translate`       | clause -> the clause in a second synthetic language | BLEU     |
| `synthetic_qa`              | question + context of many facts -> the answer      | F1 / EM  |

Example `i` of a split is a pure function of `(SuiteConfig, task, split, i)`. Splits are disjoint
by construction: an example belongs to the split that a hash of its input text names (validation
5%, test 5%, train the rest), and each split keeps drawing until it gets one of its own.

The vocabulary is a SentencePiece model trained on generated text (deterministically: same config,
same bytes) the first time a task's vocabulary is used, and cached in `cache_dir`
(default `$GQA_T5X_CACHE`, else `~/.cache/gqa_t5x`) under a name that fingerprints the config.

Tasks named `synthetic_*` with the default `SuiteConfig` are registered on import; set
`GQA_T5X_CACHE` before importing, or call `register_synthetic_tasks` with your own config, prefix
and cache directory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import re
import tempfile
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from gqa_t5x.data import metrics, mixtures, span_corruption, vocab
from gqa_t5x.data.synthetic import language as sl

CACHE_ENV_VAR = "GQA_T5X_CACHE"
SPLITS = ("train", "validation", "test")
TASKS = ("span_corruption", "summarize", "translate", "qa")
_FORMAT_VERSION = 1  # bump when generation changes, so that cached vocabularies are retrained

# Lengths in tokens that hold (nearly) every example of the default config without truncation
# (summarize: inputs at most ~110, targets at most ~16; qa: inputs at most ~100). Span
# corruption packs documents into inputs of 128 tokens, which need targets of 29
# (`span_corruption.targets_length_for(128)`).
SYNTHETIC_FEATURE_LENGTHS = {
    "synthetic_span_corruption": {"inputs": 128, "targets": 32},
    "synthetic_summarize": {"inputs": 128, "targets": 24},
    "synthetic_translate": {"inputs": 32, "targets": 40},
    "synthetic_qa": {"inputs": 128, "targets": 8},
    # The mixtures (see `mixtures`): the longest of their tasks' lengths.
    "synthetic_summarization_mixture": {"inputs": 128, "targets": 24},
    "synthetic_translation_mixture": {"inputs": 32, "targets": 40},
    "synthetic_qa_mixture": {"inputs": 128, "targets": 8},
    "synthetic_table1_mixture": {"inputs": 128, "targets": 40},
    "synthetic_multitask_mixture": {"inputs": 128, "targets": 40},
}


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Everything that determines the suite's data and vocabulary.

    Attributes:
      language: the lexicon (its own seed).
      seed: seed of the example streams.
      doc_entities, doc_facts_per_entity, doc_clauses: documents of span corruption and
        summarization: entities per document (the first is the title), (min, max) facts per
        entity, and filler clauses.
      qa_entities, qa_attributes, qa_clauses: the QA context is a full grid of
        `qa_entities * qa_attributes` facts plus `qa_clauses` filler clauses. With one entity
        the asked attribute is the key (one-hop recall); with several, the answer needs the
        entity and the attribute together (two hops, far harder for a small model).
      translate_entity_rate, translate_pp_rate: probability that a noun phrase is an entity
        (copied, with a case suffix) and that a clause has a prepositional phrase.
      corpus_target_language_rate: share of pre-training documents in the target language.
      vocab_size: SentencePiece pieces (sentinels come on top: `extra_ids`).
      vocab_training_docs: generated documents the SentencePiece model is trained on.
      extra_ids: sentinel ids appended to the vocabulary (T5: 100).
      num_examples: examples per split.
    """

    language: sl.LanguageConfig = dataclasses.field(default_factory=sl.LanguageConfig)
    seed: int = 0
    # Documents of 3 entities with 1-3 facts each and 4 clauses (~75 tokens): a tiny model
    # (d_model 128, 2+2 layers) learns to pick out the title's facts in a few hundred steps but
    # does not saturate (with 5 entities, 2-4 facts and 12 clauses, ~195 tokens, it stayed below
    # the lead baseline after 300 steps).
    doc_entities: int = 3
    doc_facts_per_entity: tuple[int, int] = (1, 3)
    doc_clauses: int = 4
    # One entity, 8 attribute facts and 4 filler clauses: the tiny model above learns the lookup
    # after a few hundred steps (with 8 facts and no clauses: EM 88 after 600 steps). Grids of
    # several entities were not learned within 1,600 steps (4 x 3, 8 x 1: the model copies a value
    # of the asked attribute, or any value, not the entity's), even with the question restated
    # in the target.
    qa_entities: int = 1
    qa_attributes: int = 8
    qa_clauses: int = 4
    translate_entity_rate: float = 0.15
    translate_pp_rate: float = 0.4
    corpus_target_language_rate: float = 0.2
    vocab_size: int = 2000
    vocab_training_docs: int = 3000
    extra_ids: int = 100
    num_examples: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"train": 1_000_000, "validation": 1000, "test": 1000})

    def __hash__(self):
        return hash(repr(self))


DEFAULT_CONFIG = SuiteConfig()


# ---------------------------------------------------------------------------------- examples
def split_of(text: str) -> str:
    """The split an example whose input text is `text` belongs to (5% / 5% / 90%)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    return "validation" if bucket < 5 else "test" if bucket < 10 else "train"


def _draw(task: str, lang: sl.Language, rng: random.Random, config: SuiteConfig) -> dict:
    c = config
    if task == "span_corruption":
        return {"text": sl.corpus_document(lang, rng, c.doc_entities, c.doc_facts_per_entity,
                                           c.doc_clauses, c.corpus_target_language_rate)}
    if task == "summarize":
        return sl.summarize_example(lang, rng, c.doc_entities, c.doc_facts_per_entity,
                                    c.doc_clauses)
    if task == "translate":
        return sl.translate_example(lang, rng, c.translate_entity_rate, c.translate_pp_rate)
    if task == "qa":
        return sl.qa_example(lang, rng, c.qa_entities, c.qa_attributes, c.qa_clauses)
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


def example(task: str, split: str, index: int, config: SuiteConfig = DEFAULT_CONFIG) -> dict:
    """Example `index` of `split` of `task`: a dict of strings ("answers": a list, QA only)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    lang = sl.get_language(config.language)
    rng = random.Random(f"gqa_t5x.synthetic/{config.seed}/{task}/{split}/{index}")
    for _ in range(10_000):
        ex = _draw(task, lang, rng, config)
        if split_of(ex.get("inputs", ex.get("text"))) == split:
            return ex
    raise RuntimeError(f"{task}/{split}: no example of this split in 10,000 draws; the "
                       f"config {config} generates too few distinct inputs")


def generate_examples(task: str, split: str, n: int, seed: int | None = None,
                      config: SuiteConfig = DEFAULT_CONFIG) -> list[dict]:
    """The first `n` examples of `split` of `task` ("summarize", "synthetic_qa", ...).

    `seed`, if given, replaces `config.seed`.
    """
    task = task.removeprefix("synthetic_")
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    return [example(task, split, i, config) for i in range(n)]


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, task: str,
                config: SuiteConfig) -> tf.data.Dataset:
    del shuffle_files, seed  # Examples are indexed; seqio's shuffle buffer shuffles them.
    num = config.num_examples[split]
    signature = {"text": tf.TensorSpec((), tf.string)} if task == "span_corruption" else {
        "inputs": tf.TensorSpec((), tf.string), "targets": tf.TensorSpec((), tf.string)}
    if task == "qa":
        signature["answers"] = tf.TensorSpec((None,), tf.string)

    def generate():
        for i in range(num):
            yield example(task, split, i, config)

    return tf.data.Dataset.from_generator(generate, output_signature=signature)


# -------------------------------------------------------------------------------- vocabulary
def default_cache_dir() -> str:
    """`$GQA_T5X_CACHE`, else `~/.cache/gqa_t5x`."""
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "gqa_t5x")


def _vocab_fingerprint(config: SuiteConfig) -> str:
    fields = (_FORMAT_VERSION, config.language, config.seed, config.doc_entities,
              config.doc_facts_per_entity, config.doc_clauses, config.qa_entities,
              config.qa_attributes, config.qa_clauses, config.translate_entity_rate,
              config.translate_pp_rate, config.corpus_target_language_rate, config.vocab_size,
              config.vocab_training_docs)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def sentencepiece_model_path(config: SuiteConfig = DEFAULT_CONFIG,
                             cache_dir: str | None = None) -> str:
    """Where the suite's SentencePiece model for `config` is cached."""
    return os.path.join(cache_dir or default_cache_dir(),
                        f"synthetic_spm_{config.vocab_size}_{_vocab_fingerprint(config)}.model")


def _vocab_training_texts(config: SuiteConfig) -> list[str]:
    """Pre-training documents plus task examples (for the task prefixes and target language)."""
    lang = sl.get_language(config.language)
    rng = random.Random(f"gqa_t5x.synthetic.vocab/{config.seed}")
    n = config.vocab_training_docs
    texts = [_draw("span_corruption", lang, rng, config)["text"] for _ in range(n)]
    for task in ("summarize", "translate", "qa"):
        for _ in range(max(1, n // 10)):
            ex = _draw(task, lang, rng, config)
            texts += [ex["inputs"], ex["targets"]]
    return texts


def ensure_sentencepiece_model(config: SuiteConfig = DEFAULT_CONFIG,
                               cache_dir: str | None = None) -> str:
    """The path of the suite's SentencePiece model, training and caching it on first use.

    Written to a temporary file and renamed, so that concurrent first uses never see half a file.
    """
    path = sentencepiece_model_path(config, cache_dir)
    if os.path.exists(path):
        return path
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".model.tmp", dir=directory)
    os.close(fd)
    try:
        vocab.train_sentencepiece(_vocab_training_texts(config), tmp, config.vocab_size)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class SyntheticVocabulary(seqio.SentencePieceVocabulary):
    """The suite's SentencePiece vocabulary; the model is trained on first use, not on creation."""

    def __init__(self, config: SuiteConfig = DEFAULT_CONFIG, cache_dir: str | None = None):
        self._suite_config = config
        self._cache_dir = cache_dir or default_cache_dir()
        super().__init__(sentencepiece_model_path(config, self._cache_dir),
                         extra_ids=config.extra_ids)

    def _model_context(self):
        if self._model is None:
            ensure_sentencepiece_model(self._suite_config, self._cache_dir)
        return super()._model_context()


def suite_vocabulary(cache_dir: str | None = None,
                     config: SuiteConfig = DEFAULT_CONFIG) -> seqio.SentencePieceVocabulary:
    """The suite's vocabulary (T5 ids: pad 0, eos 1, unk 2; `extra_ids` sentinels), trained now
    if not cached."""
    return vocab.get_vocabulary(ensure_sentencepiece_model(config, cache_dir),
                                extra_ids=config.extra_ids)


# ------------------------------------------------------------------------------------- tasks
def multitask_mixture_name(prefix: str = "synthetic") -> str:
    """`{prefix}_multitask_mixture`: span corruption and the three fine-tuning tasks' train splits
    at equal rates, the kind of corpus the original T5 checkpoints were pre-trained on (Raffel et
    al., 2020, section 3.5.3: the unsupervised objective mixed with the supervised tasks, then
    fine-tuned). The reproduction grid pre-trains on it: after 300 steps of span corruption alone
    and 300 fine-tuning steps, its big model still ignored the input (QA F1 0, every summary about
    the same entity), while 800 steps on this mixture already put every task above its floor."""
    return f"{prefix}_multitask_mixture"


def register_synthetic_tasks(config: SuiteConfig = DEFAULT_CONFIG, cache_dir: str | None = None,
                             prefix: str = "synthetic") -> dict[str, seqio.Task]:
    """Registers `{prefix}_span_corruption`, `_summarize`, `_translate`, `_qa` (replacing any
    tasks of those names) and returns them by name, and the mixtures
    `mixtures.synthetic_mixtures(prefix)` of the three fine-tuning tasks (`{prefix}_qa_mixture`,
    ..., `{prefix}_table1_mixture`: their union) and `multitask_mixture_name(prefix)`. Nothing
    is generated or trained until used."""
    vocabulary = SyntheticVocabulary(config, cache_dir)
    features = {k: seqio.Feature(vocabulary=vocabulary, add_eos=True)
                for k in ("inputs", "targets")}
    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    specs = {
        "span_corruption": dict(preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            span_corruption.span_corruption_preprocessor(),
            seqio.preprocessors.append_eos_after_trim]),
        "summarize": dict(preprocessors=tokenize, metric_fns=[metrics.rouge]),
        "translate": dict(preprocessors=tokenize, metric_fns=[metrics.bleu]),
        "qa": dict(preprocessors=tokenize, metric_fns=[metrics.trivia_qa],
                   postprocess_fn=metrics.trivia_qa_postprocess),
    }
    suite_mixtures = mixtures.synthetic_mixtures(prefix)
    suite_mixtures[multitask_mixture_name(prefix)] = tuple(f"{prefix}_{t}" for t in TASKS)
    for mixture in suite_mixtures:  # mixtures hold their tasks: drop them before the tasks
        if mixture in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove(mixture)
    tasks = {}
    for task, spec in specs.items():
        name = f"{prefix}_{task}"
        source = seqio.FunctionDataSource(
            functools.partial(_dataset_fn, task=task, config=config),
            splits=SPLITS, num_input_examples=dict(config.num_examples))
        seqio.TaskRegistry.remove(name)
        tasks[name] = seqio.TaskRegistry.add(name, source=source, output_features=features,
                                             **spec)
    for mixture, members in suite_mixtures.items():
        seqio.MixtureRegistry.add(mixture, list(members), default_rate=1.0)
    return tasks


# --------------------------------------------------------------------------------- baselines
def _sentences(text: str) -> list[str]:
    return [m.strip() for m in re.findall(r"[^.?]+[.?]", text)]


def baseline_predictions(task: str, inputs: Sequence[str], strategy: str) -> list[str]:
    """Predictions of trivial strategies, the floor a trained model must clear.

    Strategies:
      summarize: "copy" (the document), "lead" (the first 3 sentences), "title_sentences" (every
        sentence that mentions the title), "title_subject" (every sentence that starts with the
        title: facts about it, and clauses it is the subject of);
      translate: "copy" (the source clause);
      qa: "entity" (the first value given to the asked entity: with one entity, the first
        fact's), "attribute" (the first value given for the asked attribute: with one entity, the
        answer; a heuristic that knows the format).
    """
    task = task.removeprefix("synthetic_")
    out = []
    for text in inputs:
        if task == "summarize" and strategy in ("copy", "lead", "title_sentences", "title_subject"):
            title, body = text.removeprefix("summarize: ").split(": ", 1)
            sentences = _sentences(body)
            if strategy == "copy":
                out.append(body)
            elif strategy == "lead":
                out.append(" ".join(sentences[:3]))
            elif strategy == "title_sentences":
                out.append(" ".join(s for s in sentences if title in s[:-1].split()))
            else:
                out.append(" ".join(s for s in sentences if s.split()[0] == title))
        elif task == "translate" and strategy == "copy":
            out.append(text.removeprefix("translate: "))
        elif task == "qa" and strategy in ("attribute", "entity"):
            question, context = text.removeprefix("question: ").split(" context: ", 1)
            entity, attribute = question.rstrip("?").split()
            facts = [s[:-1].split() for s in _sentences(context)]
            position, key = (1, attribute) if strategy == "attribute" else (0, entity)
            out.append(next((f[2] for f in facts if len(f) == 3 and f[position] == key), ""))
        else:
            raise ValueError(f"no baseline strategy {strategy!r} for task {task!r}")
    return out


register_synthetic_tasks()
