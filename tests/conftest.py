"""Shared test setup. This folder is on sys.path (pytest puts a rootdir conftest's folder there), so
tests in the package folders import the helpers here: `numpy_t5` (a numpy T5.1.1) and
`toy_tasks` (tiny seqio tasks).

The model, decoding and training tests run the XLA path, the one TPU and GPU users run: configs
keep their default `kernels="auto"`, and here "auto" never takes the compiled CPU kernels. A test
that is about the kernels opts in with `@pytest.mark.cpu_kernels` (then "auto" chooses as it does
for users), or asks for them by name with `kernels="cpu"`; the `kernels` fixture parametrizes a
test over both paths.
"""

import os
import shutil

import jax
import pytest

from gqa_t5x.model import kernel_choice

KERNELS_AVAILABLE = (shutil.which(os.environ.get("CXX", "c++")) is not None
                     and jax.default_backend() == "cpu")
needs_cpu_kernels = pytest.mark.skipif(not KERNELS_AVAILABLE,
                                       reason="needs a C++ compiler and the CPU backend")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_kernels: let kernels='auto' take the compiled CPU "
                                       "kernels (other tests run XLA's ops)")


@pytest.fixture(autouse=True)
def _xla_path_unless_asked(request, monkeypatch):
    if request.node.get_closest_marker("cpu_kernels") is None:
        monkeypatch.setattr(kernel_choice, "_auto_applies", lambda: False)
        yield
        return
    # jit caches traces by function and arguments, not by what "auto" chose: start and end with
    # no traces, so that this test traces its own and later XLA-path tests cannot reuse them.
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture(params=["xla", pytest.param("cpu", marks=needs_cpu_kernels)])
def kernels(request):
    """Both implementations by name: "xla", and "cpu" where the kernels can be built."""
    return request.param
