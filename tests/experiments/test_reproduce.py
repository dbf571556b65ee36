"""gqa-reproduce: stage keys, verdicts on hand-made numbers, a tiny grid end to end (report files,
finite numbers, valid PNGs, every claim named), resume after an interruption inside a stage, and
the paper-scale plan's gin files."""

import copy
import importlib.resources
import json
import math
import os

import numpy as np
import pytest

from gqa_t5x.experiments import repro_paper, repro_report, repro_stages, reproduce
from gqa_t5x.experiments.repro_report import Stat
from gqa_t5x.training import train_state

METHODS = ("mean", "first", "random")

# A grid small enough for CI: 1+1 layers, d_model 16, a few steps of everything.
TINY_GRID = """
scale = "cpu"
vocab_size = 2176
[models.small]
emb_dim = 16
num_heads = 2
head_dim = 8
mlp_dim = 32
num_encoder_layers = 1
num_decoder_layers = 1
[models.big]
emb_dim = 16
num_heads = 4
head_dim = 4
mlp_dim = 32
num_encoder_layers = 1
num_decoder_layers = 1
[grid]
gqa_kv_heads = 2
table1_alpha = 0.5
alphas = [0.5]
ablation_methods = ["mean", "first"]
aligned_methods = []
aligned_alphas = [0.5]
[pretrain]
task = "synthetic_span_corruption"
lengths = { inputs = 32, targets = 8 }
batch_size = 4
steps = 4
seed = 0
[finetune]
mixture = "synthetic_table1_mixture"
lengths = { inputs = 64, targets = 8 }
batch_size = 4
steps = 4
learning_rate = 0.01
dropout_rate = 0.0
seeds = 1
[evaluate]
num_examples = 2
batch_size = 2
[time]
batch_size = 2
input_length = 8
output_length = 2
repeats = 1
config_b = { skip = true }
"""


def _keys(grid):
    stages, _, _ = reproduce.make_plan(grid, METHODS)
    return {s.name: s.key for s in stages}


def _changed(grid, edit):
    other = copy.deepcopy(grid)
    edit(other)
    a, b = _keys(grid), _keys(other)
    assert a.keys() == b.keys()
    return {name for name in a if a[name] != b[name]}


def test_stage_keys_change_exactly_with_their_inputs():
    grid = reproduce.load_grid("cpu")
    names = set(_keys(grid))
    kinds = lambda *ks: {n for n in names if n.split("/")[0] in ks}  # noqa: E731
    assert _keys(grid) == _keys(reproduce.load_grid("cpu"))  # same inputs, same keys
    assert _changed(grid, lambda g: None) == set()
    # fine-tuning steps: every fine-tune and the evaluations that read them
    assert _changed(grid, lambda g: g["finetune"].update(steps=7)) == kinds("finetune",
                                                                             "evaluate")
    assert _changed(grid, lambda g: g["evaluate"].update(num_examples=7)) == kinds("evaluate")
    # pretraining: everything downstream of it, not the timing of random-weight shapes
    assert _changed(grid, lambda g: g["pretrain"].update(steps=301)) == names - kinds("time")
    assert _changed(grid, lambda g: g["time"].update(repeats=9)) == kinds("time")
    # the small model's shape: its own pretraining, fine-tunes, evaluations and timing only
    small = {n for n in names if "small" in n}
    assert _changed(grid, lambda g: g["models"]["small"].update(mlp_dim=96)) == small
    assert small == {"pretrain/small", "time/small"} | {
        f"{k}/mha_small/s{s}" for k in ("finetune", "evaluate") for s in range(3)}


def test_grid_variants_and_bad_flags():
    grid = reproduce.load_grid("cpu", quick=True)
    assert grid["finetune"]["seeds"] == 1 and grid["variant"] == "quick"
    assert grid["grid"]["ablation_methods"] == ["mean", "first", "random"]  # kept by the merge
    full = reproduce.load_grid("cpu", full=True, seeds=4)
    assert full["finetune"]["seeds"] == 4 and 0.2 in full["grid"]["alphas"]
    with pytest.raises(ValueError, match="--seeds 0"):
        reproduce.load_grid("cpu", seeds=0)
    with pytest.raises(ValueError, match="exclude"):
        reproduce.load_grid("cpu", quick=True, full=True)
    _, _, notes = reproduce.make_plan(reproduce.load_grid("cpu"), METHODS)
    assert any("'aligned'" in n for n in notes)  # a missing method is said, not silently lost


