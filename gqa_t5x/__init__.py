"""gqa_t5x: grouped-query (GQA) and multi-query (MQA) attention for T5.1.1 encoder-decoders.

The public API (the names below may be relied on; everything else may move):

    config = gqa_t5x.get_config("t5_1_1_small", num_kv_heads=2)
    model = gqa_t5x.Transformer(config)
    params, config = gqa_t5x.load_checkpoint("/path/to/converted")
    tokens, scores = gqa_t5x.generate(model, params, encoder_input_tokens, max_decode_length=32)

Subpackages: `model` (config, layers, attention, network, decoding), `kernels` (optional compiled
CPU ops), `conversion`, `checkpoints`, `data`, `training`, `experiments`, `cli`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from gqa_t5x.checkpoints import (
    config_from_hf_t5,
    load_checkpoint,
    open_checkpoint,
    params_from_hf_t5,
    save_checkpoint,
)
from gqa_t5x.conversion.pooling import convert_params
from gqa_t5x.model.config import PRESETS, TransformerConfig, get_config, with_kv_heads
from gqa_t5x.model.decoding import generate
from gqa_t5x.model.network import Transformer

__version__ = "0.2.0"

__all__ = [
    "PRESETS", "Transformer", "TransformerConfig", "__version__", "config_from_hf_t5",
    "convert_params", "generate", "get_config", "load_checkpoint", "open_checkpoint",
    "params_from_hf_t5", "save_checkpoint", "with_kv_heads",
]

# Module names that gin files import (`import gqa_t5x.models`, `from gqa_t5x import synthetic`)
# and that t5x users' own gin files therefore name. Gin configurables keep these names too
# (`gqa_t5x.models.model_config`); the modules themselves live in the subpackages.
GIN_MODULES = {
    "gqa_t5x.models": "gqa_t5x.training.models",
    "gqa_t5x.optim": "gqa_t5x.training.optim",
    "gqa_t5x.train": "gqa_t5x.training.train",
    "gqa_t5x.evaluate": "gqa_t5x.training.evaluate",
    "gqa_t5x.network": "gqa_t5x.model.network",
    "gqa_t5x.vocab": "gqa_t5x.data.vocab",
    "gqa_t5x.tasks": "gqa_t5x.data.tasks",
    "gqa_t5x.synthetic": "gqa_t5x.data.synthetic",
}


class _GinModuleAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `gqa_t5x.models` as the module `gqa_t5x.training.models` itself (same object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in GIN_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(GIN_MODULES[spec.name])

    def exec_module(self, module):
        pass  # already executed under its own name


if not any(isinstance(f, _GinModuleAlias) for f in sys.meta_path):
    sys.meta_path.insert(0, _GinModuleAlias())
