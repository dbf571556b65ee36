"""The bytes model against hand computation, and a tiny end-to-end benchmark run."""

import json
import os

import jax
import numpy as np
import pytest

from gqa_t5x.cli import bench as bench_cli
from gqa_t5x.experiments import benchmark
from gqa_t5x.model import decoding
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

# Config B: d_model 512, 8 heads x 64, mlp 1024, 4 + 4 layers, vocab 32128, float32.
B_CONFIG = TransformerConfig(vocab_size=32128, emb_dim=512, num_heads=8, num_kv_heads=8,
                             head_dim=64, mlp_dim=1024, num_encoder_layers=4,
                             num_decoder_layers=4)


def test_decoder_weight_bytes_by_hand():
    # MHA, per layer: self q,k,v,o 4*512*512; cross q,o 2*512*512; mlp 3*512*1024; 3 norms.
    per_layer = 4 * 512 * 512 + 2 * 512 * 512 + 3 * 512 * 1024 + 3 * 512
    assert benchmark.decoder_weight_bytes(B_CONFIG) == 4 * (4 * per_layer + 512 + 512 * 32128)
    # MQA: self k, v shrink to 512 x 64.
    per_layer = 2 * 512 * 512 + 2 * 512 * 64 + 2 * 512 * 512 + 3 * 512 * 1024 + 3 * 512
    mqa = B_CONFIG.replace(num_kv_heads=1)
    assert benchmark.decoder_weight_bytes(mqa) == 4 * (4 * per_layer + 512 + 512 * 32128)
    assert benchmark.cross_kv_weight_bytes(mqa) == 4 * 4 * 2 * 512 * 64


def test_bytes_model_reproduces_reference_step_times():
    # At 23 GB/s, 128 self positions and 1024 input positions, batch 8: MHA 11.6 ms per step,
    # GQA-4 8.1, GQA-2 6.4, MQA 5.5.
    for kv_heads, ms in ((8, 11.6), (4, 8.1), (2, 6.4), (1, 5.5)):
        cfg = B_CONFIG.replace(num_kv_heads=kv_heads)
        step = benchmark.decoder_weight_bytes(cfg) + benchmark.kv_read_bytes(cfg, 8, 128, 1024)
        assert step / 23e9 * 1e3 == pytest.approx(ms, abs=0.06)


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
    assert os.path.getsize(os.path.join(out, benchmark.RESULTS_PNG)) > 0
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
    assert results["logits_step_s"] > 0
    logits_ms = 1e3 * tiny.emb_dim * tiny.vocab_size * 4 / results["bandwidth_bytes_per_s"]
    assert (f"logits projection alone {1e3 * results['logits_step_s']:.1f} ms/step "
            f"(bytes model {logits_ms:.1f})") in table
    assert "mv" in table.splitlines()[0]
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
