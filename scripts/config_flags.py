#!/usr/bin/env python
"""Prints a table of an experiment file in `configs/` for shell scripts, one item a line.

    python scripts/config_flags.py tiny_pipeline                 # --gin.<model_config binding>
    python scripts/config_flags.py tiny_pipeline --table steps   # NAME=value (shell variables)
"""

from __future__ import annotations

import argparse
import sys

from gqa_t5x.experiments import configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="configs/<name>.toml")
    parser.add_argument("--table", default="model",
                        help="'model': gin flags of gqa_t5x.models.model_config; any other "
                             "table: NAME=value lines")
    args = parser.parse_args(argv)
    try:
        if args.table == "model":
            lines = ["--gin." + b.replace(" = ", "=", 1) for b in configs.gin_bindings(args.name)]
        else:
            table = configs.load(args.name).get(args.table)
            if table is None:
                raise KeyError(f"configs/{args.name}.toml has no [{args.table}] table")
            lines = [f"{k.upper()}={v}" for k, v in table.items()]
    except (FileNotFoundError, KeyError) as e:
        print(f"config_flags: {e.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
