"""`TransformerConfig.kernels`: "xla" never touches the CPU kernels, "auto" falls back to XLA's
ops with one warning, "cpu" fails naming the reason; importing the model compiles nothing; and
the XLA path has every autodiff mode (`jax.jvp` too)."""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.kernels import cpu as cpu_kernels
from gqa_t5x.model import attention, kernel_choice, layers
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

CFG = TransformerConfig(vocab_size=30, emb_dim=16, num_heads=4, num_kv_heads=2, head_dim=4,
                        mlp_dim=24, num_encoder_layers=1, num_decoder_layers=1,
                        relative_attention_num_buckets=8, relative_attention_max_distance=12)
FEW = jnp.ones((2, 1, 16), jnp.float32)  # a decode step's rows
W = jnp.ones((16, 8), jnp.float32)


def _no_kernels(monkeypatch, reason):
    """Make building or loading the kernels fail with `reason`, as an old jax or no compiler do."""
    def register():
        raise AttributeError(reason)

    monkeypatch.setattr(cpu_kernels, "register", register)
    monkeypatch.setattr(kernel_choice, "_load", kernel_choice._load.__wrapped__)


def _forbid_kernels(monkeypatch):
    def fail():
        raise AssertionError("the CPU kernels were looked up")

    monkeypatch.setattr(kernel_choice, "_load", fail)


def test_config_rejects_unknown_kernels_and_cpu_kernels_off_float32():
    with pytest.raises(ValueError, match=r"kernels='tpu' is not one of \('auto', 'xla', 'cpu'\)"):
        CFG.replace(kernels="tpu")
    with pytest.raises(ValueError, match="kernels='cpu' needs dtype='float32'.*bfloat16"):
        CFG.replace(kernels="cpu", dtype="bfloat16")
    assert TransformerConfig.from_json(CFG.replace(kernels="xla").to_json()).kernels == "xla"
    assert TransformerConfig.from_dict({}).kernels == "auto"  # configs saved before the field


def test_tests_run_the_xla_path_unless_marked(monkeypatch):
    _forbid_kernels(monkeypatch)
    assert kernel_choice.cpu_kernels("auto") is None  # tests/conftest.py pins "auto" to XLA


@pytest.mark.cpu_kernels
def test_xla_never_looks_the_kernels_up(monkeypatch):
    _forbid_kernels(monkeypatch)
    assert kernel_choice.cpu_kernels("xla") is None
    module = Transformer(CFG.replace(kernels="xla"))
    tokens = jnp.ones((2, 3), jnp.int32)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), tokens, tokens, tokens)
    step = jax.jit(module.apply)(params, tokens, tokens[:, :1], tokens[:, :1])  # one-token rows
    assert step.shape == (2, 1, 30)
    layers.dense(FEW, W)  # the functions' default is "xla"
    attention.dot_product_attention(jnp.ones((2, 1, 4, 4)), jnp.ones((2, 2, 3, 4)),
                                    jnp.ones((2, 2, 3, 4)))


@pytest.mark.cpu_kernels
def test_auto_takes_no_kernels_off_single_device_cpu_or_float32(monkeypatch):
    _forbid_kernels(monkeypatch)
    layers.dense(FEW.astype(jnp.bfloat16), W.astype(jnp.bfloat16), "auto")  # not float32
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # a multi-device mesh
    assert kernel_choice.cpu_kernels("auto") is None
    layers.dense(FEW, W, "auto")
    with pytest.raises(ValueError, match="kernels='cpu' needs a single-device CPU run, this one "
                                         "has 8 cpu device"):
        layers.dense(FEW, W, "cpu")


