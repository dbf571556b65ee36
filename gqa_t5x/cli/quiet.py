"""What the console scripts do not show unless `--verbose`: the log output of the libraries under
them (TensorFlow's and XLA's C++ start-up lines such as `failed call to cuInit` on a machine
without a GPU, absl's Python logging that orbax writes to, deprecation warnings).

TensorFlow's C++ logging no longer follows `TF_CPP_MIN_LOG_LEVEL`, so its start-up lines are
held back by pointing file descriptor 2 at a temporary file while TensorFlow and jax are first
imported and TensorFlow probes its devices; if that fails, what they wrote is shown after all.
"""

from __future__ import annotations

import logging
import os
import warnings

from gqa_t5x import native_stderr


def silence_libraries() -> None:
    """Import TensorFlow and jax with their start-up output held back, and quiet absl logging
    and library warnings for the rest of the process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr.held() as output:
        import jax  # noqa: F401, PLC0415
        import tensorflow  # noqa: PLC0415

        tensorflow.config.list_physical_devices()  # TensorFlow's device probe logs (cuInit)
        output.drop()
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
