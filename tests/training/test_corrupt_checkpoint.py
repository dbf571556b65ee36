"""A damaged newest training checkpoint: resume says which one is unreadable and why, moves it
aside and continues from the newest complete one; gqa-convert says why it skipped it."""

import hashlib
import os
import shutil

import pytest
import toy_tasks

from gqa_t5x.checkpoints import load_checkpoint
from gqa_t5x.cli import convert as convert_cli
from gqa_t5x.model.config import get_config, with_kv_heads
from gqa_t5x.training import models, optim, run_log, train

TASK = toy_tasks.register()
CACHE_ENV = toy_tasks.enable_compilation_cache()
CONFIG = get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE, num_encoder_layers=1,
                    num_decoder_layers=1)


def _train(model_dir, steps=20):
    return train.train(str(model_dir), mixture_or_task_name=TASK,
                       task_feature_lengths=toy_tasks.LENGTHS, batch_size=8, train_steps=steps,
                       model=models.build_model(CONFIG), schedule=optim.constant_schedule(1e-2),
                       log_every=10, checkpoint_every=10)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 20 steps with checkpoint_10 and checkpoint_20."""
    model_dir = tmp_path_factory.mktemp("run") / "run"
    _train(model_dir)
    return model_dir


def _largest(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def _truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


# (damage done to checkpoint_20, what the message says)
DAMAGE = {
    "missing _METADATA": (lambda c: os.remove(c / "state" / "_METADATA"),
                          "state/_METADATA is missing"),
    "truncated data file": (lambda c: _truncate(_largest(c / "state" / "ocdbt.process_0" / "d")),
                            "Encountered error while reading"),
    "missing run/metadata": (lambda c: os.remove(c / "run" / "metadata"),
                             "run/metadata is missing"),
    "truncated manifest": (lambda c: _truncate(c / "state" / "manifest.ocdbt", 10),
                           "state/manifest.ocdbt is corrupt"),
}


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, finished_run, capsys,
                                                             damage):
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    corrupt, reason = DAMAGE[damage]
    corrupt(model_dir / "checkpoint_20")
    capsys.readouterr()
    result = _train(model_dir)
    out = capsys.readouterr().out
    bad, aside = model_dir / "checkpoint_20", model_dir / "unreadable_checkpoint_20"
    line = next(line for line in out.splitlines() if "is unreadable" in line)
    assert line.startswith(f"{bad} is unreadable (")
    assert reason in line
    assert line.endswith(f"); moved it to {aside}, resuming from the newest complete "
                         f"checkpoint, {model_dir / 'checkpoint_10'}")
    assert f"resuming from {model_dir / 'checkpoint_10'}" in out
    assert result.step == 20 and result.checkpoint == str(bad)
    assert aside.is_dir()  # kept, not deleted
    steps = [r["step"] for r in run_log.read_metrics(model_dir)]
    assert steps == [10, 20]


@pytest.mark.slow
def test_gqa_convert_says_why_it_skipped_a_checkpoint(tmp_path, finished_run, capsys):
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    os.remove(model_dir / "checkpoint_20" / "run" / "metadata")
    rc = convert_cli.main(["--input", str(model_dir), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"skipped {model_dir / 'checkpoint_20'}: run/metadata is missing" in out
    assert "step 10 (source records 10)" in out
    assert load_checkpoint(str(tmp_path / "out"))[1] == with_kv_heads(CONFIG, 1)


@pytest.mark.slow
def test_gqa_convert_names_an_unreadable_checkpoint(tmp_path, finished_run, capsys):
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    # Every data file: which one holds the params (not the optimizer state) varies by run.
    folder = model_dir / "checkpoint_20" / "state" / "ocdbt.process_0" / "d"
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
    for path in files:
        _truncate(path)
    before = [_sha(path) for path in files]
    rc = convert_cli.main(["--input", str(model_dir), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"gqa-convert: error: training checkpoint {model_dir / 'checkpoint_20'} "
                          "is unreadable (")
    assert err.rstrip().endswith("give an earlier checkpoint_<step>/ folder as the input")
    assert err.count("\n") == 1
    assert [_sha(path) for path in files] == before
    assert sorted(os.listdir(tmp_path)) == ["run"]
