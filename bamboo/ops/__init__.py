"""The bamboo:: custom ops. Importing this package registers them with torch.library."""
from bamboo.ops.sparse_ffn import (
    KINDS,
    MODES,
    WeightTraffic,
    count_weight_reads,
    dense_ffn,
    sparse_ffn,
)

__all__ = ["KINDS", "MODES", "WeightTraffic", "count_weight_reads", "dense_ffn", "sparse_ffn"]
