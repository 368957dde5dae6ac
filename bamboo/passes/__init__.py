"""Compiler passes, one per file, and the pass manager that runs them in order."""
from bamboo.passes.attach_predictors import AttachPredictors
from bamboo.passes.detect_ffn_sites import (
    DetectionReport,
    FFNSite,
    Rejection,
    detect_ffn_sites,
)
from bamboo.passes.infra import GraphPass, PassManager, PassResult, check_graph
from bamboo.passes.rewrite_to_sparse_ffn import RewriteToSparseFFN
from bamboo.passes.store_down_proj_neuron_major import StoreDownProjNeuronMajor


def default_passes(mode: str = "exact", constants=None, keep_original_weights: bool = True,
                   store_weights_as: str = "buffer", predictors=None) -> list:
    """The pipeline bamboo.compile (Dynamo graphs: weights are inputs named in `constants`) and bamboo.export
    (unlifted graphs: weights are attributes) run for a sparsity mode."""
    passes = [RewriteToSparseFFN(mode),
              StoreDownProjNeuronMajor(constants, keep_original_weights, store_as=store_weights_as)]
    if mode == "predictor":
        passes.append(AttachPredictors(predictors, constants, store_as=store_weights_as))
    return passes


__all__ = [
    "AttachPredictors", "DetectionReport", "FFNSite", "GraphPass", "PassManager", "PassResult", "Rejection", "RewriteToSparseFFN",
    "StoreDownProjNeuronMajor", "check_graph", "default_passes", "detect_ffn_sites",
]
