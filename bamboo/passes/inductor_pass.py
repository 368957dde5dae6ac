"""bamboo as an Inductor post-grad custom pass, for any torch.compile pipeline:

    torch.compile(model, options={"post_grad_custom_post_pass": bamboo.inductor_pass()})

Inductor hands the pass the post-grad ATen graph of each compiled region (mm/addmm over flattened inputs,
permute, relu, mul; parameters as graph inputs). The same detection and rewrite as bamboo.compile run on it;
nothing layer-specific is stored in the graph (ops/bound_weights.py): the op reads the weights of each call,
and predictor mode binds through a registered predictor table. `uuid()` is what Inductor's FX graph cache
keys the pass by: it names the pass, its mode and, in predictor mode, the predictors' content and the
process-local table id the compiled code refers to.
"""
from __future__ import annotations

import hashlib
import logging
import warnings

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from bamboo.graph.site_table import SiteTable, describe_rejections
from bamboo.passes.attach_predictors import AttachPredictors
from bamboo.passes.infra import PassManager
from bamboo.passes.rewrite_to_sparse_ffn import RewriteToSparseFFN

VERSION = 1
log = logging.getLogger("bamboo.inductor_pass")


class BambooInductorPass(CustomGraphPass):
    """`bind`, `table` and `predictor_digest` come with sparsity="predictor" (bamboo.inductor_pass builds them).
    `sites` lists what matched in every graph seen so far, with the refusals."""

    def __init__(self, sparsity: str = "exact", bind=None, table: int = 0, predictor_digest: str = ""):
        self.sparsity, self.bind, self.table, self.predictor_digest = sparsity, bind, table, predictor_digest
        self.graphs: list[dict] = []

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        passes = [RewriteToSparseFFN(self.sparsity)]
        if self.sparsity == "predictor":
            passes.append(AttachPredictors(self.bind, table=self.table))
        # the graph is edited in place: Inductor keeps lowering this very graph object
        result = PassManager(passes, require_meta=True)(gm)
        rewrite = result.stats.get("RewriteToSparseFFN", {})
        self.graphs.append(rewrite)
        log.info("bamboo.inductor_pass: %d FFN site(s) rewritten", rewrite.get("rewritten", 0))
        if rewrite.get("rejected"):  # a graph with no candidate at all (attention, a norm) is not news
            warnings.warn(f"bamboo.inductor_pass: {rewrite.get('rewritten', 0)} FFN site(s) rewritten in this graph; "
                          + describe_rejections(rewrite["rejected"]), stacklevel=2)

    @property
    def sites(self) -> SiteTable:
        return SiteTable([s for g in self.graphs for s in g.get("sites", [])],
                         [r for g in self.graphs for r in g.get("rejected", [])])

    def __deepcopy__(self, memo):
        # Inductor deep-copies its config, this pass included: keep one pass (its table, its report)
        return self

    def uuid(self) -> bytes:
        key = f"bamboo-inductor-pass-v{VERSION}:{self.sparsity}:{self.table}:{self.predictor_digest}"
        return hashlib.sha256(key.encode()).digest()
