"""Multi-head to grouped-query conversion: head pooling as pure numpy functions, and the streaming
converter that applies them to a whole checkpoint one array at a time."""

from gqa_t5x.conversion.pooling import METHODS, convert_params, pool_kv_heads
from gqa_t5x.conversion.streaming import CONVERSION_FILE, ConversionSummary, convert_checkpoint

__all__ = ["CONVERSION_FILE", "METHODS", "ConversionSummary", "convert_checkpoint",
           "convert_params", "pool_kv_heads"]
