"""Multi-head to grouped-query conversion: head pooling and alignment as pure numpy functions,
head grouping, and the streaming converter that applies them to a whole checkpoint."""

from gqa_t5x.conversion.grouping import GROUPINGS
from gqa_t5x.conversion.pooling import METHODS, convert_params, head_groups, pool_kv_heads
from gqa_t5x.conversion.streaming import CONVERSION_FILE, ConversionSummary, convert_checkpoint

__all__ = ["CONVERSION_FILE", "GROUPINGS", "METHODS", "ConversionSummary", "convert_checkpoint",
           "convert_params", "head_groups", "pool_kv_heads"]
