"""The paper's metrics, with T5's conventions, as seqio metric functions.

Every metric has seqio's signature `metric(targets, predictions) -> {name: value}` and reports
percentages (x100):

- `rouge`: ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measure (rouge-score, no stemming, as T5), averaged
  with rouge-score's `BootstrapAggregator` and reported at its mid value (fixed seed, so repeated
  calls agree). ROUGE-Lsum scores summary-level LCS over sentences; rouge-score splits them on
  newlines, so texts are first split with `split_sentences` (a regular expression, below) and
  joined with newlines. T5 used a plain `" . "` -> `" .\\n"` replacement and Hugging Face
  uses nltk's punkt model, whose data cannot be assumed to be installed; the regular expression
  agrees with both on ordinary prose.
- `bleu`: corpus BLEU from sacrebleu with `tokenize="intl"`, `smooth_method="exp"`, case kept.
- `trivia_qa`: exact match and token F1 against every answer alias, best alias per example, mean
  over examples; answers are normalized as the official TriviaQA script (and T5) do: lowercase,
  punctuation to spaces, articles a/an/the dropped, whitespace collapsed.

`trivia_qa_postprocess` is the task's postprocessor: it replaces a target string by the example's
list of answer aliases, which is what `trivia_qa` expects.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer, scoring

ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")
BOOTSTRAP_SEED = 0

# A sentence ends at ., ! or ? (repeated, possibly followed by closing quotes or brackets) that is
# followed by whitespace. Known limits: abbreviations ("Dr. Smith", "U.S. Army") split too.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Splits text into sentences with a regular expression (no nltk data needed).

    Existing line breaks are sentence breaks; within a line, a sentence ends after `.`, `!` or `?`
    (with any closing quotes or brackets) followed by whitespace. Empty pieces are dropped.
    """
    sentences = []
    for line in text.splitlines():
        pos = 0
        for m in _SENTENCE_END.finditer(line):
            # Keep closing quotes/brackets with the sentence they close.
            end = m.start() + len(m.group(0).rstrip())
            sentences.append(line[pos:end])
            pos = m.end()
        sentences.append(line[pos:])
    return [s.strip() for s in sentences if s.strip()]


def prepare_summary(text: str) -> str:
    """One sentence per line, the form rouge-score's `rougeLsum` needs."""
    return "\n".join(split_sentences(text))


def rouge(
    targets: Sequence[str],
    predictions: Sequence[str],
    score_keys: Sequence[str] = ROUGE_KEYS,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
    """ROUGE F-measure x100 at the bootstrap mid value, T5's convention.

    Args:
      targets: reference summaries, one per example.
      predictions: model summaries, one per example.
      score_keys: rouge-score types, e.g. ("rouge1", "rouge2", "rougeLsum").
      seed: numpy seed for the bootstrap resampling (the global numpy state is restored after).

    Returns:
      {key: F-measure in [0, 100]} for each of `score_keys`.
    """
    _check_lengths("rouge", targets, predictions)
    if "rougeLsum" in score_keys:
        targets = [prepare_summary(t) for t in targets]
        predictions = [prepare_summary(p) for p in predictions]
    scorer = rouge_scorer.RougeScorer(rouge_types=list(score_keys))
    aggregator = scoring.BootstrapAggregator()
    for target, prediction in zip(targets, predictions):
        aggregator.add_scores(scorer.score(target=target, prediction=prediction))
    # BootstrapAggregator draws from numpy's global generator; seed it and put it back after.
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {key: float(result[key].mid.fmeasure * 100) for key in score_keys}


def bleu(
    targets: Sequence[str] | Sequence[Sequence[str]],
    predictions: Sequence[str],
    tokenize: str = "intl",
) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, exp smoothing), T5's convention.

    Args:
      targets: one reference string per example, or per example a list of references (every
        example must then have the same number).
      predictions: one string per example.
      tokenize: sacrebleu tokenizer name.

    Returns:
      {"bleu": corpus BLEU in [0, 100]}.
    """
    _check_lengths("bleu", targets, predictions)
    if targets and not isinstance(targets[0], str):
        counts = {len(t) for t in targets}
        if len(counts) != 1:
            raise ValueError(
                f"bleu: every example needs the same number of references, got counts {counts}"
            )
        # sacrebleu wants one stream per reference position.
        references = [list(stream) for stream in zip(*targets)]
    else:
        references = [list(targets)]
    score = sacrebleu.corpus_bleu(
        list(predictions),
        references,
        smooth_method="exp",
        smooth_value=None,
        force=False,
        lowercase=False,
        tokenize=tokenize,
        use_effective_order=False,
    )
    return {"bleu": float(score.score)}


# The official TriviaQA evaluation replaces these (and underscores) with spaces.
_TRIVIA_QA_PUNCTUATION = frozenset(string.punctuation + "\u2018\u2019\u00b4`_")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """TriviaQA answer normalization: lowercase, punctuation -> space, drop a/an/the, squeeze."""
    text = text.lower()
    text = "".join(" " if ch in _TRIVIA_QA_PUNCTUATION else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact_match(target: str, prediction: str) -> float:
    return float(target == prediction)


def _token_f1(target: str, prediction: str) -> float:
    prediction_tokens = prediction.split()
    target_tokens = target.split()
    common = collections.Counter(prediction_tokens) & collections.Counter(target_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def trivia_qa(
    targets: Sequence[Sequence[str] | str], predictions: Sequence[str]
) -> dict[str, float]:
    """TriviaQA exact match and F1 x100: best answer alias per example, mean over examples.

    Args:
      targets: per example, the list of answer aliases (a bare string counts as one alias).
      predictions: one answer string per example.

    Returns:
      {"f1": ..., "em": ...}, each in [0, 100].
    """
    _check_lengths("trivia_qa", targets, predictions)
    if not predictions:
        raise ValueError("trivia_qa: no examples to score")
    f1s, ems = [], []
    for i, (aliases, prediction) in enumerate(zip(targets, predictions)):
        if isinstance(aliases, str):
            aliases = [aliases]
        if not len(aliases):
            raise ValueError(f"trivia_qa: example {i} has no answer aliases")
        aliases = [normalize_answer(a) for a in aliases]
        prediction = normalize_answer(prediction)
        f1s.append(max(_token_f1(a, prediction) for a in aliases))
        ems.append(max(_exact_match(a, prediction) for a in aliases))
    return {"f1": 100 * float(np.mean(f1s)), "em": 100 * float(np.mean(ems))}


def trivia_qa_postprocess(
    output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> Any:
    """seqio postprocessor for TriviaQA: targets become the example's list of answer aliases.

    Predictions (and targets of examples without an "answers" feature) pass through unchanged,
    decoded from bytes if need be.
    """
    if is_target and example is not None and "answers" in example:
        return [_to_str(a) for a in np.asarray(example["answers"]).reshape(-1)]
    return _to_str(output)


def _to_str(x: Any) -> Any:
    return x.decode("utf-8") if isinstance(x, bytes) else x


def _check_lengths(name: str, targets: Sequence[Any], predictions: Sequence[Any]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(
            f"{name}: {len(targets)} targets but {len(predictions)} predictions; "
            "they must pair up one to one"
        )
