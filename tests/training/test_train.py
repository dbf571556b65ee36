"""The training run: the loss falls, checkpoints, resume after SIGKILL, error paths."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_tasks

from gqa_t5x.model.config import get_config
from gqa_t5x.training import evaluate, models, optim, run_log, train, train_state

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # toy_tasks.py
ROOT = os.path.dirname(TESTS)
TASK = toy_tasks.register()
CACHE_ENV = toy_tasks.enable_compilation_cache()


def _config(**kw):
    base = dict(vocab_size=toy_tasks.VOCAB_SIZE, num_encoder_layers=1, num_decoder_layers=1)
    return get_config("tiny", **{**base, **kw})


def _train(model_dir, steps=20, config=None, **kw):
    args = dict(mixture_or_task_name=TASK, task_feature_lengths=toy_tasks.LENGTHS, batch_size=8,
                train_steps=steps, model=models.build_model(config or _config()),
                schedule=optim.constant_schedule(1e-2), log_every=10, checkpoint_every=10)
    args.update(kw)
    return train.train(str(model_dir), **args)


def _params(checkpoint):
    return train_state.read_train_checkpoint(checkpoint)[0]


def test_loss_falls_and_run_files_are_written(tmp_path, capsys):
    result = _train(tmp_path, steps=60, config=_config(num_encoder_layers=2, num_decoder_layers=2),
                    log_every=20, checkpoint_every=30, keep_checkpoints=1)
    records = [r for r in run_log.read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in records] == [20, 30, 40, 60]  # also at each checkpoint
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert result.step == 60 and result.checkpoint == str(tmp_path / "checkpoint_60")
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == \
        ["checkpoint_60"]  # keep 1
    for name in ("config.gin", "model_config.json", "metrics.jsonl", "train"):
        assert (tmp_path / name).exists(), name
    out = capsys.readouterr().out
    assert "step 60/60  loss " in out and "tokens/s" in out and "ETA" in out
    for key in ("learning_rate", "steps_per_sec", "tokens_per_sec", "accuracy"):
        assert key in records[-1]


def test_rerun_of_a_finished_run_trains_no_further(tmp_path):
    _train(tmp_path, steps=10)
    before = _params(tmp_path / "checkpoint_10")
    result = _train(tmp_path, steps=10)
    assert result.step == 10
    after = _params(tmp_path / "checkpoint_10")
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_best_checkpoint_is_kept_beside_the_latest(tmp_path):
    # The loss falls, so its "best" under "min" would be the latest checkpoint anyway; ranking
    # by "max" keeps the earliest evaluation instead, which shows the best is kept beside it.
    settings = evaluate.EvalSettings(every_steps=10, best_metric=f"{TASK}/loss",
                                     best_mode="max", batch_size=8)
    _train(tmp_path, steps=30, keep_checkpoints=1, eval_settings=settings)
    evals = [r for r in run_log.read_metrics(tmp_path) if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    worst = max(evals, key=lambda r: r[f"{TASK}/loss"])["step"]
    kept = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint_"))
    assert kept == sorted({f"checkpoint_{worst}", "checkpoint_30"})
    assert f"{TASK}/sequence_accuracy" in evals[-1]


def test_resume_keeps_one_metrics_row_per_step(tmp_path, capsys):
    _train(tmp_path, steps=20, log_every=5)
    first = {r["step"]: r["loss"] for r in run_log.read_metrics(tmp_path)}
    # A crash before checkpoint_20 was written: the rerun resumes at 10 and redoes 15 and 20.
    shutil.rmtree(tmp_path / "checkpoint_20")
    _train(tmp_path, steps=20, log_every=5)
    steps = [r["step"] for r in run_log.read_metrics(tmp_path)]
    assert steps == [5, 10, 15, 20]
    assert "removed 2 rows after step 10" in capsys.readouterr().out
    assert {r["step"]: r["loss"] for r in run_log.read_metrics(tmp_path)} == first


# ---- resume after SIGKILL -----------------------------------------------------------------------

_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import toy_tasks
toy_tasks.register()
from gqa_t5x.training import models
from gqa_t5x.training import optim
from gqa_t5x.training import train
from gqa_t5x.training import train_state
from gqa_t5x.model.config import get_config

kill_at = int(os.environ.get("KILL_AT", "0"))
save = train_state.save

def save_then_die(manager, state, run, config, metrics=None):
    save(manager, state, run, config, metrics)  # asynchronous: still writing when killed
    if run["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

train_state.save = save_then_die
train.train(sys.argv[1], mixture_or_task_name=toy_tasks.NAME,
            task_feature_lengths=toy_tasks.LENGTHS, batch_size=8, train_steps=30,
            model=models.build_model(get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE,
                                                dropout_rate=0.1)),
            schedule=optim.rsqrt_schedule(1.0, 10), checkpoint_every=10, log_every=10)
"""


