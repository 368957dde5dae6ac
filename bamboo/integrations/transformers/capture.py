"""Capture adapters for transformers models (registered with bamboo.graph.capture).

- export: transformers returns `DynamicCache` / `EncoderDecoderCache` objects from forward, which are not
  pytrees, so torch.export cannot return them: use_cache=False unless the caller says otherwise.
- MoE experts (transformers-5 `@use_experts_implementation` blocks, `grouped_mm` by default) run one expert at
  a time through bamboo's experts implementation while bamboo captures or runs a compiled model, so every
  expert's FFN is a site; the model's own setting is restored afterwards. Under Dynamo the per-expert token
  selection (`torch.where`) has a data-dependent size: it is traced with unbacked sizes instead of breaking
  the graph (a graph break inside the expert loop would leave the experts uncompiled).
- ONNX retry (purpose "onnx-retry", after an ONNX export failed): attention in transformers' eager
  implementation. The exporter's SDPA decomposition yields strides a later reshape cannot view (T5's
  position-bias attention); the eager attention is plain matmul + softmax."""
from __future__ import annotations

import contextlib
import inspect

import torch

from bamboo.integrations.transformers import moe


def _is_transformers_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _experts_configs(model) -> list:
    """The configs of `model` (and its sub-configs) whose experts run through a non-eager implementation."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: F401  (transformers >= 5)

    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_experts_implementation", None)
        if hasattr(module, "gate_up_proj") or hasattr(module, "down_proj") and getattr(module, "num_experts", 0):
            if impl not in (None, "eager", moe.NAME):
                configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def _per_expert(model):
    try:
        configs = _experts_configs(model)
    except ImportError:  # transformers 4.x: experts are ModuleLists of MLPs, nothing to switch
        configs = []
    saved = [(c, c._experts_implementation) for c in configs]
    try:
        for config in configs:
            config._experts_implementation = moe.NAME
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True) if configs else contextlib.nullcontext():
            yield bool(configs)
    finally:
        for config, impl in saved:
            config._experts_implementation = impl


def _takes(model, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@contextlib.contextmanager
def _eager_attention(model):
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and getattr(c, "_attn_implementation", "eager") not in (None, "eager")}
    saved = [(c, c._attn_implementation) for c in configs.values()]
    try:
        for config, _ in saved:
            config._attn_implementation = "eager"
        yield
    finally:
        for config, impl in saved:
            config._attn_implementation = impl


@contextlib.contextmanager
def transformers_adapter(model, kwargs: dict, purpose: str):
    if not isinstance(model, torch.nn.Module) or not _is_transformers_model(model):
        yield kwargs
        return
    if purpose != "compile" and "use_cache" not in kwargs and _takes(model, "use_cache"):
        kwargs = {**kwargs, "use_cache": False}
    with _per_expert(model), _eager_attention(model) if purpose == "onnx-retry" else contextlib.nullcontext():
        yield kwargs
