"""gqa-train / gqa-eval / gqa-infer: a user's mistake is one line naming the binding and exit 2,
`--verbose` adds the traceback; --help lists the gin files and macros; library noise is held
back."""

import os
import subprocess
import sys

import gin
import pytest

from gqa_t5x.cli import quiet
from gqa_t5x.cli import run as run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = ["--gin_file=models/tiny.gin", "--gin_file=attention/mha.gin",
            "--gin_file=runs/pretrain.gin"]


@pytest.fixture(autouse=True)
def _clean_gin(monkeypatch):
    monkeypatch.setattr(quiet, "silence_libraries", lambda: None)  # a subprocess test checks it
    gin.clear_config()
    yield
    gin.clear_config()


def run(capsys, main, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.err


def test_batch_size_of_the_wrong_type_names_the_binding(capsys, tmp_path):
    rc, err = run(capsys, run_cli.train_main, *PRETRAIN, f"--gin.MODEL_DIR='{tmp_path}'",
                  "--gin.BATCH_SIZE='eight'")
    assert rc == 2
    assert err == ("gqa-train: error: gqa_t5x.train.train.batch_size = %BATCH_SIZE = 'eight': "
                   "expected int; bind --gin.BATCH_SIZE=VALUE\n")
    assert not os.listdir(tmp_path)


def test_missing_required_macro_is_named(capsys):
    rc, err = run(capsys, run_cli.train_main, *PRETRAIN)
    assert rc == 2
    assert err.startswith("gqa-train: error: MODEL_DIR must be set: the gin files mark it "
                          "%gin.REQUIRED; give --gin.MODEL_DIR=VALUE")
    assert err.count("\n") == 1


def test_misspelled_macro_fails_naming_it(capsys, tmp_path):
    rc, err = run(capsys, run_cli.train_main, *PRETRAIN, f"--gin.MODEL_DIR='{tmp_path}'",
                  "--gin.TRAIN_STEP=5")
    assert rc == 2
    assert err.startswith("gqa-train: error: --gin.TRAIN_STEP=5: no configurable reads the "
                          "macro TRAIN_STEP; did you mean TRAIN_STEPS?")
    assert not os.listdir(tmp_path)


def test_macro_unused_by_these_files_fails(capsys, tmp_path):
    # EVAL_SPLIT is a macro of runs/eval.gin; runs/pretrain.gin reads none of that name.
    rc, err = run(capsys, run_cli.train_main, *PRETRAIN, f"--gin_bindings=MODEL_DIR='{tmp_path}'",
                  "--gin_bindings=EVAL_SPLIT='test'")
    assert rc == 2
    assert "--gin.EVAL_SPLIT='test': no configurable reads the macro EVAL_SPLIT" in err


def test_error_inside_the_run_is_one_line_naming_the_configurable(capsys, tmp_path):
    rc, err = run(capsys, run_cli.eval_main, "--gin_file=runs/eval.gin",
                  f"--gin.MODEL_DIR='{tmp_path}'", "--gin.MIXTURE_OR_TASK_NAME='synthetic_qa'")
    assert rc == 2
    assert err == (f"gqa-eval: error: MODEL_DIR {tmp_path} holds no complete checkpoint_<step>/; "
                   "set CHECKPOINT_PATH (in gin configurable evaluate)\n")


def test_verbose_adds_the_traceback(capsys, tmp_path):
    rc, err = run(capsys, run_cli.train_main, *PRETRAIN, f"--gin.MODEL_DIR='{tmp_path}'",
                  "--gin.BATCH_SIZE='eight'", "--verbose")
    assert rc == 2
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("gqa-train: error: gqa_t5x.train.train.batch_size")


@pytest.mark.parametrize("main", [run_cli.train_main, run_cli.eval_main, run_cli.infer_main])
def test_help_lists_gin_files_macros_and_an_example(capsys, main):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("models/", "tiny.gin", "attention/", "mqa.gin", "runs/pretrain.gin:",
                 "runs/eval.gin:", "runs/infer.gin:", "runs/finetune.gin:",
                 "runs/uptrain.gin (and those of runs/pretrain.gin):", "MODEL_DIR*",
                 "INITIAL_CHECKPOINT_PATH*", "INFER_OUTPUT_PATH*", "--gin.NAME=VALUE",
                 "example:", "--verbose"):
        assert name in out, name


@pytest.mark.slow
def test_library_noise_is_held_back_unless_verbose(tmp_path):
    """A failing run prints one line; with --verbose TensorFlow's start-up lines come too."""
    command = [sys.executable, "-c", "import sys; from gqa_t5x.cli.run import train_main; "
               "sys.exit(train_main())", *PRETRAIN, "--gin.BATCH_SIZE='eight'",
               f"--gin.MODEL_DIR='{tmp_path}'"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    quiet_run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert quiet_run.returncode == 2
    assert quiet_run.stderr.splitlines() == [
        "gqa-train: error: gqa_t5x.train.train.batch_size = %BATCH_SIZE = 'eight': expected "
        "int; bind --gin.BATCH_SIZE=VALUE"]
    loud = subprocess.run(command + ["--verbose"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert loud.returncode == 2
    assert "Traceback" in loud.stderr
    assert len(loud.stderr.splitlines()) > 5


def test_initial_checkpoint_with_the_pretrain_file_is_refused(capsys, tmp_path):
    rc, err = run(capsys, run_cli.train_main, *PRETRAIN, f"--gin.MODEL_DIR='{tmp_path}'",
                  f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path}/converted'")
    assert rc == 2
    assert err.startswith(f"gqa-train: error: --gin.INITIAL_CHECKPOINT_PATH='{tmp_path}/converted'"
                          ": no configurable reads the macro INITIAL_CHECKPOINT_PATH;")
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_train_steps_below_the_checkpoint_is_refused_and_config_gin_kept(capsys, tmp_path):
    import toy_tasks  # noqa: PLC0415 - registers the toy task

    toy_tasks.enable_compilation_cache()
    task = toy_tasks.register()
    lengths = toy_tasks.LENGTHS
    args = [*PRETRAIN, f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
            f"--gin.TASK_FEATURE_LENGTHS={lengths}", "--gin.BATCH_SIZE=8",
            f"--gin.gqa_t5x.models.model_config.vocab_size={toy_tasks.VOCAB_SIZE}",
            "--gin.CHECKPOINT_EVERY=5", "--gin.LOG_EVERY=5"]
    assert run(capsys, run_cli.train_main, *args, "--gin.TRAIN_STEPS=5")[0] == 0
    first = (tmp_path / "config.gin").read_text()
    assert "TRAIN_STEPS = 5" in first
    gin.clear_config()
    rc = run_cli.train_main([*args, "--gin.TRAIN_STEPS=10"])
    out = capsys.readouterr().out
    assert rc == 0
    assert (f"config.gin: the gin configuration differs from the recorded one (TRAIN_STEPS); the "
            f"recorded one is kept as {tmp_path}/config.before_step_5.gin") in out
    assert (tmp_path / "config.before_step_5.gin").read_text() == first
    assert "TRAIN_STEPS = 10" in (tmp_path / "config.gin").read_text()
    second = (tmp_path / "config.gin").read_bytes()
    gin.clear_config()
    rc, err = run(capsys, run_cli.train_main, *args, "--gin.TRAIN_STEPS=3")
    assert rc == 2
    assert err.startswith(f"gqa-train: error: MODEL_DIR {tmp_path} is at step 10, past "
                          "train_steps (TRAIN_STEPS) = 3: give TRAIN_STEPS of at least 10, or "
                          "another MODEL_DIR")
    assert err.count("\n") == 1
    assert (tmp_path / "config.gin").read_bytes() == second
