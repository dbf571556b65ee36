"""gqa-demo's table: decode time as median and range of interleaved repeats, '~' within noise."""

from gqa_t5x.experiments import demo
from gqa_t5x.model.config import TransformerConfig


def _row(kv, times):
    return {"kv_heads": kv, "params": 1000, "cache_bytes_per_sequence": 2048,
            "decode_seconds_all": times, "decode_seconds": sorted(times)[len(times) // 2],
            "decode_min": min(times), "decode_max": max(times)}


def test_ratio_of_medians_and_noise_mark():
    mha = _row(8, [0.010, 0.012, 0.011])
    apart = _row(2, [0.005, 0.004, 0.0055])  # range 4.0-5.5 ms, MHA's 10-12 ms
    close = _row(4, [0.0095, 0.013, 0.0105])  # overlaps MHA's range
    lines = demo.format_rows([mha, close, apart]).splitlines()
    assert lines[1].split()[-3:] == ["11.0", "10.0-12.0", "1.00x"]
    assert lines[2].split()[-3:] == ["10.5", "9.5-13.0", "~1.05x"]  # 11 / 10.5
    assert lines[3].split()[-3:] == ["5.0", "4.0-5.5", "2.20x"]  # 11 / 5
    assert lines[-1].startswith("median and range of 3 interleaved repeats")


def test_run_demo_keeps_every_repeat():
    config = TransformerConfig(vocab_size=32, emb_dim=16, num_heads=4, num_kv_heads=4,
                               head_dim=4, mlp_dim=16, num_encoder_layers=1,
                               num_decoder_layers=1, relative_attention_num_buckets=8)
    rows = demo.run_demo(config, batch_size=2, input_length=6, output_length=3, repeats=3)
    assert [r["kv_heads"] for r in rows] == [4, 2, 1]
    for r in rows:
        assert len(r["decode_seconds_all"]) == 3
        assert r["decode_min"] <= r["decode_seconds"] <= r["decode_max"]