def test_similarity_grouping_runs_only_where_it_differs_from_contiguous():
    grid = reproduce.load_grid("cpu")
    names = {c["name"] for c in reproduce.cells(grid, ("mean", "first", "random", "aligned"))[0]}
    assert {"gqa2_aligned_similarity_a0", "mqa_aligned_a0", "mqa_aligned_a0.05"} <= names
    assert not any(n.startswith("mqa_aligned_similarity") for n in names)  # one group of 16
    notes = reproduce.cells(grid, ("mean", "first", "random", "aligned"))[1]
    assert any("mqa_aligned_similarity would repeat mqa_aligned" in n for n in notes)


def test_a_grid_written_as_changes_to_the_default_reuses_its_stages(tmp_path):
    path = tmp_path / "more.toml"
    path.write_text('base = "reproduce_cpu"\nname = "more"\n[grid]\nablation_kv_heads = [1, 2]\n'
                    'ablation_alphas = [0.0, 0.1]\n[finetune]\nseeds = 3\n')
    grid = reproduce.load_grid(path=str(path))
    assert grid["variant"] == "more" and grid["pretrain"]["steps"] == 1600  # from the base
    stages, cells, _ = reproduce.make_plan(grid, METHODS)
    names = {c["name"] for c in cells}
    assert {"gqa2_first_a0", "gqa2_random_a0.1", "mqa_first_a0.1"} <= names
    assert "mqa_first_a0.05" not in names  # the ablation's alphas replace table1_alpha
    default = {s.name: s.key for s in reproduce.make_plan(reproduce.load_grid(), METHODS)[0]}
    keys = {s.name: s.key for s in stages}
    shared = {n for n in default if n in keys and keys[n] == default[n]}
    assert shared == set(default) - {n for n in default if "first_a0.05" in n
                                     or "random_a0.05" in n}
    shipped = importlib.resources.files("gqa_t5x") / "configs" / "reproduce_cpu_methods.toml"
    methods = reproduce.load_grid(path=str(shipped))
    plan = {s.name: s.key for s in reproduce.make_plan(methods, METHODS)[0]}
    assert all(plan.get(n) == k for n, k in default.items())  # every default stage reused
    assert len(plan) - len(default) == 10 * 3 * 2 + 2 + 6  # 10 cells; GQA first, random; uptrain


def test_compare_uses_twice_the_standard_error():
    # se = sqrt(1/4 + 1/4) = 0.707: a difference of 1.5 counts, 1.3 does not
    assert repro_report.compare(Stat(11.5, 1.0, 4), Stat(10.0, 1.0, 4)) == 1
    assert repro_report.compare(Stat(11.3, 1.0, 4), Stat(10.0, 1.0, 4)) == 0
    assert repro_report.compare(Stat(8.5, 1.0, 4), Stat(10.0, 1.0, 4)) == -1
    assert repro_report.compare(Stat(50.0, None, 1), Stat(10.0, None, 1)) == 0  # one seed


def _summary(values, losses=None):
    return {name: {"cell": {"method": name.split("_")[1] if "_" in name else None},
                   "stats": {"average": Stat(v, 0.1, 3),
                             "loss": Stat((losses or {}).get(name, 1.0), 0.1, 3)}}
            for name, v in values.items()}


def test_verdicts_from_hand_made_numbers():
    grid = {"grid": {"table1_alpha": 0.05, "gqa_kv_heads": 2, "alphas": [0.0, 0.05, 0.1]},
            "models": {"big": {"num_heads": 16}}}
    values = {"mha_big": 50, "mqa_mean_a0.05": 45, "mqa_first_a0.05": 44,
              "mqa_random_a0.05": 30, "gqa2_mean_a0.05": 49.5, "mqa_mean_a0": 40,
              "mqa_mean_a0.1": 46, "gqa2_mean_a0": 47, "gqa2_mean_a0.1": 49.8,
              "mqa_aligned_a0.05": 47}
    times = {"big": {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.6, 16: 2.0}}
    got = {v["claim"]: v["verdict"] for v in repro_report.verdicts(_summary(values), times,
                                                                   grid)}
    assert list(got) == list(repro_report.CLAIMS)
    assert set(got.values()) == {"supported"}
    accelerating = dict(values, **{"mqa_mean_a0.05": 41, "mqa_mean_a0.1": 46})  # +1, then +5
    got = {v["claim"]: v["verdict"] for v in repro_report.verdicts(_summary(accelerating),
                                                                   times, grid)}
    assert got["uptraining helps, with diminishing returns"] == "undecided"
    values.update({"mqa_first_a0.05": 46, "gqa2_mean_a0.05": 44, "mqa_mean_a0.1": 44.5,
                   "mqa_aligned_a0.05": 43})
    times = {"big": {1: 1.0, 2: 1.8, 16: 2.0}}
    got = {v["claim"]: v["verdict"] for v in repro_report.verdicts(_summary(values), times,
                                                                   grid)}
    # first above mean; GQA below MQA; GQA at alpha 0.05 below its alpha 0 (47 -> 44); GQA-2
    # 80% of the way from MQA to MHA in time; aligned below mean
    assert got == {c: "contradicted" for c in repro_report.CLAIMS}
    evidence = {v["claim"]: v["evidence"] for v in repro_report.verdicts(
        _summary(values, {"mqa_aligned_a0.05": 0.75}), times, grid)}
    assert evidence["aligned beats mean (beyond the paper)"].startswith(  # 43 - 45, 0.75 - 1.0
        "by how much: aligned minus mean over the 1 matched cells, average -2.00 points (from "
        "-2.00 to -2.00), held-out loss -0.250")
    values.update({"gqa2_mean_a0.05": 49.5, "mqa_first_a0.05": 45.05, "mqa_aligned_a0.05": 45})
    got = {v["claim"]: v["verdict"] for v in repro_report.verdicts(_summary(values), {}, grid)}
    assert got["mean > first > random"] == "undecided"  # 45 vs 45.05: within the spread
    assert got["aligned beats mean (beyond the paper)"] == "undecided"
    assert got["GQA's time per sample near MQA's"] == "undecided"  # no timing
    # the held-out loss decides where the metric does not (lower loss is better)
    losses = {"mqa_mean_a0.05": 1.0, "mqa_first_a0.05": 1.5, "mqa_random_a0.05": 2.0,
              "mqa_aligned_a0.05": 1.4}
    got = {v["claim"]: v for v in repro_report.verdicts(_summary(values, losses), {}, grid)}
    assert got["mean > first > random"]["verdict"] == "undecided"
    assert got["mean > first > random"]["loss_verdict"] == "supported"
    assert got["aligned beats mean (beyond the paper)"]["loss_verdict"] == "contradicted"


def _run(tmp_path, out, **kwargs):
    path = tmp_path / "grid.toml"
    path.write_text(TINY_GRID)
    return reproduce.reproduce("cpu", str(out), grid_path=str(path), **kwargs)


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def _check_report(out, report) -> tuple[dict, str]:
    """results.json's numbers finite, each figure a PNG, every claim in the verdicts."""
    data = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(x) for x in _numbers(data))
    for name in repro_report.FIGURES.values():
        blob = (out / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 1000
        import matplotlib.image
        assert matplotlib.image.imread(str(out / name)).ndim == 3
    text = open(report).read()
    verdicts = text.split("## Verdicts")[1].split("##")[0]
    for claim in repro_report.CLAIMS:
        assert f"**{claim}**" in verdicts
    assert "## Table 1 analog" in text and "MHA-XXL" in text
    return data, text


@pytest.mark.slow
def test_quick_grid_end_to_end(tmp_path):
    out = tmp_path / "quick"
    data, text = _check_report(out, reproduce.reproduce("cpu", str(out), quick=True))
    assert "its numbers mean nothing" in text
    # 2 MHA, MQA and GQA-2 by mean at alpha 0 and 0.1, MQA by first and random, aligned MQA
    # and GQA-2, similarity-grouped GQA-2
    assert len(data["cells"]) == 11
    assert all(len(c["seeds"]) == 1 for c in data["cells"].values())


@pytest.mark.slow
def test_tiny_grid_end_to_end_then_resume_after_an_interruption(tmp_path, monkeypatch):
    report = _run(tmp_path, tmp_path / "a")
    out = tmp_path / "a"
    data, _ = _check_report(out, report)
    assert len(data["cells"]) == 5  # 2 MHA, MQA and GQA by mean, MQA by first

    # Interrupted inside a fine-tune, after its first checkpoint (steps 4, checkpoints at 2, 4):
    # the rerun redoes only the stages not complete and resumes that one from its checkpoint.
    target = "finetune/gqa2_mean_a0.5/s0"
    real_save, calls = train_state.save, {"n": 0}

    def save_then_die(manager, state, run, config, best=None):
        real_save(manager, state, run, config, best)
        if "finetune-gqa2_mean_a0.5-s0-" in str(manager.directory):
            calls["n"] += 1
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train_state, "save", save_then_die)
    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, b)
    monkeypatch.setattr(train_state, "save", real_save)
    stages, _, _ = reproduce.make_plan(reproduce.load_grid(path=str(tmp_path / "grid.toml")),
                                       METHODS)
    done = {s.name: os.path.getmtime(os.path.join(reproduce.stage_dir(str(b), s),
                                                  "stage.json"))
            for s in stages if reproduce.read_result(str(b), s) is not None}
    assert target not in done and len(done) > 5
    partial = [s for s in stages if s.name == target][0]
    assert os.path.isdir(reproduce.stage_dir(str(b), partial) + ".partial/checkpoint_2")

    ran = []
    for kind, fn in list(repro_stages.RUNNERS.items()):
        monkeypatch.setitem(repro_stages.RUNNERS, kind,
                            lambda stage, ctx, fn=fn: ran.append(stage.name) or fn(stage, ctx))
    _run(tmp_path, b)
    assert ran == [s.name for s in stages if s.name not in done]
    for s in stages:
        if s.name in done:  # not redone
            assert os.path.getmtime(os.path.join(reproduce.stage_dir(str(b), s),
                                                 "stage.json")) == done[s.name]
    resumed = json.loads((b / "results.json").read_text())
    assert data["stages_run"] == len(stages)
    assert resumed["stages_run"] == len(stages) - len(done)  # the report says what this run did
    n = len(stages)
    assert f"This invocation ran {n} of the {n} stages in " in (out / "REPORT.md").read_text()
    assert (f"This invocation ran {n - len(done)} of the {n} stages ({len(done)} were cached) "
            "in ") in (b / "REPORT.md").read_text()
    for name, cell in data["cells"].items():
        for seed_a, seed_b in zip(cell["seeds"], resumed["cells"][name]["seeds"]):
            assert seed_a.keys() == seed_b.keys()
            np.testing.assert_allclose([seed_b[k] for k in seed_a], list(seed_a.values()),
                                       rtol=1e-5, atol=1e-6, err_msg=name)


