"""Which FFN sites a compiled model keeps as the model wrote them, because the sparse op cannot win there."""
from __future__ import annotations

from bamboo.graph.node_ops import meta_value
from bamboo.kernels import cpu_crossover
from bamboo.passes.detect_ffn_sites import FFNSite


def dense_is_faster_here(site: FFNSite, mode: str) -> str:
    """A reason to leave `site` dense in a compiled model: on a CPU where the sparse op cannot beat the model's own
    dense FFN at the site's size (kernels/cpu_crossover.py). Exported programs keep every site: they may run
    anywhere."""
    value = meta_value(site.match.x)
    if value is None:
        return ""
    parts = 2 if site.kind == "relu_mlp" else 3
    ffn_bytes = parts * site.hidden_size * site.intermediate_size * value.element_size()
    return cpu_crossover.dense_is_faster(value.dtype, value.device, ffn_bytes, mode)
