"""Activation profiling (and, later, predictor training)."""
from bamboo.calibrate.activation_stats import LayerSparsity, format_sparsity_table, measure_ffn_sparsity

__all__ = ["LayerSparsity", "format_sparsity_table", "measure_ffn_sparsity"]
