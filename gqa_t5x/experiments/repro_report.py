"""The report of a `reproduce` run: results.json, REPORT.md and the figures, from stage results.

Every compared number is a mean over fine-tuning seeds with its sample standard deviation. A
comparison of two cells is decided when their difference exceeds twice its standard error
(sqrt(s1^2/n1 + s2^2/n2)); with fewer than two seeds per cell nothing is decided. Each of the
paper's claims gets one verdict, supported / contradicted / undecided, with the numbers behind it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gqa_t5x.data import mixtures

# Table 1 of the paper (T_infer in s; ROUGE-1, BLEU, F1), for the side-by-side table.
PAPER_TABLE1 = {
    "columns": ["T_infer", "Avg", "CNN", "arXiv", "PubMed", "MediaSum", "MultiNews", "WMT",
                "TriviaQA"],
    "rows": {"MHA-Large": [0.37, 46.0, 42.9, 44.6, 46.2, 35.5, 46.6, 27.7, 78.2],
             "MHA-XXL": [1.51, 47.2, 43.8, 45.6, 47.5, 36.4, 46.9, 28.4, 81.9],
             "MQA-XXL": [0.24, 46.6, 43.0, 45.0, 46.9, 36.1, 46.5, 28.5, 81.3],
             "GQA-8-XXL": [0.28, 47.1, 43.5, 45.4, 47.7, 36.3, 47.2, 28.4, 81.6]},
}
FIGURES = {"figure3": "figure3_quality_vs_time.png",
           "figure4": "figure4_conversion_methods.png",
           "figure5": "figure5_uptraining.png",
           "figure6": "figure6_time_vs_groups.png",
           "beyond": "beyond_aligned_vs_mean.png"}
CLAIMS = ("mean > first > random", "GQA close to MHA and above MQA",
          "uptraining helps, with diminishing returns", "GQA's time per sample near MQA's",
          "aligned beats mean (beyond the paper)")


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # None with one seed
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        v = np.asarray(values, np.float64)
        return Stat(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v))

    def __str__(self):
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")


def compare(a: Stat, b: Stat) -> int:
    """+1 if a > b beyond twice the standard error of the difference, -1 if a < b, else 0."""
    if a.std is None or b.std is None:
        return 0
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
    diff = a.mean - b.mean
    if se == 0:
        return int(np.sign(diff))
    return 1 if diff > 2 * se else -1 if diff < -2 * se else 0


# ---- collecting ---------------------------------------------------------------------------------


def cell_summaries(cells: Sequence[Mapping], results: Mapping[str, dict], mixture: str
                   ) -> dict[str, dict[str, Any]]:
    """{cell name: {"cell", "seeds": [metrics], "stats": {quantity: Stat}}}. Quantities: each
    task's Table 1 metric, "average", each task's held-out loss and "loss" (their mean)."""
    tasks = mixtures.mixture_tasks(mixture)
    out = {}
    for cell in cells:
        seeds = [results[name]["metrics"] for name in cell["stages"]]
        values: dict[str, list[float]] = {}
        for m in seeds:
            scores = mixtures.table1_scores(tasks, m)
            losses = {f"{t}/loss": m[f"{t}/loss"] for t in tasks}
            row = {**scores, **losses, "loss": float(np.mean(list(losses.values())))}
            for k, v in row.items():
                values.setdefault(k, []).append(v)
        out[cell["name"]] = {"cell": {k: v for k, v in cell.items() if k != "stages"},
                             "seeds": seeds, "stats": {k: Stat.of(v) for k, v in values.items()}}
    return out


def time_rows(results: Mapping[str, dict]) -> dict[str, dict[int, float]]:
    """{"small" | "big" | "config_b": {kv heads: seconds per sample}}."""
    return {name.split("/", 1)[1]: {int(k): r["sample_s"] for k, r in res["rows"].items()}
            for name, res in results.items() if name.startswith("time/")}


# ---- verdicts -----------------------------------------------------------------------------------


def _get(summary, name, q="average"):
    cell = summary.get(name)
    return cell["stats"][q] if cell else None


def _both(summary, name):
    """"<average> (loss <loss>)" of a cell, for the evidence."""
    return f"{_get(summary, name)} (loss {_get(summary, name, 'loss')})"


def _neg(stat: Stat) -> Stat:
    return Stat(-stat.mean, stat.std, stat.n)


def _claim_verdicts(summary: Mapping, grid: Mapping, q: str) -> dict[str, str]:
    """{claim: verdict} of the quality claims on quantity `q`, higher better ("average", or
    "neg_loss": the held-out loss negated)."""
    g = grid["grid"]
    a1, gk = g["table1_alpha"], g["gqa_kv_heads"]
    out = {}
    # 1. mean > first > random
    ms = {m: _get(summary, f"mqa_{m}_a{a1:g}", q) for m in ("mean", "first", "random")}
    c = ([compare(ms["mean"], ms["first"]), compare(ms["first"], ms["random"])]
         if all(ms.values()) else [0])
    out[CLAIMS[0]] = ("supported" if c == [1, 1] else "contradicted" if -1 in c
                      else "undecided")
    # 2. GQA close to MHA and above MQA
    h, gq, m = (_get(summary, "mha_big", q), _get(summary, f"gqa{gk}_mean_a{a1:g}", q),
                _get(summary, f"mqa_mean_a{a1:g}", q))
    above, below_mha = compare(gq, m), compare(h, gq)
    close = below_mha != 1 or (h.mean - gq.mean) < (h.mean - m.mean) / 2
    out[CLAIMS[1]] = (
        "supported" if above == 1 and close else "contradicted" if above == -1 or (
            below_mha == 1 and h.mean - gq.mean >= h.mean - m.mean) else "undecided")
    # 3. uptraining helps, with diminishing returns
    signs, diminishing = [], []
    alphas = sorted(set(g["alphas"]) | {a1})
    for label in ("mqa", f"gqa{gk}"):
        s = [_get(summary, f"{label}_mean_a{a:g}", q) for a in alphas]
        if len(s) < 2:  # one uptraining fraction: nothing to compare
            signs.append(0)
            continue
        signs.append(compare(s[1], s[0]))
        if len(s) >= 3:
            diminishing.append(s[2].mean - s[1].mean < s[1].mean - s[0].mean)
    out[CLAIMS[2]] = ("contradicted" if -1 in signs else "supported" if all(
        x == 1 for x in signs) and diminishing and all(diminishing) else "undecided")
    # 5. aligned vs mean
    signs = []
    for name, cell in summary.items():
        method = cell["cell"]["method"] or ""
        mean = _get(summary, name.replace(method, "mean", 1), q)
        if method.startswith("aligned") and mean is not None:
            signs.append(compare(cell["stats"][q], mean))
    out[CLAIMS[4]] = ("undecided" if not signs or (1 in signs and -1 in signs) else
                      "supported" if 1 in signs else "contradicted" if -1 in signs
                      else "undecided")
    return out


def _evidence(summary: Mapping, times: Mapping, grid: Mapping) -> dict[str, str]:
    g = grid["grid"]
    a1, gk = g["table1_alpha"], g["gqa_kv_heads"]
    out = {CLAIMS[0]: f"MQA at alpha {a1:g}: " + ", ".join(
        f"{m} {_both(summary, f'mqa_{m}_a{a1:g}')}" for m in ("mean", "first", "random")),
        CLAIMS[1]: f"at alpha {a1:g}: MHA-big {_both(summary, 'mha_big')}, GQA-{gk} "
        f"{_both(summary, f'gqa{gk}_mean_a{a1:g}')}, MQA {_both(summary, f'mqa_mean_a{a1:g}')}"}
    alphas = sorted(set(g["alphas"]) | {a1})
    out[CLAIMS[2]] = "; ".join(f"{label}: " + ", ".join(
        f"alpha {a:g} {_both(summary, f'{label}_mean_a{a:g}')}" for a in alphas)
        for label in ("mqa", f"gqa{gk}"))
    parts = []
    for shape, kv, t1, tg, tn in _time_points(times, grid):
        t1, tg, tn = t1 * 1e3, tg * 1e3, tn * 1e3
        share = (f" (GQA's share of the MHA-MQA gap {(tg - t1) / (tn - t1):.2f})"
                 if tn > t1 * 1.1 else ": MHA is not 10% slower than MQA")
        parts.append(f"{shape}: MQA {t1:.2f} ms, GQA-{kv} {tg:.2f} ms, MHA {tn:.2f} ms per "
                     f"sample{share}")
    out[CLAIMS[3]] = "; ".join(parts) + " (one timing per shape on a shared machine: noisy)"
    pairs = [(name, name.replace(c["cell"]["method"], "mean", 1)) for name, c in summary.items()
             if (c["cell"]["method"] or "").startswith("aligned")
             and name.replace(c["cell"]["method"], "mean", 1) in summary]
    parts = [f"{a} {_both(summary, a)} vs mean {_both(summary, m)}" for a, m in pairs]
    if pairs:
        d_avg = [_get(summary, a).mean - _get(summary, m).mean for a, m in pairs]
        d_loss = [_get(summary, a, "loss").mean - _get(summary, m, "loss").mean
                  for a, m in pairs]
        parts.insert(0, f"by how much: aligned minus mean over the {len(pairs)} matched cells, "
                        f"average {np.mean(d_avg):+.2f} points (from {min(d_avg):+.2f} to "
                        f"{max(d_avg):+.2f}), held-out loss {np.mean(d_loss):+.3f} (from "
                        f"{min(d_loss):+.3f} to {max(d_loss):+.3f})")
    out[CLAIMS[4]] = "; ".join(parts) or "no aligned cells ran (method unavailable)"
    return out


def _time_points(times: Mapping, grid: Mapping):
    """(shape, GQA's kv heads, MQA's, GQA's and MHA's seconds per sample) of each timed shape:
    the big model at the grid's GQA-G, config B at the same share of its heads (at least 2)."""
    gk = grid["grid"]["gqa_kv_heads"]
    for shape in ("big", "config_b"):
        rows = times.get(shape)
        if not rows:
            continue
        n = max(rows)
        kv = gk if shape == "big" else max(2, n * gk // grid["models"]["big"]["num_heads"])
        if kv in rows and 1 in rows:
            yield shape, kv, rows[1], rows[kv], rows[n]


def _time_verdict(times: Mapping, grid: Mapping) -> str:
    fracs = [(tg - t1) / (tn - t1) for _, _, t1, tg, tn in _time_points(times, grid)
             if tn > t1 * 1.1]
    return ("supported" if fracs and all(f < 0.5 for f in fracs) else
            "contradicted" if fracs and all(f >= 0.5 for f in fracs) else "undecided")


def verdicts(summary: Mapping, times: Mapping, grid: Mapping) -> list[dict[str, str]]:
    """[{"claim", "verdict", "loss_verdict", "evidence"}] for CLAIMS: "verdict" from Table 1's
    average, "loss_verdict" from the held-out loss (lower is better), both over seeds; the
    timing claim from the time per sample (GQA within half of the MHA-MQA gap of MQA)."""
    summary = {n: dict(c, stats=dict(c["stats"], neg_loss=_neg(c["stats"]["loss"])))
               for n, c in summary.items()}
    by_metric = _claim_verdicts(summary, grid, "average")
    by_loss = _claim_verdicts(summary, grid, "neg_loss")
    evidence = _evidence(summary, times, grid)
    time_verdict = _time_verdict(times, grid)
    return [{"claim": c, "verdict": by_metric.get(c, time_verdict),
             "loss_verdict": by_loss.get(c, time_verdict), "evidence": evidence[c]}
            for c in CLAIMS]


# ---- figures ------------------------------------------------------------------------------------


def _errorbar(ax, xs, stats, **kw):
    ax.errorbar(xs, [s.mean for s in stats], yerr=[s.std or 0 for s in stats], capsize=3,
                marker="o", **kw)


def plot_figures(summary: Mapping, times: Mapping, grid: Mapping, out: str) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    g = grid["grid"]
    a1, gk = g["table1_alpha"], g["gqa_kv_heads"]
    n_big, n_small = grid["models"]["big"]["num_heads"], grid["models"]["small"]["num_heads"]
    written = []

    def save(fig, key, title):
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out, FIGURES[key])
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(FIGURES[key])

    # Figure 3: average against time per sample
    fig, ax = plt.subplots(figsize=(5, 4))
    points = [("MHA-small", "mha_small", times.get("small", {}).get(n_small)),
              ("MHA-big", "mha_big", times.get("big", {}).get(n_big)),
              ("MQA-big", f"mqa_mean_a{a1:g}", times.get("big", {}).get(1)),
              (f"GQA-{gk}-big", f"gqa{gk}_mean_a{a1:g}", times.get("big", {}).get(gk))]
    for label, name, t in points:
        s = _get(summary, name)
        if s is not None and t is not None:
            ax.errorbar([t * 1e3], [s.mean], yerr=[s.std or 0], marker="o", capsize=3,
                        label=label)
    ax.set_xlabel("time per sample (ms)")
    ax.set_ylabel("average score (Table 1 metrics)")
    ax.legend()
    save(fig, "figure3", f"Figure 3 analog: quality vs time (alpha {a1:g})")
    # Figure 4: conversion methods
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    methods = [m for m in g["ablation_methods"] if _get(summary, f"mqa_{m}_a{a1:g}")]
    for ax, q, label in ((axes[0], "average", "average score"),
                         (axes[1], "loss", "held-out loss")):
        s = [_get(summary, f"mqa_{m}_a{a1:g}", q) for m in methods]
        ax.bar(methods, [x.mean for x in s], yerr=[x.std or 0 for x in s], capsize=4)
        ax.set_ylabel(label)
    save(fig, "figure4", f"Figure 4 analog: big -> MQA by method (alpha {a1:g})")
    # Figure 5: uptraining fraction
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    alphas = sorted(set(g["alphas"]) | {a1})
    for ax, q, label in ((axes[0], "average", "average score"),
                         (axes[1], "loss", "held-out loss")):
        for kv_label in ("mqa", f"gqa{gk}"):
            s = [_get(summary, f"{kv_label}_mean_a{a:g}", q) for a in alphas]
            _errorbar(ax, alphas, s, label=kv_label.upper())
        h = _get(summary, "mha_big", q)
        ax.axhline(h.mean, color="gray", linestyle="--", label="MHA-big")
        ax.set_xlabel("uptraining fraction alpha")
        ax.set_ylabel(label)
        ax.legend()
    save(fig, "figure5", "Figure 5 analog: uptraining (mean pooling)")
    # Figure 6: time against groups
    fig, ax = plt.subplots(figsize=(5, 4))
    for shape in ("big", "config_b"):
        rows = times.get(shape)
        if rows:
            ks = sorted(rows)
            ax.plot(ks, [rows[k] * 1e3 for k in ks], marker="o", label=shape)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("kv heads (groups)")
    ax.set_ylabel("time per sample (ms)")
    ax.legend()
    save(fig, "figure6", "Figure 6 analog: time per sample vs groups")
    # Beyond the paper: aligned vs mean
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [n for n, c in summary.items() if c["cell"]["method"] in
             ("mean", *g.get("aligned_methods", [])) and c["cell"]["alpha"] in
             g["aligned_alphas"]]
    for ax, q, label in ((axes[0], "average", "average score"),
                         (axes[1], "loss", "held-out loss")):
        s = [summary[n]["stats"][q] for n in names]
        ax.bar(range(len(names)), [x.mean for x in s], yerr=[x.std or 0 for x in s], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
    save(fig, "beyond", "Beyond the paper: aligned vs mean pooling")
    return written


# ---- REPORT.md and results.json -----------------------------------------------------------------


def _table1_rows(summary, times, grid):
    g, tasks = grid["grid"], mixtures.mixture_tasks(grid["finetune"]["mixture"])
    a1, gk = g["table1_alpha"], g["gqa_kv_heads"]
    n_big, n_small = grid["models"]["big"]["num_heads"], grid["models"]["small"]["num_heads"]
    spec = [("MHA-small", "mha_small", "small", n_small), ("MHA-big", "mha_big", "big", n_big),
            ("MQA-big", f"mqa_mean_a{a1:g}", "big", 1),
            (f"GQA-{gk}-big", f"gqa{gk}_mean_a{a1:g}", "big", gk)]
    lines = ["| model | T_infer (ms) | Avg | " + " | ".join(
        f"{t} {mixtures.primary_metric(t)} (loss)" for t in tasks) + " | held-out loss |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
    for label, name, shape, kv in spec:
        st = summary[name]["stats"]
        t = times.get(shape, {}).get(kv)
        per_task = " | ".join(f"{st[task]} ({st[task + '/loss'].mean:.3f})" for task in tasks)
        lines.append(f"| {label} | {'-' if t is None else f'{t * 1e3:.2f}'} | {st['average']} | "
                     f"{per_task} | {st['loss'].mean:.3f} |")
    return lines


def _quality_table(results):
    """Before uptraining: each conversion's cross-entropy, KL from the source and accuracy."""
    quality = {name.split("/", 1)[1]: r["metrics"] for name, r in results.items()
               if name.startswith("quality/")}
    if not quality:
        return []
    labels = list(quality)
    # The source, then the grid's order (a cached stage's metrics come back with sorted keys).
    variants = ["source", *results[f"quality/{labels[0]}"]["inputs"]["variants"]]
    lines = ["| conversion | " + " | ".join(f"{k} cross-entropy | {k} KL from MHA | "
                                           f"{k} token accuracy" for k in labels) + " |",
             "| --- |" + " ---: | ---: | ---: |" * len(labels)]
    for variant in variants:
        lines.append(f"| {variant} | " + " | ".join(
            f"{quality[k][variant]['cross_entropy']:.3f} | "
            f"{quality[k][variant]['kl_from_source']:.4f} | "
            f"{quality[k][variant]['token_accuracy']:.3f}" for k in labels) + " |")
    return lines


# Before uptraining each conversion is one measurement on the same validation tokens (one pretrained
# model, no seeds): a difference counts when it exceeds this share of the larger KL.
CONVERSION_MARGIN = 0.05


def conversion_verdicts(quality: Mapping[str, Mapping[str, Mapping[str, float]]]
                        ) -> list[dict[str, str]]:
    """Verdicts on the two conversion claims right after conversion (alpha 0), from each
    target's KL divergence from the MHA model (lower keeps more): [{"claim", "verdict",
    "evidence"}]. `quality` is {target: {variant: {"kl_from_source": ...}}}."""

    def order(kl: Sequence[float]) -> int:  # 1: strictly increasing by the margin, -1: reversed
        steps = [(b - a) / max(a, b) for a, b in zip(kl, kl[1:])]
        return (1 if all(x > CONVERSION_MARGIN for x in steps) else
                -1 if all(x < -CONVERSION_MARGIN for x in steps) else 0)

    out = []
    for claim, variants in ((CLAIMS[0], ("mean", "first", "random")),
                            (CLAIMS[4], ("aligned", "mean")),
                            (CLAIMS[4] + ", similarity groups", ("aligned/similarity", "mean"))):
        signs, parts = [], []
        for target, q in quality.items():
            if all(v in q for v in variants):
                kl = [q[v]["kl_from_source"] for v in variants]
                signs.append(order(kl))
                parts.append(f"{target}: " + ", ".join(
                    f"{v} {k:.3f}" for v, k in zip(variants, kl)))
        if not signs:
            continue
        verdict = ("supported" if all(x == 1 for x in signs) else
                   "contradicted" if all(x == -1 for x in signs) else "undecided")
        out.append({"claim": claim, "verdict": verdict,
                    "evidence": "KL from MHA, " + "; ".join(parts)})
    return out


def _paper_table1():
    cols = PAPER_TABLE1["columns"]
    lines = ["| model | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, row in PAPER_TABLE1["rows"].items():
        lines.append(f"| {name} | {row[0]:.2f} | " + " | ".join(f"{v:.1f}" for v in row[1:])
                     + " |")
    return lines


def _cells_table(summary):
    lines = ["| cell | kv heads | method | alpha | seeds | average | held-out loss |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for name, c in summary.items():
        cell, st = c["cell"], c["stats"]
        alpha = "-" if cell["alpha"] is None else f"{cell['alpha']:g}"
        lines.append(f"| {name} | {cell['kv'] or 'all'} | {cell['method'] or '-'} | {alpha} | "
                     f"{st['average'].n} | {st['average']} | {st['loss']} |")
    return lines


def write_report(out: str, grid: Mapping, cells: Sequence[Mapping], results: Mapping[str, dict],
                 notes: Sequence[str], wall_seconds: float, stages_run: int | None = None
                 ) -> dict[str, Any]:
    """Writes results.json, REPORT.md and the PNG figures into `out`; returns results.json's
    content. `stages_run`: how many of the stages this invocation ran (the rest were cached)."""
    import jax  # noqa: PLC0415

    import gqa_t5x  # noqa: PLC0415

    summary = cell_summaries(cells, results, grid["finetune"]["mixture"])
    times = time_rows(results)
    verdict_list = verdicts(summary, times, grid)
    figures = plot_figures(summary, times, grid, out)
    quick = grid["variant"] == "quick"
    data = {
        "variant": grid["variant"], "grid": grid, "notes": list(notes),
        "versions": {"gqa_t5x": gqa_t5x.__version__, "jax": jax.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "wall_seconds": wall_seconds,
        "stages_run": len(results) if stages_run is None else stages_run,
        "cells": {n: {"cell": c["cell"], "seeds": c["seeds"],
                      "stats": {k: dataclasses.asdict(v) for k, v in c["stats"].items()}}
                  for n, c in summary.items()},
        "time_per_sample_s": {k: {str(kv): v for kv, v in rows.items()}
                              for k, rows in times.items()},
        "conversion_quality": {n.split("/", 1)[1]: r["metrics"] for n, r in results.items()
                               if n.startswith("quality/")},
        "stages": {n: {"key": r["key"], "seconds": r["seconds"]} for n, r in results.items()},
        "verdicts": verdict_list, "figures": figures,
        "conversion_verdicts": conversion_verdicts(
            {n.split("/", 1)[1]: r["metrics"] for n, r in results.items()
             if n.startswith("quality/")}),
    }
    _write_atomic(os.path.join(out, "results.json"), json.dumps(data, indent=1, sort_keys=True))
    ft, gk = grid["finetune"], grid["grid"]["gqa_kv_heads"]
    n_big = grid["models"]["big"]["num_heads"]
    md = [f"# GQA reproduction at {grid['scale']} scale ({grid['variant']} grid)", ""]
    if quick:
        md += ["**`--quick`: this run checks the machinery only; its numbers mean nothing.**", ""]
    pre = grid["pretrain"]
    ran = len(results) if stages_run is None else stages_run
    cached = f" ({len(results) - ran} were cached)" if ran < len(results) else ""
    md += [f"Pretrained on `{pre['task']}` ({pre['steps']} steps, batch {pre['batch_size']}), "
           "and uptrained on it after conversion for alpha x those steps. "
           f"Fine-tuned on `{ft['mixture']}` ({ft['steps']} steps, batch {ft['batch_size']}, "
           f"constant rate {ft['learning_rate']}, dropout {ft['dropout_rate']}), "
           f"{ft['seeds']} seed(s) per cell, the final checkpoint evaluated on "
           f"{grid['evaluate']['num_examples']} validation examples per task (greedy). One "
           "fine-tune on the union of the three synthetic tasks stands for the paper's "
           "per-dataset fine-tunes. Numbers are mean ± standard deviation over seeds; "
           "'Avg' is Table 1's average of the tasks' metrics (ROUGE-1, BLEU, F1), each task's "
           "held-out (teacher-forced) loss beside its metric. Each model is pretrained once and "
           "converted and uptrained once; the spread is the fine-tuning seeds'. "
           f"GQA-{gk} of the big model's {n_big} heads keeps {n_big // gk} query heads per kv "
           f"head (the paper's GQA-8 of XXL's 64 heads: 8). This invocation ran {ran} of the "
           f"{len(results)} stages{cached} in {wall_seconds / 60:.1f} min of wall time; the "
           f"stages' own times add up to {sum(r['seconds'] for r in results.values()) / 60:.1f} "
           "min.",
           ""]
    md += ["## Table 1 analog", ""] + _table1_rows(summary, times, grid)
    md += ["", "The paper's Table 1 (T5.1.1 on the real datasets; T_infer in s on TPUv4):", ""]
    md += _paper_table1()
    quality = _quality_table(results)
    if quality:
        md += ["", "## Before uptraining: what each conversion keeps", "",
               "Teacher-forced on the first batches of the pretraining task's validation split, "
               "right after conversion (experiments.conversion_quality; 'source' is the big MHA "
               "model itself):", ""] + quality
    md += ["", "## Verdicts", ""]
    md += [f"- **{v['claim']}**: {v['verdict']}" + (
        "" if v["loss_verdict"] == v["verdict"] else
        f" on the average, {v['loss_verdict']} on the held-out loss") + f". {v['evidence']}."
        for v in verdict_list]
    md += ["", "A difference counts when it exceeds twice its standard error over seeds; "
           "otherwise the claim is undecided at this scale."]
    before = conversion_verdicts(data["conversion_quality"])
    if before:
        md += ["", "Right after conversion (alpha 0, before any uptraining or fine-tuning), from "
               "the table above: one pretrained model and one measurement per conversion on the "
               "same validation tokens, so a difference counts when it exceeds "
               f"{CONVERSION_MARGIN:.0%} of the larger KL:", ""]
        md += [f"- **{v['claim']}**, right after conversion: {v['verdict']}. {v['evidence']}."
               for v in before]
    md += ["", "## Figures", ""]
    md += [f"![{f}]({f})" for f in figures]
    md += ["", "## Every cell", ""] + _cells_table(summary)
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    _write_atomic(os.path.join(out, "REPORT.md"), "\n".join(md) + "\n")
    return data


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
