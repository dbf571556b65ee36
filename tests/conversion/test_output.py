"""gqa-convert loses nothing: what --force may replace, stale temporary folders, and SIGINT /
SIGTERM / SIGKILL while a tensorstore write is in flight.

Every refusal is checked for its message naming the path, the exit code, and that no byte of
the input or of unrelated files changed (a hash of every file under the test folder).
"""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gqa_t5x.checkpoints import load_checkpoint, save_checkpoint
from gqa_t5x.checkpoints.t5x import unflatten
from gqa_t5x.cli import convert as convert_cli
from gqa_t5x.model.config import TransformerConfig, with_kv_heads
from gqa_t5x.model.shapes import param_shapes

CONFIG = TransformerConfig(vocab_size=40, emb_dim=16, num_heads=4, num_kv_heads=4, head_dim=4,
                           mlp_dim=24, num_encoder_layers=1, num_decoder_layers=1,
                           relative_attention_num_buckets=8)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_source(directory):
    rng = np.random.default_rng(0)
    params = {p: rng.normal(size=s).astype(np.float32) for p, s in param_shapes(CONFIG).items()}
    save_checkpoint(str(directory), unflatten(params), CONFIG, step=5)


def snapshot(root):
    """{relative path: sha256} of every file under `root`."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_cli(capsys, *args):
    rc = convert_cli.main([*args, "--num_kv_heads", "2"])
    return rc, capsys.readouterr().err


def test_force_refuses_a_folder_that_holds_the_input(tmp_path, capsys):
    write_source(tmp_path / "proj" / "hf_model")
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, "--input", str(tmp_path / "proj" / "hf_model"),
                      "--output", str(tmp_path / "proj"), "--force")
    assert rc == 1
    assert f"output {tmp_path / 'proj'} contains the input {tmp_path / 'proj' / 'hf_model'}" \
        in err
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path / "proj")) == ["hf_model", "notes.txt"]


def test_force_refuses_the_current_folder(tmp_path, capsys, monkeypatch):
    write_source(tmp_path / "src")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for cwd, output in ((work, "."), (work / "sub", "..")):
        monkeypatch.chdir(cwd)
        rc, err = run_cli(capsys, "--input", str(tmp_path / "src"), "--output", output,
                          "--force")
        assert rc == 1
        assert f"output {work} is the current folder or one of its parents" in err
        assert snapshot(tmp_path) == before


def test_force_refuses_a_folder_with_other_files(tmp_path, capsys):
    write_source(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, "--input", str(tmp_path / "src"), "--output",
                      str(tmp_path / "out"), "--force")
    assert rc == 1
    assert f"output {tmp_path / 'out'} holds files that no conversion wrote (notes.txt)" in err
    assert snapshot(tmp_path) == before


def test_force_refuses_a_plain_file(tmp_path, capsys):
    write_source(tmp_path / "src")
    (tmp_path / "out").write_text("not a folder")
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, "--input", str(tmp_path / "src"), "--output",
                      str(tmp_path / "out"), "--force")
    assert rc == 1
    assert f"output {tmp_path / 'out'} is a file, not a folder" in err
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no .out.tmp-* left


def test_force_replaces_an_earlier_conversion_or_an_empty_folder(tmp_path, capsys):
    write_source(tmp_path / "src")
    before = snapshot(tmp_path / "src")
    (tmp_path / "out").mkdir()
    for kv in ("1", "2"):  # an empty folder, then the first conversion's folder
        assert convert_cli.main(["--input", str(tmp_path / "src"), "--output",
                                 str(tmp_path / "out"), "--num_kv_heads", kv, "--force"]) == 0
    assert load_checkpoint(str(tmp_path / "out"))[1] == with_kv_heads(CONFIG, 2)
    assert snapshot(tmp_path / "src") == before
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_a_rerun_removes_stale_temporary_folders_of_the_same_output(tmp_path, capsys):
    write_source(tmp_path / "src")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = int(finished.stdout)
    stale = [f".out.tmp-{dead}-0123abcd", ".out.tmp-89abcdef", ".out.tmp-1a2b3c4d.old"]
    kept = [f".out.tmp-{os.getppid()}-0123abcd",  # a conversion still running
            ".other.tmp-0123abcd", "notes.txt"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    rc, _ = run_cli(capsys, "--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"))
    assert rc == 0
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out", "src"])


CHILD = textwrap.dedent("""
    import sys, threading, time
    from gqa_t5x.checkpoints import native
    from gqa_t5x.cli import convert

    original, calls = native.write_zarr, []

    def write_zarr(directory, array):
        # The third array is written on another thread while the main thread waits, so the
        # signal arrives with tensorstore's writes in flight.
        calls.append(directory)
        if len(calls) != 3:
            return original(directory, array)
        out = {}
        writer = threading.Thread(target=lambda: out.update(m=original(directory, array)))
        writer.start()
        print("pending", flush=True)
        time.sleep(1.5)
        writer.join()
        return out["m"]

    native.write_zarr = write_zarr
    sys.exit(convert.main(sys.argv[1:]))
""")


def start_child(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "--input", str(tmp_path / "src"), "--output",
         str(tmp_path / "out"), "--num_kv_heads", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "pending", child.stderr.read()
    return child


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_wait_for_the_write_then_clean_up(tmp_path, signum, code):
    write_source(tmp_path / "src")
    before = snapshot(tmp_path)
    child = start_child(tmp_path)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    assert f"interrupted by {signal.Signals(signum).name}; removed the partial output " \
           f"{tmp_path}/.out.tmp-{child.pid}-" in err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.slow
def test_after_sigkill_the_rerun_removes_what_was_left(tmp_path, capsys):
    write_source(tmp_path / "src")
    before = snapshot(tmp_path / "src")
    child = start_child(tmp_path)
    child.kill()
    child.communicate(timeout=60)
    left = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
    assert left == [next(n for n in left if n.startswith(f".out.tmp-{child.pid}-"))]
    rc, _ = run_cli(capsys, "--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"))
    assert rc == 0
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]
    assert snapshot(tmp_path / "src") == before
    assert load_checkpoint(str(tmp_path / "out"))[1] == with_kv_heads(CONFIG, 2)
