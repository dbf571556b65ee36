"""The evaluation mixtures Table 1 is made of, and its average.

The paper fine-tunes and evaluates on five summarization datasets (ROUGE-1), WMT14 En-De (BLEU)
and TriviaQA (F1); Table 1's "Average" is the plain mean of those seven numbers. This module names
the mixtures (registered by `tasks.register_tasks` and `synthetic.register_synthetic_tasks`, so
that re-registering a task also refreshes the mixtures holding it) and computes the average from
an evaluation's "<task>/<metric>" numbers:

| mixture                            | tasks                                          |
| ---------------------------------- | ---------------------------------------------- |
| `summarization_mixture`            | cnn_dailymail, arxiv, pubmed, media_sum, multi_news |
| `translation_mixture`              | wmt14_ende                                     |
| `qa_mixture`                       | trivia_qa                                      |
| `table1_mixture`                   | all seven                                      |
| `synthetic_summarization_mixture`  | synthetic_summarize                            |
| `synthetic_translation_mixture`    | synthetic_translate                            |
| `synthetic_qa_mixture`             | synthetic_qa                                   |
| `synthetic_table1_mixture`         | the three synthetic tasks (their union)        |

Every mixture weighs its tasks equally (the paper states no rates). Pure: no seqio here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# family -> (the metric Table 1 reports, the paper's tasks of that family)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "summarization": ("rouge1", ("cnn_dailymail", "arxiv", "pubmed", "media_sum", "multi_news")),
    "translation": ("bleu", ("wmt14_ende",)),
    "qa": ("f1", ("trivia_qa",)),
}
# The synthetic suite's analog of each family.
SYNTHETIC_FAMILIES = {"summarization": "summarize", "translation": "translate", "qa": "qa"}


def paper_mixtures() -> dict[str, tuple[str, ...]]:
    """{mixture name: its tasks} of the paper's datasets."""
    out = {f"{family}_mixture": names for family, (_, names) in FAMILIES.items()}
    out["table1_mixture"] = tuple(n for _, names in FAMILIES.values() for n in names)
    return out


def synthetic_mixtures(prefix: str = "synthetic") -> dict[str, tuple[str, ...]]:
    """{mixture name: its tasks} of the synthetic suite registered under `prefix`."""
    out = {f"{prefix}_{family}_mixture": (f"{prefix}_{task}",)
           for family, task in SYNTHETIC_FAMILIES.items()}
    out[f"{prefix}_table1_mixture"] = tuple(f"{prefix}_{t}" for t in SYNTHETIC_FAMILIES.values())
    return out


def primary_metric(task: str) -> str:
    """The metric Table 1 reports for `task`: "rouge1", "bleu" or "f1"."""
    for family, (metric, names) in FAMILIES.items():
        if task in names or task.endswith("_" + SYNTHETIC_FAMILIES[family]):
            return metric
    raise KeyError(f"task {task!r} has no Table 1 metric; it is none of "
                   f"{[n for _, names in FAMILIES.values() for n in names]} and does not end in "
                   f"{['_' + t for t in SYNTHETIC_FAMILIES.values()]}")


def table1_scores(tasks: tuple[str, ...] | list[str], metrics: Mapping[str, float]
                  ) -> dict[str, float]:
    """{task: its Table 1 metric, ..., "average": their mean} from an evaluation's
    {"<task>/<metric>": value}. A task missing from `metrics` is an error naming it."""
    scores = {}
    for task in tasks:
        key = f"{task}/{primary_metric(task)}"
        if key not in metrics:
            raise KeyError(f"evaluation has no {key!r}; it has {sorted(metrics)}")
        scores[task] = float(metrics[key])
    scores["average"] = math.fsum(scores.values()) / len(tasks)
    return scores


def mixture_tasks(name: str) -> tuple[str, ...] | None:
    """The tasks of mixture `name` above (a synthetic one under any prefix), or None."""
    for suffix in ("_table1_mixture", *(f"_{f}_mixture" for f in FAMILIES)):
        if name.endswith(suffix) and name not in paper_mixtures():
            return synthetic_mixtures(name[:-len(suffix)]).get(name)
    return paper_mixtures().get(name)


def table1_average(name: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """{"<name>/average": Table 1's average} when `name` is one of the mixtures above and the
    evaluation covers its tasks; {} otherwise."""
    tasks = mixture_tasks(name)
    if tasks is None or not all(f"{t}/{primary_metric(t)}" in metrics for t in tasks):
        return {}
    return {f"{name}/average": table1_scores(tasks, metrics)["average"]}


def table1_line(name: str, metrics: Mapping[str, float]) -> str:
    """"Table 1 (<name>): <task> <metric> <value>, ...; average <value>"."""
    scores = table1_scores(mixture_tasks(name) or (), metrics)
    row = ", ".join(f"{t} {primary_metric(t)} {v:.2f}" for t, v in scores.items()
                    if t != "average")
    return f"Table 1 ({name}): {row}; average {scores['average']:.2f}"
