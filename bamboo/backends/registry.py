"""One registry of backends, one interface: `compile_graph(gm, example_inputs) -> callable`, the shape of a
torch.compile backend. A backend sees only a rewritten graph; it never imports a pass."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from bamboo.errors import InputError

_BACKENDS: dict[str, Callable[[], "Backend"]] = {}


class Backend:
    name = "base"

    def compile_graph(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        raise NotImplementedError


def register_backend(name: str):
    def decorator(cls):
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return decorator


def available_backends() -> list[str]:
    # onnxruntime and tensorrt run the whole exported model rather than Dynamo graphs (see bamboo.compile)
    return sorted(set(_BACKENDS) | {"onnxruntime", "tensorrt"})


def get_backend(name: str, **options) -> Backend:
    if name not in _BACKENDS:
        raise InputError(f"unknown backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name](**options)
