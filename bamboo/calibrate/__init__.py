"""Activation profiling, the training corpus, and predictor calibration."""
from bamboo.calibrate.activation_stats import (
           LayerSparsity,
           format_sparsity_table,
           measure_ffn_sparsity,
)
from bamboo.calibrate.predictors import LayerPredictor, Predictors, fingerprint
from bamboo.calibrate.train_predictors import calibrate, set_thresholds

__all__ = ["LayerPredictor", "LayerSparsity", "Predictors", "calibrate", "fingerprint", "format_sparsity_table",
           "measure_ffn_sparsity", "set_thresholds"]