def test_paper_dry_run_parses_every_gin_file(tmp_path, capsys):
    reproduce.reproduce("paper", str(tmp_path / "p"), dry_run=True)
    out = capsys.readouterr().out
    assert not (tmp_path / "p").exists()  # a dry run writes nothing
    files, commands = repro_paper.plan_files(reproduce.load_grid("paper"), "/runs")
    assert f"{len(files)} gin files parse" in out
    # 2 MHA + MQA/GQA-8 mean at alphas 0, .05, .1 + MQA first and random + aligned at alphas 0,
    # .05: MQA contiguous, GQA-8 contiguous and similarity (one group: similarity is contiguous)
    n_cells = 2 + 2 * 3 + 2 + 3 * 2
    assert sum(c.startswith("# convert ") for c in commands) == 2 + 2 + 3
    # every uptraining and fine-tuning stage has a gin file for each runner
    for stage in ("uptrain/", "finetune/"):
        ours = {n for n in files if n.startswith(stage) and not n.endswith(".t5x.gin")}
        assert {n for n in files if n.startswith(stage)} - ours == {
            n[:-4] + ".t5x.gin" for n in ours}
    assert sum(c.startswith("gqa-train") and "finetune/" in c for c in commands) == n_cells * 7 * 3
    assert any("gqa-convert" in c and "--num_kv_heads 8" in c for c in commands)
    assert "gqa-bench --preset t5_1_1_xxl --input_length 2048 --output_length 512" in out


def test_paper_gin_check_rejects_a_bad_file(tmp_path):
    good = tmp_path / "good.gin"
    good.write_text("include 'runs/eval.gin'\nMODEL_DIR = '/x'\nMIXTURE_OR_TASK_NAME = 'qa'\n")
    assert repro_paper.check_gin_files([str(good)]) == []
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'runs/eval.gin'\ngqa_t5x.evaluate.EvalSettings.no_such_arg = 1\n")
    with pytest.raises(ValueError, match="bad.gin does not parse"):
        repro_paper.check_gin_files([str(bad)])
    t5x_bad = tmp_path / "bad.t5x.gin"
    t5x_bad.write_text("include 'models/no_such_model.gin'\n")
    with pytest.raises(ValueError, match="no_such_model.gin"):
        repro_paper.check_gin_files([str(t5x_bad)])


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from gqa_t5x.cli import reproduce as cli

    assert cli.main(["--seeds", "0", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "gqa-reproduce: --seeds 0: need at least 1"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY_GRID)
    assert cli.main(["--out", str(other), "--grid", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "not a gqa-reproduce run" in err and "--force" in err
    assert (other / "notes.txt").read_text() == "keep me"


def test_conversion_verdicts_from_hand_made_kl():
    from gqa_t5x.experiments import repro_report

    def q(**kl):
        return {v.replace("_sim", "/similarity"): {"kl_from_source": x} for v, x in kl.items()}

    held = repro_report.conversion_verdicts({
        "mqa": q(mean=2.0, first=3.0, random=3.5, aligned=1.5, aligned_sim=1.96),
        "gqa2": q(mean=1.8, first=2.5, random=2.9, aligned=1.2, aligned_sim=1.0)})
    by_claim = {v["claim"]: v["verdict"] for v in held}
    assert by_claim[repro_report.CLAIMS[0]] == "supported"
    assert by_claim[repro_report.CLAIMS[4]] == "supported"  # aligned keeps a lower KL in both
    # aligned/similarity: 1.96 vs 2.0 is within 5% for MQA, so undecided
    assert by_claim[repro_report.CLAIMS[4] + ", similarity groups"] == "undecided"
    # first within 5% of random in one target: undecided
    flat = repro_report.conversion_verdicts({"mqa": q(mean=2.0, first=3.0, random=3.1)})
    assert flat[0]["verdict"] == "undecided"
    assert "mqa: mean 2.000, first 3.000, random 3.100" in flat[0]["evidence"]


def test_conversion_table_rows_keep_the_grids_order_however_the_stage_was_read():
    m = {"cross_entropy": 1.0, "kl_from_source": 0.5, "token_accuracy": 0.25}
    # as a cached stage.json comes back: metrics with sorted keys
    result = {"inputs": {"variants": ["mean", "first", "random"]},
              "metrics": {k: m for k in ("first", "mean", "random", "source")}}
    lines = repro_report._quality_table({"quality/mqa": result, "quality/gqa2": result})
    assert [row.split(" | ")[0] for row in lines[2:]] == ["| source", "| mean", "| first",
                                                         "| random"]
    assert lines[2] == "| source | 1.000 | 0.5000 | 0.250 | 1.000 | 0.5000 | 0.250 |"
