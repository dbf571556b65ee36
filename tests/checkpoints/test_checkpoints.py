"""Checkpoint readers and writers, and the streaming converter (`gqa-convert`), end to end.

Each source format is written here by other means than the code under test (tensorstore and
flax msgpack for t5x's legacy layout, orbax for t5x's orbax layout, transformers/torch for
Hugging Face), converted with `convert_checkpoint`, and compared with converting the in-memory
params with `convert_params`.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import serialization

from gqa_t5x import checkpoints
from gqa_t5x.checkpoints import hf as hf_mapping
from gqa_t5x.checkpoints import load_checkpoint, open_checkpoint, save_checkpoint
from gqa_t5x.checkpoints.t5x import infer_config_from_shapes
from gqa_t5x.cli import convert as convert_cli
from gqa_t5x.conversion import streaming
from gqa_t5x.conversion.pooling import convert_params, param_shapes
from gqa_t5x.model.config import TransformerConfig, with_kv_heads
from gqa_t5x.model.network import Transformer

CONFIG = TransformerConfig(vocab_size=40, emb_dim=16, num_heads=4, num_kv_heads=4, head_dim=4,
                           mlp_dim=24, num_encoder_layers=1, num_decoder_layers=2,
                           relative_attention_num_buckets=8)


@pytest.fixture(scope="module")
def params():
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = Transformer(CONFIG).init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                         enable_dropout=False)
    return jax.tree_util.tree_map(np.asarray, variables["params"])


def logits(params, config):
    rng = np.random.default_rng(0)
    enc = rng.integers(1, config.vocab_size, (2, 6)).astype(np.int32)
    dec = rng.integers(1, config.vocab_size, (2, 4)).astype(np.int32)
    return np.asarray(Transformer(config).apply({"params": params}, enc, dec, dec,
                                                enable_dropout=False))


def flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def write_t5x_legacy(directory, params, step=7, drop=()):
    """t5x's legacy layout, written with tensorstore and flax msgpack as t5x does: a gzip zarr
    folder per array named by the dotted path, relative kvstore paths, optimizer state beside."""
    os.makedirs(directory)

    def spec_for(name, array):
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": name},
                "metadata": {"compressor": {"id": "gzip"}, "shape": list(array.shape),
                             "chunks": list(array.shape), "dtype": "<f4"}}
        absolute = {**spec, "kvstore": {"driver": "file", "path": os.path.join(directory, name)}}
        ts.open(absolute, create=True).result().write(array).result()
        return spec

    def walk(tree, prefix):
        return {k: walk(v, prefix + (k,)) if isinstance(v, dict)
                else spec_for(".".join(prefix + (k,)), v)
                for k, v in tree.items() if prefix + (k,) not in drop}

    target = walk(params, ("target",))
    v_row = spec_for("state.param_states.decoder.decoder_norm.scale.v",
                     np.ones(CONFIG.emb_dim, np.float32))
    state = {"version": 3, "optimizer": {
        "target": target,
        "state": {"step": np.asarray(step, np.int32),
                  "param_states": {"decoder": {"decoder_norm": {"scale": {"v": v_row}}}}}}}
    with open(os.path.join(directory, "checkpoint"), "wb") as f:
        f.write(serialization.to_bytes(state))


def write_hf(directory, config, fmt):
    """A Hugging Face T5.1.1 folder with random weights, written by transformers/torch."""
    import torch
    import transformers

    hf_config = transformers.T5Config(**hf_mapping.hf_t5_config_dict(config))
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config)
    if fmt == "bin":
        os.makedirs(directory)
        hf_config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    elif fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
    else:
        model.save_pretrained(directory)
    return model


def convert(tmp_path, src, **kw):
    out = str(tmp_path / "out")
    kw.setdefault("num_kv_heads", 2)
    summary = streaming.convert_checkpoint(str(src), out, force=True, **kw)
    return load_checkpoint(out), summary


# ---- our format ---------------------------------------------------------------------------------


def test_layout_is_what_t5x_legacy_restore_reads(tmp_path, params):
    """Read back as t5x's legacy restore does, without our readers: the step folder's msgpack
    with flax, each zarr spec made absolute by joining its path to the step folder, opened with
    tensorstore as written (so its stored dtype and metadata must match the array on disk)."""
    save_checkpoint(str(tmp_path / "ck"), params, CONFIG, step=3)
    assert sorted(os.listdir(tmp_path / "ck")) == ["checkpoint_3", "config.json"]
    directory = tmp_path / "ck" / "checkpoint_3"
    names = {".".join(("target",) + path) for path in flat(params)}
    assert set(os.listdir(directory)) == names | {"checkpoint"}  # no orbax _METADATA
    contents = serialization.msgpack_restore((directory / "checkpoint").read_bytes())
    assert contents["version"] == 3 and set(contents) == {"version", "optimizer"}
    assert set(contents["optimizer"]) == {"target", "state"}
    assert set(contents["optimizer"]["state"]) == {"step"}
    assert int(contents["optimizer"]["state"]["step"]) == 3
    target = contents["optimizer"]["target"]
    for path, expected in flat(params).items():
        spec = target
        for key in path:
            spec = spec[key]
        assert spec["driver"] == "zarr"
        assert spec["kvstore"] == {"driver": "file", "path": ".".join(("target",) + path)}
        absolute = {**spec, "kvstore": {"driver": "file",
                                        "path": str(directory / spec["kvstore"]["path"])}}
        array = ts.open(absolute).result().read().result()
        assert array.dtype == np.float32, path
        np.testing.assert_array_equal(array, expected, err_msg=str(path))
    assert json.loads((tmp_path / "ck" / "config.json").read_text()) == CONFIG.to_dict()


def test_our_readers_take_the_folder_or_its_step_folder(tmp_path, params):
    save_checkpoint(str(tmp_path / "ck"), params, CONFIG, step=3)
    for path in (tmp_path / "ck", tmp_path / "ck" / "checkpoint_3"):
        assert checkpoints.detect_format(str(path)) == "gqa_t5x"
        loaded, config = load_checkpoint(str(path))
        assert config == CONFIG
        assert_trees_equal(loaded, params)
        reader = open_checkpoint(str(path))
        assert (reader.format, reader.step, reader.config) == ("gqa_t5x", 3, CONFIG)
    # The step folder is also a plain t5x legacy checkpoint (no config).
    reader = open_checkpoint(str(tmp_path / "ck" / "checkpoint_3"), "t5x")
    assert (reader.format, reader.step, reader.config) == ("t5x_legacy", 3, None)
    assert_trees_equal(reader.read_all(), params)
    # Without the msgpack (written last, by close()) it is not our checkpoint.
    (tmp_path / "ck" / "checkpoint_3" / "checkpoint").unlink()
    for path in (tmp_path / "ck", tmp_path / "ck" / "checkpoint_3"):
        assert checkpoints.detect_format(str(path)) != "gqa_t5x"
        with pytest.raises(ValueError, match="is not a gqa_t5x checkpoint"):
            load_checkpoint(str(path))


# ---- round trips through each source format -----------------------------------------------------


@pytest.mark.parametrize("method", ["mean", "random"])
def test_t5x_legacy_roundtrip(tmp_path, params, method):
    src = tmp_path / "run" / "checkpoint_7"
    write_t5x_legacy(str(src), params)
    (loaded, config), summary = convert(tmp_path, tmp_path / "run", method=method, seed=4)
    target = with_kv_heads(CONFIG, 2)
    assert config == target and summary.step == 7 and summary.input_format == "t5x_legacy"
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint_7", "config.json",
                                                    "conversion.json"]
    expected = convert_params(params, CONFIG, target, method, seed=4)
    assert_trees_equal(loaded, expected)
    np.testing.assert_allclose(logits(loaded, config), logits(expected, target), atol=1e-6)


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_t5x_orbax_roundtrip(tmp_path, params, use_ocdbt):
    src = tmp_path / "checkpoint_5"
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)
    ocp.Checkpointer(handler).save(str(src), args=ocp.args.PyTreeSave(
        {"target": params, "state": {"step": np.int32(5)}}))
    (loaded, config), summary = convert(tmp_path, src, num_kv_heads=1)
    assert summary.step == 5 and summary.input_format == "t5x_orbax"
    target = with_kv_heads(CONFIG, 1)
    expected = convert_params(params, CONFIG, target, "mean")
    assert_trees_equal(loaded, expected)
    np.testing.assert_allclose(logits(loaded, config), logits(expected, target), atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_hf_roundtrip(tmp_path, fmt):
    src = tmp_path / "hf"
    model = write_hf(str(src), CONFIG, fmt)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hf_params = checkpoints.params_from_hf_t5(state, CONFIG)
    (loaded, config), summary = convert(tmp_path, src, method="first")
    assert summary.input_format == "hf"
    target = with_kv_heads(CONFIG, 2)
    assert config == target.replace(dropout_rate=config.dropout_rate)
    expected = convert_params(hf_params, CONFIG, target, "first")
    assert_trees_equal(loaded, expected)
    np.testing.assert_allclose(logits(loaded, config), logits(expected, target), atol=1e-6)


def test_cli_step_for_a_source_without_one(tmp_path, capsys):
    # A Hugging Face folder records no step: without --step a warning and checkpoint_0; with
    # --step the output is at that step (t5x reads it from the folder name), recorded in
    # conversion.json and the summary.
    src = tmp_path / "hf"
    write_hf(str(src), CONFIG, "safetensors")
    argv = ["--input", str(src), "--num_kv_heads", "2"]
    assert convert_cli.main(argv + ["--output", str(tmp_path / "zero")]) == 0
    out, err = capsys.readouterr()
    assert "gqa-convert: warning:" in err and "records no training step" in err
    assert "--step 1000000" in err
    assert "step 0 (source records none)" in out
    assert (tmp_path / "zero" / "checkpoint_0" / "checkpoint").is_file()

    assert convert_cli.main(argv + ["--output", str(tmp_path / "out"), "--step", "1000000"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err
    assert "step 1000000 (source records none)" in out
    assert f"INITIAL_CHECKPOINT_PATH): {tmp_path / 'out' / 'checkpoint_1000000'}\n" in out
    assert (tmp_path / "out" / "checkpoint_1000000" / "checkpoint").is_file()
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert (record["step"], record["source_step"], record["warnings"]) == (1000000, None, [])
    assert open_checkpoint(str(tmp_path / "out")).step == 1000000


def test_hf_reader_tied_and_bfloat16(tmp_path, params):
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "hf"
    write_hf(str(src), CONFIG, "safetensors")
    state = hf_mapping.params_to_hf_t5(params, CONFIG)
    del state["lm_head.weight"]  # tied: only shared.weight
    save_file({k: torch.from_numpy(np.array(v)).to(torch.bfloat16)
               for k, v in state.items()}, str(src / "model.safetensors"))
    reader = open_checkpoint(str(src))
    shared = torch.from_numpy(np.array(state["shared.weight"]))
    expected = shared.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(reader.read(("token_embedder", "embedding")), expected)
    np.testing.assert_array_equal(reader.read(("decoder", "logits_dense", "kernel")), expected.T)


def test_random_streaming_matches_in_memory(tmp_path, params):
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    (loaded, _), _ = convert(tmp_path, tmp_path / "src", method="random", seed=11)
    expected = convert_params(params, CONFIG, with_kv_heads(CONFIG, 2), "random", seed=11)
    assert_trees_equal(loaded, expected)


def test_gqa_checkpoint_converts_again(tmp_path, params):
    gqa4 = with_kv_heads(CONFIG, 4, ("encoder_self", "decoder_self", "cross"))
    save_checkpoint(str(tmp_path / "src"), params, gqa4)
    (loaded, config), _ = convert(tmp_path, tmp_path / "src", num_kv_heads=2)
    assert config.grouped == ("encoder_self", "decoder_self", "cross")
    assert loaded["encoder"]["layers_0"]["attention"]["key"]["kernel"].shape == (16, 8)


# ---- config inference ---------------------------------------------------------------------------


def test_infer_config_from_shapes():
    for config in (CONFIG, with_kv_heads(CONFIG, 1),
                   with_kv_heads(CONFIG, 2, ("encoder_self", "decoder_self", "cross"))):
        assert infer_config_from_shapes(param_shapes(config)) == config
    short = CONFIG.replace(relative_attention_max_distance=16)
    inferred = infer_config_from_shapes(param_shapes(short), relative_attention_max_distance=16)
    assert inferred == short
    shapes = param_shapes(CONFIG)
    del shapes[("encoder", "relpos_bias", "rel_embedding")]
    with pytest.raises(ValueError, match="encoder/relpos_bias/rel_embedding is missing"):
        infer_config_from_shapes(shapes)


# ---- the CLI and its errors ---------------------------------------------------------------------


def test_cli_prints_summary(tmp_path, params, capsys):
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    rc = convert_cli.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    # parameters: 2 decoder layers x 2 attentions x (key + value) shrink from 16x16 to 16x4
    before = sum(np.prod(s) for s in param_shapes(CONFIG).values())
    after = before - 2 * 2 * 2 * 16 * (16 - 4)
    assert f"parameters: {before:,} -> {after:,}" in out
    # self-attention cache per token: layers x (K, V) x kv heads x head_dim x 4 bytes
    assert f"per generated token (float32): {2 * 2 * 4 * 4 * 4:,} -> {2 * 2 * 1 * 4 * 4:,}" in out
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["method"] == "mean"
    assert f"INITIAL_CHECKPOINT_PATH): {tmp_path / 'out' / 'checkpoint_0'}\n" in out
    assert (tmp_path / "out" / "checkpoint_0" / "checkpoint").is_file()


def test_cli_reports_errors(tmp_path, params, capsys):
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    rc = convert_cli.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "3"])
    assert rc == 1
    assert "num_heads=4 is not divisible by num_kv_heads=3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_without_force(tmp_path, params):
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 2)
    assert (tmp_path / "out" / "keep").exists()
    with pytest.raises(FileExistsError, match="holds files that no conversion wrote"):
        streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 2,
                                     force=True)
    assert (tmp_path / "out" / "keep").exists()
    (tmp_path / "out" / "keep").unlink()
    streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 2, force=True)
    assert load_checkpoint(str(tmp_path / "out"))[1] == with_kv_heads(CONFIG, 2)


def test_crash_leaves_no_output(tmp_path, params, monkeypatch):
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    calls = []

    def failing_write(self, path, array):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(self, path, array)

    original = checkpoints.CheckpointWriter.write
    monkeypatch.setattr(checkpoints.CheckpointWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 2)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_error_unknown_format(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown checkpoint format in .*empty"):
        streaming.convert_checkpoint(str(tmp_path / "empty"), str(tmp_path / "out"), 2)
    with pytest.raises(ValueError, match="does not exist"):
        streaming.convert_checkpoint(str(tmp_path / "nothing"), str(tmp_path / "out"), 2)


def test_error_missing_arrays(tmp_path, params):
    drop = {("target", "decoder", "layers_1", "mlp", "wo", "kernel")}
    write_t5x_legacy(str(tmp_path / "t5x"), params, drop=drop)
    cfg = tmp_path / "config.json"
    cfg.write_text(CONFIG.to_json())
    with pytest.raises(ValueError, match="missing arrays: decoder/layers_1/mlp/wo/kernel"):
        streaming.convert_checkpoint(str(tmp_path / "t5x"), str(tmp_path / "out"), 2)
    rc = convert_cli.main(["--input", str(tmp_path / "t5x"), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "2", "--config_json", str(cfg)])
    assert rc == 1 and not (tmp_path / "out").exists()


def test_error_missing_array_folder(tmp_path, params):
    write_t5x_legacy(str(tmp_path / "t5x"), params)
    name = "target.encoder.layers_0.mlp.wi_0.kernel"
    for f in os.listdir(tmp_path / "t5x" / name):
        os.remove(tmp_path / "t5x" / name / f)
    os.rmdir(tmp_path / "t5x" / name)
    with pytest.raises(ValueError, match=f"array folder '{name}'.* does not exist"):
        streaming.convert_checkpoint(str(tmp_path / "t5x"), str(tmp_path / "out"), 2)


def test_error_shapes_do_not_match_config(tmp_path, params):
    write_t5x_legacy(str(tmp_path / "t5x"), params)
    wrong = CONFIG.replace(mlp_dim=32)
    with pytest.raises(ValueError, match=r"encoder/layers_0/mlp/wi_0/kernel has shape \(16, 24\), "
                                         r"expected \(16, 32\)"):
        streaming.convert_checkpoint(str(tmp_path / "t5x"), str(tmp_path / "out"), 2,
                                       source_config=wrong)
    hf = tmp_path / "hf"
    write_hf(str(hf), CONFIG, "safetensors")
    hf_config = json.loads((hf / "config.json").read_text())
    hf_config["d_ff"] = 32
    (hf / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match=r"DenseReluDense.wi_0.weight has shape \(24, 16\), "
                                         r"expected \(32, 16\)"):
        streaming.convert_checkpoint(str(hf), str(tmp_path / "out"), 2)


def test_error_kv_heads(tmp_path, params):
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 3)
    with pytest.raises(ValueError, match="num_kv_heads=8 is larger than num_heads=4"):
        streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 8)
    gqa1 = with_kv_heads(CONFIG, 1)
    gqa_params = convert_params(params, CONFIG, gqa1, "mean")
    save_checkpoint(str(tmp_path / "mqa"), gqa_params, gqa1)
    with pytest.raises(ValueError, match=r"more kv heads \(2\) than the source \(1\)"):
        streaming.convert_checkpoint(str(tmp_path / "mqa"), str(tmp_path / "out"), 2)
    assert not (tmp_path / "out").exists()


def test_zarr_arrays_in_many_uneven_chunks(tmp_path, monkeypatch):
    from gqa_t5x.checkpoints import t5x as t5x_checkpoints

    monkeypatch.setattr(t5x_checkpoints, "CHUNK_BYTES", 3 * 5 * 4)  # 3 rows of 5 float32
    array = np.random.default_rng(0).standard_normal((10, 5)).astype(np.float32)
    metadata = t5x_checkpoints.write_zarr(str(tmp_path / "a"), array)
    assert metadata["chunks"] == [3, 5]
    assert len([n for n in os.listdir(tmp_path / "a") if not n.startswith(".")]) == 4
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}}
    np.testing.assert_array_equal(t5x_checkpoints.read_zarr(spec), array)
    bf16 = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "b")},
            "dtype": "bfloat16", "metadata": {"shape": [10, 5], "chunks": [4, 5]}}
    ts.open(bf16, create=True).result().write(array.astype(jnp.bfloat16)).result()
    np.testing.assert_array_equal(t5x_checkpoints.read_zarr(bf16),
                                  array.astype(jnp.bfloat16).astype(np.float32))


def test_error_hf_missing_arrays(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf = tmp_path / "hf"
    write_hf(str(hf), CONFIG, "safetensors")
    state = load_file(str(hf / "model.safetensors"))
    del state["decoder.block.1.layer.1.EncDecAttention.v.weight"]
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 arrays the config needs: "
                                         "decoder.block.1.layer.1.EncDecAttention.v.weight"):
        streaming.convert_checkpoint(str(hf), str(tmp_path / "out"), 2)
    (hf / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors, pytorch_model.bin"):
        streaming.convert_checkpoint(str(hf), str(tmp_path / "out"), 2)
