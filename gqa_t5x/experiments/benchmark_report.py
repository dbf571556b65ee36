"""What the decode benchmark shows: the text table and the figure of `benchmark.json`'s results.

Each measured row keeps every repeat's time (`measured["repeats"]`); the table gives the range of
the time per sample beside its median, and the figure draws that range as error bars, with the
model and decode shape in its title and the legend outside the axes.
"""

from __future__ import annotations

from gqa_t5x.experiments.benchmark import logits_weight_bytes
from gqa_t5x.model.config import TransformerConfig


def sample_range(measured: dict) -> tuple[float, float] | None:
    """(min, max) seconds per sample over the repeats, or None for results without them."""
    times = measured.get("repeats", {}).get("sample_s")
    return (min(times), max(times)) if times else None


def title(results: dict) -> str:
    """'d_model 512, 8 heads x 64, 4+4 layers, vocab 32128; batch 8, input 1024, 128 steps'."""
    c, s = results["config"], results.get("settings", {})
    model = (f"d_model {c['emb_dim']}, {c['num_heads']} heads x {c['head_dim']}, "
             f"{c['num_encoder_layers']}+{c['num_decoder_layers']} layers, vocab "
             f"{c['vocab_size']}")
    if not s:
        return model
    return (f"{model}; batch {s['batch_size']}, input {s['input_length']}, "
            f"{s['output_length']} steps")


def format_table(results: dict) -> str:
    """A text table of the measured and predicted figures."""
    head = (f"{'model':<22}{'s/sample':>9}{'range':>14}{'pred':>7}{'enc s':>8}{'pred':>7}"
            f"{'init s':>8}{'loop s':>8}{'ms/step':>8}{'pred':>7}{'mv':>7}{'cache MiB':>10}")
    lines = [title(results), head, "-" * len(head)]
    for row in results["rows"]:
        m, p = row["measured"], row["predicted"] or {}

        def fmt(d, key, width, digits):
            return f"{d[key]:>{width}.{digits}f}" if key in d else " " * (width - 1) + "-"

        spread = sample_range(m)
        span = f"{spread[0]:.3f}-{spread[1]:.3f}" if spread else "-"
        lines.append(
            f"{row['name']:<22}{fmt(m, 'sample_s', 9, 3)}{span:>14}{fmt(p, 'sample_s', 7, 3)}"
            f"{fmt(m, 'encoder_s', 8, 2)}{fmt(p, 'encoder_s', 7, 2)}"
            f"{fmt(m, 'cache_init_s', 8, 3)}{fmt(m, 'decode_s', 8, 2)}"
            f"{fmt(m, 'step_ms', 8, 1)}{fmt(p, 'step_ms', 7, 1)}{fmt(p, 'step_ms_matvec', 7, 1)}"
            + (f"{m['cache_bytes'] / 2**20:>10.1f}" if "cache_bytes" in m else f"{'-':>10}"))
    repeats = results.get("settings", {}).get("repeats")
    if repeats:
        lines.append(f"s/sample: median of {repeats} repeats; range: their min-max")
    bw = results["bandwidth_bytes_per_s"] / 1e9
    rate = results["matmul_flops_per_s"] / 1e9
    on = results.get("cpu_kernels")  # absent from results of older versions
    kernels = "" if on is None else f", CPU decode kernels {'on' if on else 'off'}"
    lines.append(f"bandwidth {bw:.1f} GB/s, matmul {rate:.1f} GFLOP/s{kernels}")
    if "logits_step_s" in results:
        weight_bytes = logits_weight_bytes(TransformerConfig.from_dict(results["config"]))
        lines.append(f"logits projection alone {results['logits_step_s'] * 1e3:.1f} ms/step "
                     f"(bytes model {weight_bytes / results['bandwidth_bytes_per_s'] * 1e3:.1f}); "
                     "pred: bytes model, mv: decoder weights at its rate")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Write `figure(results)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(results: dict):
    """Time per sample against the number of groups, measured (median, min-max bars) and
    predicted: a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["predicted"] is not None
            and "recompute" not in r["name"]]
    rows.sort(key=lambda r: r["groups"])
    groups = [r["groups"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    medians = [r["measured"]["sample_s"] for r in rows]
    spreads = [sample_range(r["measured"]) or (m, m) for r, m in zip(rows, medians)]
    ax.errorbar(groups, medians, yerr=[[m - lo for m, (lo, _) in zip(medians, spreads)],
                                       [hi - m for m, (_, hi) in zip(medians, spreads)]],
                fmt="o-", capsize=3, label="measured (min-max)")
    ax.plot(groups, [r["predicted"]["sample_s"] for r in rows], "s--", label="bytes model")
    if rows and "sample_s_matvec" in rows[0]["predicted"]:
        ax.plot(groups, [r["predicted"]["sample_s_matvec"] for r in rows], "^:",
                label="matvec model")
    for r in results["rows"]:
        if r["groups"] is None:
            ax.axhline(r["measured"]["sample_s"], color="gray", ls=":", label=r["name"])
    if groups:
        ax.set_xscale("log", base=2)
        ax.set_xticks(groups, [str(g) for g in groups])
    ax.set_xlabel("GQA groups (kv heads)")
    ax.set_ylabel("time per sample (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(title(results), fontsize="small", wrap=True)
    # Outside the axes, so that it covers no data whatever the curves do.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig
