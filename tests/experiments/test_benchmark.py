"""The bytes model against hand computation, and a tiny end-to-end benchmark run."""

import json
import os

import jax
import numpy as np
import pytest

from gqa_t5x.cli import bench as bench_cli
from gqa_t5x.experiments import benchmark, configs
from gqa_t5x.model import decoding
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

# Config B (configs/config_b.toml): d_model 512, 8 heads x 64, mlp 1024, 4 + 4 layers,
# vocab 32128, float32; the hand computations below write these numbers out.
B_CONFIG = configs.model_config("config_b")


def test_config_b_is_the_shape_the_hand_computations_use():
    assert (B_CONFIG.vocab_size, B_CONFIG.emb_dim, B_CONFIG.num_heads, B_CONFIG.num_kv_heads,
            B_CONFIG.head_dim, B_CONFIG.mlp_dim, B_CONFIG.num_encoder_layers,
            B_CONFIG.num_decoder_layers, B_CONFIG.dtype) == (
        32128, 512, 8, 8, 64, 1024, 4, 4, "float32")


def test_decoder_weight_bytes_by_hand():
    # MHA, per layer: self q,k,v,o 4*512*512; cross q,o 2*512*512; mlp 3*512*1024; 3 norms.
    per_layer = 4 * 512 * 512 + 2 * 512 * 512 + 3 * 512 * 1024 + 3 * 512
    assert benchmark.decoder_weight_bytes(B_CONFIG) == 4 * (4 * per_layer + 512 + 512 * 32128)
    # MQA: self k, v shrink to 512 x 64.
    per_layer = 2 * 512 * 512 + 2 * 512 * 64 + 2 * 512 * 512 + 3 * 512 * 1024 + 3 * 512
    mqa = B_CONFIG.replace(num_kv_heads=1)
    assert benchmark.decoder_weight_bytes(mqa) == 4 * (4 * per_layer + 512 + 512 * 32128)
    assert benchmark.cross_kv_weight_bytes(mqa) == 4 * 4 * 2 * 512 * 64


