"""Decode benchmark (same as the `gqa-bench` console script): see gqa_t5x/bench_cli.py."""

import sys

from gqa_t5x.bench_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
