"""A memory plan by compilation: what the train, eval and decode steps need per device.

`memory_plan` builds a model for a preset, a kv-head count and lengths, lays it on a virtual CPU
mesh of data x model devices, and lowers and compiles the three steps with abstract inputs
(`jax.ShapeDtypeStruct`s carrying their shardings: nothing is allocated). Per device it reports
XLA's memory analysis of the partitioned program (`compiled.memory_analysis()`: argument, output,
aliased and temporary bytes) beside analytic sizes from the shardings themselves (parameters,
optimizer state, batch, decode cache) and a rough activation estimate.

The compiled program is the CPU backend's; a TPU compile fuses differently, so temporaries are an
estimate of the TPU's, while the argument sizes (parameters, optimizer state, cache) are exact
for any backend with the same shardings.

The analytic activation estimate counts, per layer and token, the float values a backward pass
keeps without rematerialization: the residual stream and its norm (2 D), queries, keys, values and
the attention output ((2 N + 2 K) H), the attention weights (N x keys), and the gated MLP (3 F),
split over the model axis where those are sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from gqa_t5x.model import attention, decoding
from gqa_t5x.model.config import get_config
from gqa_t5x.training import models, optim, partitioning, train, train_state

STAGES = ("train", "eval", "decode")
TPU_V4_HBM = 32 * 2**30  # bytes per TPUv4 chip

# The paper's settings: T5.1.1-XXL as MHA, GQA-8 and MQA; (inputs, targets, global batch) for
# long-input fine-tuning (2048/512, batch 128) and uptraining (512/114, batch 2048). The paper
# gives no pod shape for training; 8-way model parallelism (t5x's XXL setting) over 256 chips.
PAPER_KV_HEADS = (("MHA", 64), ("GQA-8", 8), ("MQA", 1))
PAPER_SHAPES = ((2048, 512, 128), (512, 114, 2048))
PAPER_MESH = (32, 8)  # data x model


def ensure_cpu_devices(count: int) -> list[jax.Device]:
    """`count` CPU devices; asks jax for that many virtual ones if no backend is up yet."""
    try:
        jax.config.update("jax_num_cpu_devices", max(count, 1))
    except RuntimeError:
        pass  # backends already initialized: use what is there
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ValueError(
            f"the plan needs {count} CPU devices (data x model) but this process has "
            f"{len(devices)}; run it in a fresh process (gqa-plan does), or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax starts")
    return devices[:count]


@dataclasses.dataclass
class StageMemory:
    """Per-device bytes of one compiled step."""

    stage: str
    analytic: dict[str, int]  # parameters, optimizer_state, batch, cache, activations_estimate
    # XLA's memory analysis; None when the stage was not compiled (`compile=False`).
    arguments: int | None = None  # inputs XLA keeps (parameters, optimizer state, batch, cache)
    outputs: int | None = None
    aliased: int | None = None  # outputs written in donated inputs
    temporaries: int | None = None  # intermediate buffers (activations, workspaces)
    code: int | None = None
    compile_seconds: float | None = None

    @property
    def peak(self) -> int | None:
        """Arguments + outputs not aliased to them + temporaries: live at once at worst."""
        if self.arguments is None:
            return None
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def analytic_total(self) -> int:
        return sum(self.analytic.values())


@dataclasses.dataclass
class MemoryPlan:
    preset: str
    num_kv_heads: int
    input_length: int
    target_length: int
    batch_size: int
    data: int
    model: int
    dtype: str
    stages: list[StageMemory]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for stage, s in zip(d["stages"], self.stages):
            stage["peak"] = s.peak
        return d

    def format(self, hbm_bytes: int = TPU_V4_HBM) -> str:
        """A table per stage; GiB, MiB or KiB by the largest peak."""
        largest = max([s.peak or s.analytic_total for s in self.stages], default=0)
        unit, scale = next((u, v) for u, v in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
                           if largest >= v or u == "KiB")
        head = (f"{self.preset}, {self.num_kv_heads} kv heads, {self.input_length}/"
                f"{self.target_length}, batch {self.batch_size}, mesh {self.data} data x "
                f"{self.model} model, {self.dtype}; {unit} per device")
        cols = ("stage", "params", "opt", "batch", "cache", "act est", "sum", "XLA args",
                "XLA temp", "XLA peak", f"of {hbm_bytes / 2**30:.0f} GiB", "compile s")
        rows = []
        for s in self.stages:
            a = s.analytic
            cells = [a["parameters"], a["optimizer_state"], a["batch"], a["cache"],
                     a["activations_estimate"], s.analytic_total, s.arguments, s.temporaries,
                     s.peak]
            worst = s.peak if s.peak is not None else s.analytic_total
            rows.append((s.stage, *("-" if c is None else f"{c / scale:.2f}" for c in cells),
                         f"{100 * worst / hbm_bytes:.1f}%",
                         "-" if s.compile_seconds is None else f"{s.compile_seconds:.0f}"))
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings (the largest
    shard when shards are uneven; replicated leaves count whole)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _activation_estimate(config, batch: int, s: int, t: int, data: int, model: int,
                         rules) -> int:
    """The module docstring's count, in the activation dtype, per device."""
    table = dict(rules)
    split = {name: model if table.get(name) else 1 for name in ("heads", "kv_heads", "mlp")}
    n, h, f, d = config.num_heads, config.head_dim, config.mlp_dim, config.emb_dim
    kv = {kind: config.kv_heads(kind) for kind in ("encoder_self", "decoder_self", "cross")}

    def attn(kv_heads, keys):  # per query token
        return (2 * n * h) / split["heads"] + 2 * kv_heads * h / split["kv_heads"] + \
            n * keys / split["heads"]

    mlp = 3 * f / split["mlp"]
    enc = config.num_encoder_layers * s * (2 * d + attn(kv["encoder_self"], s) + 2 * d + mlp)
    dec = config.num_decoder_layers * t * (3 * 2 * d + attn(kv["decoder_self"], t)
                                           + attn(kv["cross"], s) + mlp)
    logits = t * config.vocab_size / model  # the vocabulary is sharded over model
    itemsize = jnp.dtype(config.activation_dtype).itemsize
    return int((enc + dec) * batch / data * itemsize + logits * batch / data * 4)


