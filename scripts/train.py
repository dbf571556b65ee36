#!/usr/bin/env python
"""gqa-train as a script: python scripts/train.py --gin_file=... --gin.MODEL_DIR="'/tmp/run'"."""

import sys

from gqa_t5x.cli.run import train_main

if __name__ == "__main__":
    sys.exit(train_main())
