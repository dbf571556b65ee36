"""gqa-bench and gqa-demo --help say what a new user needs: the default model, where results go,
what --groups counts, and what every option does."""

import pytest

from gqa_t5x.cli import bench, demo


def _help(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_bench_help_names_config_b_the_output_folder_and_kv_heads(capsys):
    text = _help(bench.main, capsys)
    assert "Default model and decode shape: config B (configs/config_b.toml)" in text
    assert "--output_dir (benchmark_results/)" in text
    assert "comma-separated numbers of kv heads to time" in text


@pytest.mark.parametrize("main", [bench.main, demo.main])
def test_every_option_has_help(main, capsys):
    # argparse prints an option's help beside it or on the next line; an option without help
    # has the next option's flag right after its own.
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("--") and len(stripped.split()) <= 2:
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert following and not following.startswith("-"), f"{stripped} has no help"
