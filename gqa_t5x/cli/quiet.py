"""What the console scripts do not show unless `--verbose`: the log output of the libraries under
them (TensorFlow's and XLA's C++ start-up lines such as `failed call to cuInit` on a machine
without a GPU, absl's Python logging that orbax writes to, deprecation warnings).

TensorFlow's C++ logging no longer follows `TF_CPP_MIN_LOG_LEVEL`, so its start-up lines are
held back by pointing file descriptor 2 at a temporary file while TensorFlow and jax are first
imported and TensorFlow probes its devices; if that fails, what they wrote is shown after all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings


@contextlib.contextmanager
def held_back_native_stderr():
    """Send what native code writes to stderr to a temporary file; replay it on an error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def silence_libraries() -> None:
    """Import TensorFlow and jax with their start-up output held back, and quiet absl logging
    and library warnings for the rest of the process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with held_back_native_stderr():
        import jax  # noqa: F401, PLC0415
        import tensorflow  # noqa: PLC0415

        tensorflow.config.list_physical_devices()  # TensorFlow's device probe logs (cuInit)
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