def test_bytes_model_step_time_of_config_b_by_hand():
    # Config B's decode (batch 8, 1024 input positions, 128 steps) at 23 GB/s. A step streams the
    # decoder's weights without the cross K/V kernels (their output is cached): per layer self
    # q, o 2*512*512 and k, v 2*512*(K*64), cross q, o 2*512*512, mlp 3*512*1024, 3 norms; then
    # the final norm and the logits 512*32128. Step t (1-based) reads t self positions and 1024
    # cross positions of K and V: 4 layers x 8 x 2 x K x 64 x 4 bytes each.
    n, s, b = 128, 1024, 8
    for k in (8, 4, 2, 1):
        per_layer = (2 * 512 * 512 + 2 * 512 * k * 64 + 2 * 512 * 512 + 3 * 512 * 1024
                     + 3 * 512)
        weights = 4 * (4 * per_layer + 512 + 512 * 32128)
        kv = 4 * b * 2 * k * 64 * 4 * (n * (n + 1) // 2 + n * s)
        want_ms = 1e3 * (weights + kv / n) / 23e9
        settings = benchmark.BenchmarkSettings(output_length=n, input_length=s, batch_size=b)
        pred = benchmark.predict(B_CONFIG.replace(num_kv_heads=k), settings, bandwidth=23e9,
                                 flops_rate=1e11)
        assert pred["step_ms"] == pytest.approx(want_ms, rel=1e-12)


def test_matvec_model_charges_decoder_weights_at_the_matvec_rate():
    # MQA, 1 output step, input 1024, batch 8: weights 4*(4 layers * 2,688,512 + 512) +
    # 4*512*32128 = 108,816,384 bytes; K/V 4 layers * 8 * 2 * 64 * (1 + 1024) * 4 = 16,793,600.
    mqa = B_CONFIG.replace(num_kv_heads=1)
    assert benchmark.logits_weight_bytes(mqa) == 4 * 512 * 32128
    settings = benchmark.BenchmarkSettings(output_length=1, input_length=1024, batch_size=8)
    pred = benchmark.predict(mqa, settings, bandwidth=20e9, flops_rate=1e11, weight_rate=10e9)
    assert pred["step_ms"] == pytest.approx(1e3 * (108_816_384 + 16_793_600) / 20e9)
    assert pred["step_ms_matvec"] == pytest.approx(1e3 * (108_816_384 / 10e9 + 16_793_600 / 20e9))
    # Per sample: one step's extra weight time shared by the 8 sequences.
    assert pred["sample_s_matvec"] == pytest.approx(
        pred["sample_s"] + 108_816_384 * (1 / 10e9 - 1 / 20e9) / 8)
    assert "step_ms_matvec" not in benchmark.predict(mqa, settings, 20e9, 1e11)


def test_kv_read_and_decode_bytes_by_hand():
    cfg = B_CONFIG.replace(num_kv_heads=2)
    # 4 layers x batch 3 x (K, V) x 2 heads x 64 x (5 self + 7 cross positions) x 4 bytes.
    assert benchmark.kv_read_bytes(cfg, 3, 5, 7) == 4 * 3 * 2 * 2 * 64 * (5 + 7) * 4
    n, s, b = 6, 7, 3
    per_position = 4 * b * 2 * 2 * 64 * 4
    expected = (n * benchmark.decoder_weight_bytes(cfg)
                + per_position * (n * (n + 1) // 2 + n * s))
    assert benchmark.decode_bytes(cfg, b, n, s) == expected


def test_encoder_flops_by_hand():
    cfg = TransformerConfig(vocab_size=10, emb_dim=4, num_heads=2, num_kv_heads=1, head_dim=3,
                            mlp_dim=5, num_encoder_layers=2, num_decoder_layers=1)
    s = 7
    # q, out: 2*s*4*6 each; k, v (encoder stays MHA): 2*s*4*6 each; logits and values:
    # 2*2*s*s*3 each; mlp: 3 matmuls of 2*s*4*5.
    per_layer = 4 * (2 * s * 4 * 6) + 2 * (2 * 2 * s * s * 3) + 3 * (2 * s * 4 * 5)
    assert benchmark.encoder_flops(cfg, 3, s) == 3 * 2 * per_layer
    assert benchmark.cross_kv_flops(cfg, 3, s) == 3 * 1 * 2 * s * 4 * 2 * 1 * 3


def test_cache_bytes_match_the_cache_decoding_builds():
    cfg = TransformerConfig(vocab_size=20, emb_dim=16, num_heads=4, num_kv_heads=2, head_dim=4,
                            mlp_dim=16, num_encoder_layers=1, num_decoder_layers=2,
                            relative_attention_num_buckets=4, relative_attention_max_distance=8)
    module = Transformer(cfg)
    params = benchmark.random_params(module)
    tokens = benchmark.random_inputs(cfg.vocab_size, 3, 5)
    encoded = decoding.encode(module, params, tokens)
    cache = decoding.init_cache(module, params, encoded, tokens, max_decode_length=6)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache)) - 4  # minus cache_index
    assert nbytes == benchmark.cache_bytes(cfg, 3, 6, 5)


def test_cli_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "bench")
    argv = ["--preset", "tiny", "--input_length", "8", "--output_length", "4",
            "--batch_size", "2", "--groups", "1,4", "--repeats", "1", "--output_dir", out]
    assert bench_cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "GQA-4" in table and "GQA-1" in table
    with open(os.path.join(out, benchmark.RESULTS_JSON)) as f:
        results = json.load(f)
    with open(os.path.join(out, benchmark.RESULTS_PNG), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # the PNG signature
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"GQA-4", "GQA-1"}
    tiny = TransformerConfig.from_dict(results["config"])
    for name, g in (("GQA-4", 4), ("GQA-1", 1)):
        measured, predicted = rows[name]["measured"], rows[name]["predicted"]
        assert measured["steps"] == 4  # forced: exactly output_length steps
        cfg = tiny.replace(num_kv_heads=g)
        assert measured["cache_bytes"] - 4 == benchmark.cache_bytes(cfg, 2, 4, 8)
        expected_step = benchmark.decode_bytes(cfg, 2, 4, 8) / 4
        assert predicted["step_bytes"] == pytest.approx(expected_step)
        assert predicted["step_ms"] == pytest.approx(
            1e3 * expected_step / results["bandwidth_bytes_per_s"])
        weight_rate = tiny.emb_dim * tiny.vocab_size * 4 / results["logits_step_s"]
        assert predicted["step_ms_matvec"] == pytest.approx(
            predicted["step_ms"] + 1e3 * benchmark.decoder_weight_bytes(cfg)
            * (1 / weight_rate - 1 / results["bandwidth_bytes_per_s"]))
        assert measured["sample_s"] == pytest.approx(
            (measured["encoder_s"] + measured["cache_init_s"] + measured["decode_s"]) / 2)
    logits_ms = 1e3 * tiny.emb_dim * tiny.vocab_size * 4 / results["bandwidth_bytes_per_s"]
    assert (f"logits projection alone {1e3 * results['logits_step_s']:.1f} ms/step "
            f"(bytes model {logits_ms:.1f})") in table
    assert "mv" in table.splitlines()[1]  # the header, under the title
    # Results are not overwritten without --force.
    assert bench_cli.main(argv) == 2
    assert "exists" in capsys.readouterr().err


def test_bad_groups_are_rejected(tmp_path):
    settings = benchmark.BenchmarkSettings(groups=(3,))
    with pytest.raises(ValueError, match="num_heads=4"):
        benchmark.run_benchmark(TransformerConfig(num_heads=4, num_kv_heads=4), settings,
                                str(tmp_path))
    assert benchmark.parse_groups("1,2") == (1, 2)
    with pytest.raises(ValueError, match="--groups"):
        benchmark.parse_groups("1,x")
    assert np.all(np.asarray(benchmark.divisors(12)) == [1, 2, 3, 4, 6, 12])


def test_kernels_flag_sets_the_config(capsys):
    parse = bench_cli.build_parser().parse_args
    assert bench_cli.config_from_args(parse([])).kernels == "auto"
    assert bench_cli.config_from_args(parse(["--kernels", "xla"])).kernels == "xla"
    assert bench_cli.main(["--kernels", "cpu", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gqa-bench: kernels='cpu' needs dtype='float32'") and err.count("\n") == 1
