"""seqio Tasks for the paper's pre-training objective and fine-tuning datasets.

Importing this module registers (names as in the paper's tables):

| task | TFDS source | inputs / targets | metric |
| --- | --- | --- | --- |
| `c4_span_corruption` | `c4/en` | 512 / 114 | (loss only) |
| `cnn_dailymail` | `cnn_dailymail` | 512 / 256 | ROUGE |
| `arxiv` | `scientific_papers/arxiv` | 2048 / 512 | ROUGE |
| `pubmed` | `scientific_papers/pubmed` | 2048 / 512 | ROUGE |
| `media_sum` | `media_sum` (manual download) | 2048 / 512 | ROUGE |
| `multi_news` | `multi_news` | 2048 / 512 | ROUGE |
| `wmt14_ende` | `wmt14_translate/de-en` | 512 / 256 | BLEU |
| `trivia_qa` | `trivia_qa/rc` (with evidence) | 2048 / 32 | F1, EM |

the mixture `ablation_mixture` (CNN/DM, Multi-News, TriviaQA, equal rates) on which the paper's
ablations are averaged, and the evaluation mixtures of Table 1 (`summarization_mixture`,
`translation_mixture`, `qa_mixture`, `table1_mixture`: see `mixtures`). The lengths are the
paper's; `feature_lengths(name, overrides)` gives them with overrides, and
`TASK_FEATURE_LENGTHS` holds the defaults. Each task's sequence lengths come
from the caller (`task.get_dataset(sequence_length=...)`), as usual in seqio.

Text formats follow T5: "summarize: " + document for summarization, "translate English to German: "
+ English for WMT, "question: ... context: ..." for TriviaQA (the Wikipedia evidence pages, then the
web search results, concatenated; truncation to 2048 tokens keeps the beginning). TriviaQA targets
keep all answer aliases in an `answers` feature, which `metrics.trivia_qa_postprocess` hands to the
metric.

Configuration (re-register with `register_tasks(...)`; registering again replaces the tasks):
- vocabulary: `vocab.get_vocabulary()` (see `GQA_T5X_VOCAB`) unless one is passed;
- TFDS data directory: `data_dir` argument, else `$GQA_T5X_TFDS_DATA_DIR`, else TFDS's default;
- TFDS names and versions: `TFDS_NAMES`, overridable per task with `tfds_names`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import seqio
import tensorflow as tf

from gqa_t5x.data import metrics, mixtures, span_corruption, vocab

DATA_DIR_ENV_VAR = "GQA_T5X_TFDS_DATA_DIR"

C4_SPAN_CORRUPTION = "c4_span_corruption"
CNN_DAILYMAIL = "cnn_dailymail"
ARXIV = "arxiv"
PUBMED = "pubmed"
MEDIA_SUM = "media_sum"
MULTI_NEWS = "multi_news"
WMT14_ENDE = "wmt14_ende"
TRIVIA_QA = "trivia_qa"
ABLATION_MIXTURE = "ablation_mixture"

FINE_TUNING_TASKS = (CNN_DAILYMAIL, ARXIV, PUBMED, MEDIA_SUM, MULTI_NEWS, WMT14_ENDE, TRIVIA_QA)
TASKS = (C4_SPAN_CORRUPTION, *FINE_TUNING_TASKS)
ABLATION_TASKS = (CNN_DAILYMAIL, MULTI_NEWS, TRIVIA_QA)

# The versions shipped with tensorflow-datasets 4.9.
TFDS_NAMES: dict[str, str] = {
    C4_SPAN_CORRUPTION: "c4/en:3.1.0",
    CNN_DAILYMAIL: "cnn_dailymail:3.4.0",
    ARXIV: "scientific_papers/arxiv:1.1.1",
    PUBMED: "scientific_papers/pubmed:1.1.1",
    MEDIA_SUM: "media_sum:1.0.0",
    MULTI_NEWS: "multi_news:2.1.0",
    WMT14_ENDE: "wmt14_translate/de-en:1.0.0",
    TRIVIA_QA: "trivia_qa/rc:1.1.0",
}

# seqio split -> TFDS split. Stating them keeps seqio from reading split lists from TFDS metadata
# before any data is read; media_sum names its validation split "val".
_SPLITS: dict[str, dict[str, str]] = {
    name: {"train": "train", "validation": "validation", "test": "test"} for name in TFDS_NAMES
}
_SPLITS[C4_SPAN_CORRUPTION] = {"train": "train", "validation": "validation"}
_SPLITS[MEDIA_SUM] = {"train": "train", "validation": "val", "test": "test"}

TASK_FEATURE_LENGTHS: dict[str, dict[str, int]] = {
    C4_SPAN_CORRUPTION: {"inputs": 512, "targets": 114},
    CNN_DAILYMAIL: {"inputs": 512, "targets": 256},
    ARXIV: {"inputs": 2048, "targets": 512},
    PUBMED: {"inputs": 2048, "targets": 512},
    MEDIA_SUM: {"inputs": 2048, "targets": 512},
    MULTI_NEWS: {"inputs": 2048, "targets": 512},
    WMT14_ENDE: {"inputs": 512, "targets": 256},
    TRIVIA_QA: {"inputs": 2048, "targets": 32},
    ABLATION_MIXTURE: {"inputs": 2048, "targets": 512},
    # The evaluation mixtures: the longest of their tasks' lengths.
    "summarization_mixture": {"inputs": 2048, "targets": 512},
    "translation_mixture": {"inputs": 512, "targets": 256},
    "qa_mixture": {"inputs": 2048, "targets": 32},
    "table1_mixture": {"inputs": 2048, "targets": 512},
}

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0

SUMMARIZE_PREFIX = "summarize: "
TRANSLATE_PREFIX = "translate English to German: "


def feature_lengths(name: str, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
    """The paper's {"inputs": .., "targets": ..} for task or mixture `name`, with `overrides`.

    For `c4_span_corruption`, overriding only "inputs" derives "targets" with T5's span arithmetic
    (e.g. inputs 128 -> targets 29), since span corruption needs exactly that many.
    """
    if name not in TASK_FEATURE_LENGTHS:
        raise KeyError(
            f"feature_lengths: unknown task {name!r}; known: {sorted(TASK_FEATURE_LENGTHS)}"
        )
    lengths = dict(TASK_FEATURE_LENGTHS[name])
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(lengths)
    if unknown:
        raise KeyError(
            f"feature_lengths: unknown features {sorted(unknown)} for task {name!r}; "
            f"expected a subset of {sorted(lengths)}"
        )
    if name == C4_SPAN_CORRUPTION and "inputs" in overrides and "targets" not in overrides:
        overrides["targets"] = span_corruption.targets_length_for(
            overrides["inputs"], NOISE_DENSITY, MEAN_NOISE_SPAN_LENGTH
        )
    lengths.update(overrides)
    return lengths


def default_data_dir() -> str | None:
    """`$GQA_T5X_TFDS_DATA_DIR`, or None for TFDS's own default."""
    return os.environ.get(DATA_DIR_ENV_VAR) or None


