"""`gqa-demo`: MHA -> GQA-G -> MQA by mean pooling on a small random model, decoding each.

The work is `gqa_t5x.experiments.demo.run_demo`.
"""

from __future__ import annotations

import argparse

from gqa_t5x.experiments.demo import DEMO_CONFIG, format_rows, run_demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gqa-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8,
                        help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--input_length", type=int, default=256,
                        help="encoder input tokens (default: %(default)s)")
    parser.add_argument("--output_length", type=int, default=32,
                        help="greedy decoding steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random model and inputs (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed decodes of each variant, interleaved; the table shows "
                        "their median and range (default: %(default)s)")
    args = parser.parse_args(argv)
    cfg = DEMO_CONFIG
    print(f"model: {cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, d_model "
          f"{cfg.emb_dim}, {cfg.num_heads} heads x {cfg.head_dim}, vocab {cfg.vocab_size}; "
          f"batch {args.batch_size}, input {args.input_length}, {args.output_length} greedy "
          f"steps; decoder self- and cross-attention grouped, key/value heads mean-pooled")
    rows = run_demo(cfg, args.batch_size, args.input_length, args.output_length, args.seed,
                    args.repeats)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