def _run_script(model_dir, kill_at=0):
    env = dict(os.environ, KILL_AT=str(kill_at), PYTHONPATH=ROOT, **CACHE_ENV)
    return subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=TESTS), str(model_dir)],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_mid_save_then_rerun_equals_uninterrupted_run(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    first = _run_script(killed, kill_at=20)
    assert first.returncode == -9, first.stderr[-2000:]
    assert train_state.latest_checkpoint_dir(str(killed)) in (
        str(killed / "checkpoint_10"), str(killed / "checkpoint_20"))
    second = _run_script(killed)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout
    third = _run_script(clean)
    assert third.returncode == 0, third.stderr[-2000:]
    a, b = _params(clean / "checkpoint_30"), _params(killed / "checkpoint_30")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # bit-identical
    losses = {d: [r["loss"] for r in run_log.read_metrics(d) if r["step"] == 30]
              for d in (clean, killed)}
    assert losses[clean] == losses[killed]
    assert [r["step"] for r in run_log.read_metrics(killed)] == [10, 20, 30]  # one row per step


# ---- error paths --------------------------------------------------------------------------------


def test_unknown_task_names_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task or mixture 'toy_revers'.*toy_reverse"):
        _train(tmp_path, mixture_or_task_name="toy_revers")


def test_task_vocabulary_larger_than_the_model_is_refused():
    task = train.get_mixture_or_task(toy_tasks.register())
    train.check_vocabulary(task, get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE))
    with pytest.raises(ValueError, match=rf"vocabulary of {toy_tasks.VOCAB_SIZE} ids .* "
                                         rf"vocab_size is {toy_tasks.VOCAB_SIZE - 1}"):
        train.check_vocabulary(task, get_config("tiny", vocab_size=toy_tasks.VOCAB_SIZE - 1))


def test_train_steps_and_uptrain_fraction_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="exactly one of train_steps"):
        _train(tmp_path, uptrain_fraction=0.1)
    with pytest.raises(ValueError, match="needs initial_checkpoint_path"):
        _train(tmp_path, train_steps=None, uptrain_fraction=0.1)


def test_missing_initial_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        _train(tmp_path / "run", initial_checkpoint_path=str(tmp_path / "does_not_exist"))


def test_mismatched_initial_checkpoint_names_the_array(tmp_path):
    _train(tmp_path / "mha", steps=10)
    with pytest.raises(ValueError, match=r"decoder/layers_0/encoder_decoder_attention/key/kernel"
                                         r" has shape \(32, 64\), expected \(32, 16\).*"
                                         r"num_kv_heads=4.*gqa-convert"):
        _train(tmp_path / "mqa", config=_config(num_kv_heads=1),
               initial_checkpoint_path=str(tmp_path / "mha"))


