"""gin/t5x/*.gin inside t5x's own runs: they parse together with t5x's run files, MODEL is a t5x
EncoderDecoderModel around our Transformer, and t5x.train trains it for two steps.

Skipped where t5x is not installed (it is not on PyPI; the normal CI case).
"""

import functools
import glob
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax.linen import partitioning as nn_partitioning

t5x = pytest.importorskip("t5x")
t5x_train = pytest.importorskip("t5x.train")
from t5x import adafactor, decoding  # noqa: E402
from t5x import models as t5x_models  # noqa: E402

from gqa_t5x.data import synthetic  # noqa: E402
from gqa_t5x.model import network  # noqa: E402 - synthetic registers the synthetic_* tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN_DIR = os.path.join(ROOT, "gqa_t5x", "gin")
T5X_RUNS = os.path.join(os.path.dirname(t5x.__file__), "configs", "runs")
BINDINGS = ["MODEL_DIR='unused_model_dir'", "TRAIN_STEPS=2", "BATCH_SIZE=2",
            "MIXTURE_OR_TASK_NAME='synthetic_qa'",
            "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"]


@pytest.fixture()
def t5x_gin(monkeypatch):
    """Parses model gins + t5x's pretrain.gin + t5x/synthetic.gin as `python -m t5x.train` would:
    t5x's run files bind `__main__.train`."""
    import __main__
    monkeypatch.setattr(__main__, "train", t5x_train.train, raising=False)
    gin.clear_config()

    def parse(*extra_files, bindings=()):
        files = [os.path.join(GIN_DIR, "models", "tiny.gin"),
                 os.path.join(GIN_DIR, "attention", "mqa.gin"),
                 os.path.join(GIN_DIR, "t5x", "model.gin"),
                 os.path.join(T5X_RUNS, "pretrain.gin"),
                 os.path.join(GIN_DIR, "t5x", "synthetic.gin"), *extra_files]
        gin.parse_config_files_and_bindings(files, BINDINGS + list(bindings))

    yield parse
    gin.clear_config()


def _macro(name):
    return gin.query_parameter("%" + name).scoped_configurable_fn()


def test_model_macro_is_a_t5x_model_around_our_transformer(t5x_gin):
    t5x_gin()
    model = _macro("MODEL")
    assert isinstance(model, t5x_models.EncoderDecoderModel)
    assert isinstance(model.module, network.Transformer)
    cfg = model.module.config
    assert (cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.num_decoder_layers) == (32, 4, 1, 2)
    assert cfg.vocab_size == 2176 and cfg.dropout_rate == 0.0
    # t5x creates the decode cache from dummy inputs; the first step fills the cross-attention
    # caches from the encoder output, so nothing needs recomputing.
    assert not model.module.recompute_cross_kv
    assert isinstance(model.optimizer_def, adafactor.Adafactor)
    # The model's vocabulary is the task's (t5x.train verifies they are equal); compared by file
    # and sentinels so that the SentencePiece model is not trained here.
    task_vocab = seqio.get_mixture_or_task("synthetic_qa").output_features[
        "inputs"].vocabulary
    for vocab in (model.input_vocabulary, model.output_vocabulary):
        assert vocab.sentencepiece_model_file == task_vocab.sentencepiece_model_file
        assert vocab.extra_ids == task_vocab.extra_ids == 100
    assert cfg.vocab_size >= synthetic.DEFAULT_CONFIG.vocab_size + 100


def test_partitioning_and_adafactor_rules_cover_every_parameter_axis(t5x_gin):
    t5x_gin()
    model = _macro("MODEL")
    shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4)}
    types = {k: jnp.int32 for k in shapes}
    variables = jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), shapes, types))
    names = {ax for axes in jax.tree_util.tree_leaves(
        variables["params_axes"], is_leaf=lambda x: hasattr(x, "names"))
        for ax in axes.names}
    assert "kv_joined" in names
    # What t5x's PjitPartitioner gets: t5x's standard rules plus model.gin's additional_rules.
    rules = dict(gin.query_parameter(
        "partitioning.PjitPartitioner.logical_axis_rules").scoped_configurable_fn())
    assert rules["kv_joined"] == "model"
    assert names <= set(rules)
    # Adafactor looks every axis name up in its factor rules (KeyError on a missing one).
    opt = model.optimizer_def
    opt.set_param_axes(nn_partitioning.get_axis_names(variables["params_axes"]))
    factor_map = opt.hyper_params.factor_map
    key = next(k for k in factor_map if k.endswith("self_attention/key/kernel"))
    assert tuple(factor_map[key]) == (adafactor.FactorDim.ROW, adafactor.FactorDim.COLUMN)