# ---------------------------------------------------------------------------------------------
# Text preprocessors: TFDS examples -> {"inputs": str, "targets": str, ...}.


def _join(*parts: tf.Tensor) -> tf.Tensor:
    return tf.strings.join(list(parts))


@seqio.map_over_dataset
def _c4_text(x):
    # Pre-training reads the document only; inputs are made by span corruption.
    return {"targets": x["text"]}


def _summarize(document_key: str, summary_key: str):
    @seqio.map_over_dataset
    def fn(x):
        return {
            "inputs": _join(SUMMARIZE_PREFIX, x[document_key]),
            "targets": x[summary_key],
        }

    return fn


@seqio.map_over_dataset
def _media_sum_text(x):
    # "speaker: utterance" turns, one after another (speaker i says utterance i).
    num_turns = tf.minimum(tf.size(x["speaker"]), tf.size(x["utt"]))
    turns = tf.strings.join(
        [x["speaker"][:num_turns], x["utt"][:num_turns]], separator=": "
    )  # [turns]
    dialogue = tf.strings.reduce_join(turns, separator=" ")
    return {"inputs": _join(SUMMARIZE_PREFIX, dialogue), "targets": x["summary"]}


@seqio.map_over_dataset
def _wmt_text(x):
    return {"inputs": _join(TRANSLATE_PREFIX, x["en"]), "targets": x["de"]}