def _stage(name, jitted, args, analytic, compile_: bool) -> StageMemory:
    if not compile_:
        return StageMemory(stage=name, analytic=analytic)
    start = time.perf_counter()
    m = jitted.lower(*args).compile().memory_analysis()
    return StageMemory(stage=name, analytic=analytic, arguments=int(m.argument_size_in_bytes),
                       outputs=int(m.output_size_in_bytes), aliased=int(m.alias_size_in_bytes),
                       temporaries=int(m.temp_size_in_bytes),
                       code=int(m.generated_code_size_in_bytes),
                       compile_seconds=time.perf_counter() - start)


def memory_plan(preset: str, *, num_kv_heads: int | None = None, input_length: int = 512,
                target_length: int = 114, batch_size: int = 8, data: int = 1, model: int = 1,
                dtype: str = "bfloat16", stages: Sequence[str] = STAGES, compile: bool = True,
                progress=None, **overrides) -> MemoryPlan:
    """Compiles `stages` of `preset` (with `num_kv_heads`, default MHA, and `overrides` of the
    config) on `data` x `model` virtual CPU devices; returns their per-device memory. With
    `compile=False` only the analytic sizes (abstract evaluation: seconds even for XXL).

    `progress(message)` is called before each compile (they take minutes at XXL scale).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    config = get_config(preset, dtype=dtype, **overrides)
    if num_kv_heads is not None:
        config = config.replace(num_kv_heads=num_kv_heads)
    devices = ensure_cpu_devices(data * model)
    mesh = partitioning.create_mesh(model, devices)
    partitioning.check_batch_size(batch_size, mesh)
    rules = partitioning.rules_for(config, mesh)
    net = models.build_model(config)
    tx = optim.adafactor()
    b, s, t = batch_size, input_length, target_length
    state, shardings = train_state.abstract_train_state(
        net, tx, mesh, {"encoder_input_tokens": (1, s), "decoder_input_tokens": (1, t)})
    rows = partitioning.batch_sharding(mesh)
    batch = {"encoder_input_tokens": _abstract((b, s), jnp.int32, rows),
             "decoder_input_tokens": _abstract((b, t), jnp.int32, rows),
             "decoder_target_tokens": _abstract((b, t), jnp.int32, rows),
             "decoder_loss_weights": _abstract((b, t), jnp.float32, rows)}
    base = {"parameters": per_device_bytes(state.params), "optimizer_state": 0,
            "batch": per_device_bytes(batch), "cache": 0, "activations_estimate": 0}
    say = progress if progress is not None and compile else (lambda message: None)
    out = []
    with partitioning.activation_rules(mesh, rules):
        if "train" in stages:
            say(f"compiling the train step of {preset} ({config.num_kv_heads} kv heads)")
            step_fn = train.jit_train_step(net, tx, optim.rsqrt_schedule(),
                                           jax.random.PRNGKey(0), shardings, mesh)
            analytic = dict(base, optimizer_state=per_device_bytes(state.opt_state),
                            activations_estimate=_activation_estimate(config, b, s, t, data,
                                                                      model, rules))
            out.append(_stage("train", step_fn, (state, batch), analytic, compile))
        if "eval" in stages:
            say(f"compiling the eval step of {preset}")
            eval_fn = jax.jit(net.eval_fn, in_shardings=(shardings.params, rows))
            out.append(_stage("eval", eval_fn, (state.params, batch), base, compile))
        if "decode" in stages:
            say(f"compiling the decode step of {preset}")
            step, args = _decode_step(net, state.params, shardings.params, mesh, rules, b, s, t)
            analytic = dict(base, batch=per_device_bytes(args[2:]),  # encoded, tokens
                            cache=per_device_bytes(args[1]))
            out.append(_stage("decode", step, args, analytic, compile))
    return MemoryPlan(preset=preset, num_kv_heads=config.num_kv_heads, input_length=s,
                      target_length=t, batch_size=b, data=data, model=model, dtype=dtype,
                      stages=out)


def _decode_step(net, params, param_shardings, mesh, rules, b, s, t):
    """One decode step at full cache length t (self-attention [B, K, t, H], cross [B, K, s, H]):
    (jitted step, abstract arguments (params, cache, encoded, encoder tokens, last tokens))."""
    module, config = net.module, net.config
    rows = partitioning.batch_sharding(mesh)
    act = jnp.dtype(config.activation_dtype)
    encoded = _abstract((b, s, config.emb_dim), act, rows)
    tokens = _abstract((b, s), jnp.int32, rows)
    cache = jax.eval_shape(lambda p, e, x: decoding.init_cache(module, p, e, x,
                                                               max_decode_length=t),
                           params, encoded, tokens)

    def cache_sharding(x):
        if x.ndim == 4:  # [B, K, L, H]
            axes = attention.kv_axes(config.num_heads, x.shape[1])[1]
            spec = partitioning.mesh_axes(axes, x.shape, mesh, rules)
            return _abstract(x.shape, x.dtype, NamedSharding(mesh, spec))
        return _abstract(x.shape, x.dtype, partitioning.replicated(mesh))

    cache = jax.tree_util.tree_map(cache_sharding, cache)
    step = jax.jit(functools.partial(decoding.decode_step, module, max_decode_length=t),
                   in_shardings=(param_shardings, jax.tree_util.tree_map(
                       lambda x: x.sharding, cache), rows, rows, rows),
                   donate_argnums=1)
    last = _abstract((b,), jnp.int32, rows)
    return step, (params, cache, encoded, tokens, last)


def paper_plans(preset: str = "t5_1_1_xxl", *, data: int = PAPER_MESH[0],
                model: int = PAPER_MESH[1], compile: bool = True, progress=None,
                stages: Sequence[str] = STAGES) -> list[MemoryPlan]:
    """`memory_plan` for every setting in PAPER_KV_HEADS x PAPER_SHAPES (kv heads scaled to the
    preset's head count: GQA-8 stays 8 groups, MQA 1)."""
    heads = get_config(preset).num_heads
    plans = []
    for name, kv in PAPER_KV_HEADS:
        for s, t, b in PAPER_SHAPES:
            if progress is not None:
                progress(f"{name} {s}/{t} batch {b}")
            plans.append(memory_plan(preset, num_kv_heads=heads if name == "MHA" else kv,
                                     input_length=s, target_length=t, batch_size=b, data=data,
                                     model=model, compile=compile, progress=progress,
                                     stages=stages))
    return plans
