"""What native code (TensorFlow's and XLA's C++ logging) writes to file descriptor 2, held back.

TensorFlow's C++ logging no longer follows `TF_CPP_MIN_LOG_LEVEL`, and Python cannot filter it:
the only way to keep an expected message (a device probe's `failed call to cuInit`, or
`PyFunc is stateful` when a pipeline that cannot be saved is asked to) off the terminal is to
point descriptor 2 elsewhere while the call runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


class Held:
    """The handle `held()` yields: `drop()` discards what was held back."""

    def __init__(self):
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True


@contextlib.contextmanager
def held():
    """Sends what is written to descriptor 2 during the block to a temporary file, and writes it
    to stderr after the block unless the block called `drop()` on the handle (an exception
    leaving the block always shows it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    handle = Held()
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        failed = False
        try:
            yield handle
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed or not handle.dropped:
                buffer.seek(0)
                sys.stderr.write(buffer.read().decode(errors="replace"))
                sys.stderr.flush()
