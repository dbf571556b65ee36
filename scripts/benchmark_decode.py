"""Decode benchmark (same as the `gqa-bench` console script): see gqa_t5x/cli/bench.py."""

import sys

from gqa_t5x.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