def test_resume_with_another_model_is_refused(tmp_path):
    _train(tmp_path, steps=10)
    with pytest.raises(ValueError, match="num_kv_heads=4 but this run's model has num_kv_heads=2"):
        _train(tmp_path, steps=20, config=_config(num_kv_heads=2))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def exploding(step):  # finite for 12 updates, then NaN parameters
        return jnp.where(step < 12, 1e-2, jnp.nan)

    with pytest.raises(train.NonFiniteLossError, match=r"step 14: objective is nan.*"
                                                        r"checkpoint_10"):
        _train(tmp_path, steps=30, schedule=exploding, log_every=2)
    assert train_state.latest_checkpoint_dir(str(tmp_path)) == str(tmp_path / "checkpoint_10")
    params = _params(tmp_path / "checkpoint_10")
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# ---- uptraining semantics -----------------------------------------------------------------------


def test_initial_checkpoint_continues_step_and_budget_from_fraction(tmp_path):
    _train(tmp_path / "source", steps=20)
    result = _train(tmp_path / "up", train_steps=None, uptrain_fraction=0.5,
                    initial_checkpoint_path=str(tmp_path / "source"),
                    schedule=optim.rsqrt_schedule(1.0, 4), log_every=1, checkpoint_every=100)
    assert result.step == 30  # 20 source steps + 0.5 x 20
    lrs = [r["learning_rate"] for r in run_log.read_metrics(tmp_path / "up")]
    np.testing.assert_allclose(lrs, [1 / np.sqrt(s) for s in range(20, 30)], rtol=1e-6)
    # "restart": step 0 and the schedule from its start; at learning rate 0 the params stay
    # exactly the initial checkpoint's (a random init or a misread checkpoint would differ).
    restart = _train(tmp_path / "restart", steps=5, initial_step_mode="restart",
                     initial_checkpoint_path=str(tmp_path / "source" / "checkpoint_20"),
                     schedule=optim.constant_schedule(0.0), log_every=1)
    assert restart.step == 5
    assert [r["step"] for r in run_log.read_metrics(tmp_path / "restart")] == [1, 2, 3, 4, 5]
    src = _params(tmp_path / "source" / "checkpoint_20")
    got = _params(tmp_path / "restart" / "checkpoint_5")
    jax.tree_util.tree_map(np.testing.assert_array_equal, src, got)


def test_progress_line_format():
    line = run_log.progress_line(120, 300, {"loss": 4.123, "learning_rate": 0.01}, 2.0, 1203.4)
    assert line == ("step 120/300  loss 4.1230  lr 1.00e-02  2.00 steps/s  1,203 tokens/s  "
                    "ETA 1m30s")
    assert run_log.format_duration(3725) == "1h02m05s"


@pytest.mark.slow
def test_scanned_remat_run_trains_like_the_plain_run_and_saves_t5x_layout(tmp_path):
    """Same seed, same data: scan + remat change neither the updates (Adafactor stays per layer)
    nor the checkpoint layout, which an unscanned model reads and resumes."""
    two = _config(num_encoder_layers=2, num_decoder_layers=2)
    plain = _train(tmp_path / "plain", steps=10, config=two)
    scanned = _train(tmp_path / "scanned", steps=10,
                     config=two.replace(scan_layers=True, remat="full"))
    a, b = _params(plain.checkpoint), _params(scanned.checkpoint)
    assert "layers_0" in b["encoder"] and "layers" not in b["encoder"]
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6),
                           b, a)
    resumed = _train(tmp_path / "scanned", steps=20, config=two)  # resumed unscanned
    assert resumed.step == 20


def test_resume_with_another_batch_size_or_shuffle_seed_is_refused(tmp_path):
    _train(tmp_path, steps=10)
    with pytest.raises(ValueError, match=r"batch_size=8 \(BATCH_SIZE\) but this run has "
                                         r"batch_size=16"):
        _train(tmp_path, steps=20, batch_size=16)
    with pytest.raises(ValueError, match=r"shuffle_seed=0 \(SHUFFLE_SEED\)"):
        _train(tmp_path, steps=20, shuffle_seed=1)
