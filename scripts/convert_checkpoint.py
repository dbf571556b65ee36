"""Convert an MHA checkpoint (t5x, Hugging Face T5.1.1 or gqa_t5x) to GQA/MQA.

The same as the `gqa-convert` console script; see `gqa_t5x/cli/convert.py` for the flags, e.g.

    python scripts/convert_checkpoint.py --input t5_1_1_xxl/checkpoint_1000000 \
        --output out/xxl_gqa8 --num_kv_heads 8 --method mean
"""

import sys

from gqa_t5x.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