def test_uptrain_fragment_sets_t5x_restore_for_converted_checkpoints(t5x_gin):
    t5x_gin(os.path.join(GIN_DIR, "t5x", "uptrain.gin"),
            bindings=["INITIAL_CHECKPOINT_PATH='/ckpt/checkpoint_2'"])
    restore = gin.query_parameter("utils.CheckpointConfig.restore").scoped_configurable_fn()
    assert restore.path == "/ckpt/checkpoint_2"  # overrides pretrain.gin's `path = []`
    assert (restore.mode, restore.dtype, restore.strict, restore.fallback_to_scratch) == (
        "specific", "float32", False, True)
    # t5x refuses fallback_to_scratch without a state transformation; the assignment map drops
    # optimizer state so that Adafactor starts afresh.
    assert restore.assignment_map == ((r"state/param_states.*", None),)
    assert len(restore.state_transformation_fns) == 1


def _t5x_model(num_kv_heads, decode_fn):
    from gqa_t5x.model.config import get_config

    vocab = seqio.PassThroughVocabulary(64, eos_id=1)
    module = network.Transformer(get_config("tiny", num_kv_heads=num_kv_heads))
    return t5x_models.EncoderDecoderModel(module, vocab, vocab, optimizer_def=None,
                                          decode_fn=decode_fn)


def _t5x_params(model, b, s, length, dtype=jnp.int32):
    shapes = {"encoder_input_tokens": (b, s), "decoder_input_tokens": (b, length)}
    return model.get_initial_variables(jax.random.PRNGKey(0), shapes,
                                       {k: dtype for k in shapes})["params"]


def _t5x_inputs(b, s):
    enc = np.random.RandomState(0).randint(2, 64, size=(b, s)).astype(np.int32)
    enc[0, 5:] = 0
    return enc


def test_t5x_initializes_with_float_dummy_tokens():
    """t5x.eval sets the model up with float32 dummy token ids."""
    model = _t5x_model(2, decoding.beam_search)
    want = _t5x_params(model, 2, 7, 5)
    got = _t5x_params(model, 2, 7, 5, dtype=jnp.float32)
    assert jax.tree_util.tree_map(lambda x: x.shape, got) == jax.tree_util.tree_map(
        lambda x: x.shape, want)


def test_t5x_greedy_decoding_matches_a_numpy_greedy_loop():
    """t5x's predict_batch (temperature 0 = greedy) against argmax over teacher-forced logits,
    one token at a time, without any cache."""
    model = _t5x_model(2, functools.partial(decoding.temperature_sample, temperature=0.0))
    module = model.module
    b, s, length = 2, 7, 5
    params = _t5x_params(model, b, s, length)
    enc = _t5x_inputs(b, s)
    got = np.asarray(model.predict_batch(
        params, {"encoder_input_tokens": enc,
                 "decoder_input_tokens": np.zeros((b, length), np.int32)}))
    want = np.zeros((b, length), np.int32)
    done = np.zeros(b, bool)
    for t in range(length):
        dec_in = np.concatenate([np.zeros((b, 1), np.int32), want[:, :-1]], axis=1)
        logits = module.apply({"params": params}, enc, dec_in, np.ones_like(dec_in),
                              enable_dropout=False)
        nxt = np.where(done, 0, np.argmax(np.asarray(logits)[:, t], axis=-1))
        want[:, t] = nxt
        done |= nxt == 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_t5x_beam_search_matches_our_beam_search(num_kv_heads):
    """t5x's beam_search (4 beams; it tiles every cache array per beam, the cross-attention
    caches included) gives the tokens of gqa_t5x's beam search, whose beams share them."""
    from gqa_t5x.model import decoding as gqa_decoding

    model = _t5x_model(num_kv_heads, decoding.beam_search)
    b, s, length = 3, 7, 6
    params = _t5x_params(model, b, s, length)
    enc = _t5x_inputs(b, s)
    got = np.asarray(model.predict_batch_with_aux(
        params, {"encoder_input_tokens": enc,
                 "decoder_input_tokens": np.zeros((b, length), np.int32)},
        num_decodes=4)[0])
    want, _ = gqa_decoding.generate(model.module, params, enc, max_decode_length=length,
                                    method="beam", num_beams=4, eos_id=1)
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.slow
def test_t5x_train_runs_two_steps_and_writes_a_checkpoint(tmp_path):
    model_dir = tmp_path / "model"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "t5x.train", f"--gin_search_paths={GIN_DIR}",
           "--gin_file=models/tiny.gin", "--gin_file=attention/mqa.gin",
           "--gin_file=t5x/model.gin", "--gin_file=t5x/configs/runs/pretrain.gin",
           "--gin_file=t5x/synthetic.gin",
           f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2",
           "--gin.USE_CACHED_TASKS=False", "--gin.MIXTURE_OR_TASK_NAME='synthetic_qa'",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
           "--gin.train.eval_period=2", "--gin.train.eval_steps=1",
           "--gin.utils.create_learning_rate_scheduler.warmup_steps=2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (model_dir / "checkpoint_2").is_dir()
    assert glob.glob(str(model_dir / "train" / "events.out.tfevents.*"))
    assert "network.Transformer" in (model_dir / "config.gin").read_text()