@pytest.mark.cpu_kernels
def test_auto_falls_back_to_xla_with_one_warning_when_the_kernels_fail(monkeypatch):
    _no_kernels(monkeypatch, "module 'jax' has no attribute 'ffi' (a test's old jax)")
    with pytest.warns(UserWarning, match="kernels='auto' uses XLA's ops .*no attribute 'ffi'"):
        y = jax.jit(layers.dense, static_argnums=2)(FEW, W, "auto")
    np.testing.assert_allclose(y, np.full((2, 1, 8), 16.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second trace warns no more
        jax.jit(lambda x, w: layers.dense(x, w, "auto") * 2)(FEW, W)
    with pytest.raises(RuntimeError, match="kernels='cpu': the CPU kernels could not be built "
                                           "or loaded .*AttributeError: module 'jax'"):
        layers.dense(FEW, W, "cpu")


def test_importing_the_model_imports_no_kernels():
    code = ("import sys, jax, jax.numpy as jnp; import gqa_t5x; "
            "from gqa_t5x.model.network import Transformer; "
            "from gqa_t5x.model.config import TransformerConfig as C; "
            "assert 'gqa_t5x.kernels' not in sys.modules; "
            "m = Transformer(C(vocab_size=8, emb_dim=8, num_heads=2, num_kv_heads=1, head_dim=4, "
            "mlp_dim=8, num_encoder_layers=1, num_decoder_layers=1, kernels='xla')); "
            "t = jnp.ones((1, 2), jnp.int32); m.init(jax.random.PRNGKey(0), t, t, t); "
            "assert 'gqa_t5x.kernels' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- the XLA path: every autodiff mode ---------------------------------------------------------


def test_dense_forward_mode_matches_numpy():
    rng = np.random.default_rng(0)
    x, dx = (rng.standard_normal((3, 2, 5), dtype=np.float32) for _ in range(2))
    w, dw = (rng.standard_normal((5, 7), dtype=np.float32) for _ in range(2))
    y, dy = jax.jvp(layers.dense, (x, w), (dx, dw))
    x, dx, w, dw = (np.asarray(a, np.float64) for a in (x, dx, w, dw))
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, dx @ w + x @ dw, rtol=1e-5, atol=1e-5)  # the product rule


@pytest.mark.slow
def test_network_forward_mode_matches_finite_differences():
    module = Transformer(CFG)  # "auto", which the tests keep on the XLA path
    enc = jnp.asarray([[3, 7, 2, 9], [5, 1, 8, 0]], jnp.int32)
    dec = jnp.asarray([[0, 4, 6], [0, 2, 11]], jnp.int32)
    # No target is 0: a fully masked query row's logits (-1e10 + x) round to a constant in
    # float32, which finite differences see and autodiff does not.
    tgt = jnp.asarray([[4, 6, 1], [2, 11, 1]], jnp.int32)
    params = module.init(jax.random.PRNGKey(0), enc, dec, tgt, enable_dropout=False)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * (jnp.std(x) + 0.1)
                                             for k, x in zip(keys, leaves)])
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 3, CFG.vocab_size))

    @jax.jit
    def loss(p):
        return jnp.sum(module.apply({"params": p}, enc, dec, tgt, enable_dropout=False) * weights)

    _, tangent = jax.jit(lambda p, d: jax.jvp(loss, (p,), (d,)))(params, direction)
    eps = 1e-3
    shifted = [jax.tree.map(lambda p, d, s=s: p + s * eps * d, params, direction)
               for s in (1, -1)]
    fd = (float(loss(shifted[0])) - float(loss(shifted[1]))) / (2 * eps)
    np.testing.assert_allclose(float(tangent), fd, rtol=1e-3)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what XLA's CPU backend compiles")
def test_dense_kernel_gradient_reads_g_where_it_lies():
    # The kernel's gradient over [B, T, I] tokens is one dot, with no transposed copy of g
    # (the [B, T, O] output gradient) before it.
    x = jnp.ones((4, 8, 16), jnp.float32)
    w = jnp.ones((16, 32), jnp.float32)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.dense(x, w))), argnums=1))
    hlo = grad.lower(x, w).compile().as_text()
    assert " dot(" in hlo
    assert " transpose(" not in hlo and " copy(" not in hlo


@pytest.mark.cpu_kernels
def test_auto_builds_nothing_for_many_rows(monkeypatch):
    _forbid_kernels(monkeypatch)  # a train step's products: more rows than the kernel takes
    many = jnp.ones((4, cpu_kernels.MAX_ROWS, 16), jnp.float32)
    np.testing.assert_allclose(layers.dense(many, W, "auto"), np.full((4, 32, 8), 16.0))
