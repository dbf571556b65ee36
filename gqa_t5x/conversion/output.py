"""Where a conversion writes, so that nothing is lost: the checks before `--force` replaces a
folder, the hidden temporary folder the output is built in, and SIGINT/SIGTERM handling.

The converter builds its output in a hidden sibling `.<name>.tmp-<pid>-<hex>` and renames it to
the output path once complete, so a crash leaves nothing at the output path. What a crash does
leave (a `kill -9`, a power cut) is that hidden folder: the next conversion to the same output
removes the ones whose process is gone.

`--force` replaces only what a conversion (or `save_checkpoint`) wrote: an empty folder, or one
holding our `config.json` / `conversion.json` and `checkpoint_<step>/` folders and nothing else.
It never replaces a plain file, the current folder or one of its parents, or a folder holding
the input.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import uuid

from gqa_t5x.checkpoints import CONFIG_FILE, STEP_PREFIX
from gqa_t5x.checkpoints.t5x import read_json

CONVERSION_FILE = "conversion.json"
_OURS = re.compile(rf"({re.escape(CONFIG_FILE)}|{re.escape(CONVERSION_FILE)}|"
                   rf"{STEP_PREFIX}\d+)")
_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class ConversionInterrupted(Exception):
    """SIGINT or SIGTERM arrived during a conversion; the partial output was removed."""

    def __init__(self, signum: int, removed: str):
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(f"interrupted by {_SIGNAL_NAMES.get(signum, signum)}; removed the "
                         f"partial output {removed}")


def _contains(folder: str, path: str) -> bool:
    """Whether `path` is `folder` or lies inside it (both absolute, symlinks resolved)."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return os.path.commonpath([folder, path]) == folder


def _is_our_output(folder: str) -> bool:
    names = os.listdir(folder)
    if not names:
        return True
    if not all(_OURS.fullmatch(n) for n in names):
        return False
    if CONVERSION_FILE in names:
        return True
    config_file = os.path.join(folder, CONFIG_FILE)
    try:
        return os.path.isfile(config_file) and "emb_dim" in read_json(config_file)
    except (OSError, ValueError):
        return False


def check_output(input_path: str, output_path: str, force: bool) -> None:
    """Raise FileExistsError or ValueError, naming the path, unless converting `input_path` to
    `output_path` (with `force`) can lose nothing (see the module docstring)."""
    output = os.path.abspath(output_path)
    if _contains(output, input_path):
        what = "is the input" if os.path.realpath(output) == os.path.realpath(input_path) else \
            f"contains the input {os.path.abspath(input_path)}"
        raise ValueError(f"output {output} {what}; write to another folder")
    if not os.path.lexists(output):
        return
    if not force:
        raise FileExistsError(f"output {output} already exists; pass --force to replace it")
    if not os.path.isdir(output) or os.path.islink(output):
        raise FileExistsError(f"output {output} is a file, not a folder; --force replaces only "
                              f"an earlier conversion's folder: remove it or choose another "
                              f"--output")
    if _contains(output, os.getcwd()):
        raise ValueError(f"output {output} is the current folder or one of its parents; "
                         f"--force will not replace it: choose another --output")
    if not _is_our_output(output):
        others = sorted(n for n in os.listdir(output) if not _OURS.fullmatch(n))
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise FileExistsError(
            f"output {output} holds files that no conversion wrote ({shown or 'no config.json'}"
            f"); --force replaces only an earlier conversion's folder: remove them or choose "
            f"another --output")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output_path: str) -> list[str]:
    """Remove the hidden `.<name>.tmp-*` folders that earlier conversions to `output_path`
    left when they were killed (those whose process no longer runs); returns them."""
    parent, name = os.path.split(os.path.abspath(output_path))
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-(?:(\d+)-)?[0-9a-f]+(?:\.old)?")
    removed = []
    for entry in sorted(os.listdir(parent)):
        match = pattern.fullmatch(entry)
        if not match or (match.group(1) and _pid_alive(int(match.group(1)))
                         and int(match.group(1)) != os.getpid()):
            continue
        path = os.path.join(parent, entry)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def temporary_path(output_path: str) -> str:
    """The hidden sibling folder the output is built in; it names this process."""
    parent, name = os.path.split(os.path.abspath(output_path))
    return os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace(tmp: str, output_path: str) -> None:
    """Move the complete `tmp` to `output_path`, removing what `check_output` allowed to be
    replaced only after the new output is in place."""
    if not os.path.lexists(output_path):
        os.rename(tmp, output_path)
        return
    old = f"{tmp}.old"
    os.rename(output_path, old)
    os.rename(tmp, output_path)
    shutil.rmtree(old)


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`; the converter calls `check()`
    between arrays, so a signal never cuts a tensorstore write short (cleaning up under a write
    still in flight leaves files behind, or fails with 'Directory not empty')."""

    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            print(f"{_SIGNAL_NAMES.get(signum, signum)}: stopping after the array being "
                  f"written", file=sys.stderr, flush=True)
        self.signum = signum

    @contextlib.contextmanager
    def active(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are delivered to the main thread only
            return
        previous = {s: signal.signal(s, self._handle) for s in _SIGNAL_NAMES}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self, tmp: str) -> None:
        """Raise ConversionInterrupted if a signal came; the caller removes `tmp`."""
        if self.signum is not None:
            raise ConversionInterrupted(self.signum, tmp)
