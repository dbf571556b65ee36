"""The benchmark keeps every repeat; the table shows their range; the figure has a title with the
config and a legend that covers no data."""

import json
import os

from gqa_t5x.cli import bench as bench_cli
from gqa_t5x.experiments import benchmark, benchmark_report


def test_repeats_are_kept_shown_and_drawn(tmp_path, capsys):
    out = str(tmp_path / "bench")
    argv = ["--preset", "tiny", "--input_length", "8", "--output_length", "4",
            "--batch_size", "2", "--groups", "1,4", "--repeats", "3", "--output_dir", out]
    assert bench_cli.main(argv) == 0
    table = capsys.readouterr().out
    with open(os.path.join(out, benchmark.RESULTS_JSON)) as f:
        results = json.load(f)
    for row in results["rows"]:
        m = row["measured"]
        for key in ("encoder_s", "cache_init_s", "decode_s", "sample_s"):
            assert len(m["repeats"][key]) == 3, key
        samples = m["repeats"]["sample_s"]
        assert samples == [(e + c + d) / 2 for e, c, d in zip(
            m["repeats"]["encoder_s"], m["repeats"]["cache_init_s"], m["repeats"]["decode_s"])]
        line = next(line for line in table.splitlines() if line.startswith(row["name"] + " "))
        assert f"{min(samples):.3f}-{max(samples):.3f}" in line
    assert "s/sample: median of 3 repeats; range: their min-max" in table
    assert table.splitlines()[0].startswith("d_model 32, 4 heads x 16, ")

    fig = benchmark_report.figure(results)
    ax = fig.axes[0]
    assert ax.get_title().startswith("d_model 32, 4 heads x 16, ")
    assert "batch 2, input 8, 4 steps" in ax.get_title()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_box = ax.get_legend().get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    assert legend_box.x0 >= axes_box.x1  # beside the axes, over no curve
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "measured (min-max)" in labels and "bytes model" in labels
