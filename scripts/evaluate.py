#!/usr/bin/env python
"""gqa-eval (default) or gqa-infer (--infer) as a script, with t5x's flags."""

import sys

from gqa_t5x.cli.run import eval_main, infer_main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--infer" in argv:
        argv.remove("--infer")
        sys.exit(infer_main(argv))
    sys.exit(eval_main(argv))
