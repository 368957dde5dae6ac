"""Compiler passes, one per file, and the pass manager that runs them in order."""
from bamboo.passes.attach_predictors import AttachPredictors
from bamboo.passes.detect_ffn_sites import (
    DetectionReport,
    FFNSite,
    Rejection,
    detect_ffn_sites,
)
from bamboo.passes.infra import GraphPass, PassManager, PassResult, check_graph
from bamboo.passes.keep_dense import dense_is_faster_here
from bamboo.passes.rewrite_to_sparse_ffn import RewriteToSparseFFN
from bamboo.passes.store_down_proj_neuron_major import StoreDownProjNeuronMajor


def default_passes(mode: str = "exact", bind=None) -> list:
    """The pipeline bamboo.export runs on a program whose weights are attributes: each site stores its own
    neuron-major down weight and (predictor mode, `bind` from calibrate.predictors.PredictorBinder) predictor."""
    passes = [RewriteToSparseFFN(mode), StoreDownProjNeuronMajor()]
    if mode == "predictor":
        passes.append(AttachPredictors(bind))
    return passes


def dynamo_passes(mode: str = "exact", bind=None, table: int = 0, constants=None,
                  keep_dense_where_faster: bool = True) -> list:
    """The pipeline bamboo.compile runs on each Dynamo graph. Such a graph may serve several layers, so it
    stores nothing layer-specific: the op derives the neuron-major down rows from the weight of each call, and
    predictor mode binds through the registered predictor `table` (ops/bound_weights.py). A site the sparse op
    cannot beat on this CPU stays dense, reported (keep_dense_where_faster)."""
    passes = [RewriteToSparseFFN(mode, keep_dense=dense_is_faster_here if keep_dense_where_faster else None)]
    if mode == "predictor":
        passes.append(AttachPredictors(bind, constants, table))
    return passes


__all__ = [
    "AttachPredictors", "DetectionReport", "FFNSite", "GraphPass", "PassManager", "PassResult", "Rejection", "RewriteToSparseFFN",
    "StoreDownProjNeuronMajor", "check_graph", "default_passes", "detect_ffn_sites", "dynamo_passes",
]