@seqio.map_over_dataset
def _trivia_qa_text(x):
    evidence = tf.concat(
        [x["entity_pages"]["wiki_context"], x["search_results"]["search_context"]], axis=0
    )  # [documents]
    context = tf.strings.reduce_join(evidence, separator=" ")
    answer = x["answer"]["value"]
    # Every alias counts for the metric; the value is the training target.
    answers = tf.concat([[answer], x["answer"]["normalized_aliases"]], axis=0)
    return {
        "inputs": tf.strings.join(["question: ", x["question"], " context: ", context]),
        "targets": answer,
        "answers": answers,
    }


# ---------------------------------------------------------------------------------------------
# Registration.


def _output_features(vocabulary: seqio.Vocabulary, inputs_required: bool = True):
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=inputs_required),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }


def _source(name: str, tfds_names: Mapping[str, str], data_dir: str | None):
    return seqio.TfdsDataSource(
        tfds_name=tfds_names[name], tfds_data_dir=data_dir, splits=_SPLITS[name]
    )


def _text_task_preprocessors(text_fn):
    return [
        text_fn,
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
    ]


def _add_task(name: str, **kwargs) -> None:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, **kwargs)


def register_tasks(
    vocabulary: seqio.Vocabulary | None = None,
    data_dir: str | None = None,
    tfds_names: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """(Re-)registers every task and the mixtures; replaces earlier registrations.

    Args:
      vocabulary: for inputs and targets; None means `vocab.get_vocabulary()` (read lazily).
      data_dir: TFDS data directory; None means `default_data_dir()`.
      tfds_names: per-task TFDS name overrides ("name/config:version"), e.g. for a local copy.

    Returns:
      the registered task names, then the mixture names.
    """
    vocabulary = vocabulary if vocabulary is not None else vocab.get_vocabulary()
    data_dir = data_dir if data_dir is not None else default_data_dir()
    unknown = set(tfds_names or {}) - set(TFDS_NAMES)
    if unknown:
        raise KeyError(
            f"register_tasks: tfds_names has unknown tasks {sorted(unknown)}; "
            f"known: {sorted(TFDS_NAMES)}"
        )
    names = {**TFDS_NAMES, **(tfds_names or {})}
    source = functools.partial(_source, tfds_names=names, data_dir=data_dir)

    # Mixtures hold their tasks; drop the mixtures before replacing them.
    for mixture in (ABLATION_MIXTURE, *mixtures.paper_mixtures()):
        if mixture in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove(mixture)

    _add_task(
        C4_SPAN_CORRUPTION,
        source=source(C4_SPAN_CORRUPTION),
        preprocessors=[
            _c4_text,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            span_corruption.span_corruption_preprocessor(MEAN_NOISE_SPAN_LENGTH, NOISE_DENSITY),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=_output_features(vocabulary, inputs_required=False),
        metric_fns=[],
    )
    summarization = {
        CNN_DAILYMAIL: _summarize("article", "highlights"),
        ARXIV: _summarize("article", "abstract"),
        PUBMED: _summarize("article", "abstract"),
        MEDIA_SUM: _media_sum_text,
        MULTI_NEWS: _summarize("document", "summary"),
    }
    for name, text_fn in summarization.items():
        _add_task(
            name,
            source=source(name),
            preprocessors=_text_task_preprocessors(text_fn),
            output_features=_output_features(vocabulary),
            metric_fns=[metrics.rouge],
        )
    _add_task(
        WMT14_ENDE,
        source=source(WMT14_ENDE),
        preprocessors=_text_task_preprocessors(_wmt_text),
        output_features=_output_features(vocabulary),
        metric_fns=[metrics.bleu],
    )
    _add_task(
        TRIVIA_QA,
        source=source(TRIVIA_QA),
        preprocessors=_text_task_preprocessors(_trivia_qa_text),
        output_features=_output_features(vocabulary),
        postprocess_fn=metrics.trivia_qa_postprocess,
        metric_fns=[metrics.trivia_qa],
    )
    seqio.MixtureRegistry.add(ABLATION_MIXTURE, list(ABLATION_TASKS), default_rate=1.0)
    for mixture, members in mixtures.paper_mixtures().items():
        seqio.MixtureRegistry.add(mixture, list(members), default_rate=1.0)
    return (*TASKS, ABLATION_MIXTURE, *mixtures.paper_mixtures())


register_tasks()
