"""Two kinds of backend, one interface each. Graph backends (eager, inductor), in this registry:
`compile_graph(gm, example_inputs) -> callable`, the shape of a torch.compile backend, given each rewritten
Dynamo graph. Program backends (onnxruntime, tensorrt): a module built from `make_program(args)`, which gives
the rewritten ExportedProgram for example inputs; they run the whole program. bamboo.api captures or exports
and hands each what it takes; a backend never imports a pass or the api."""
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


def _options_class(name: str):
    """The class whose constructor takes the backend's keyword options."""
    if name == "onnxruntime":
        from bamboo.backends.onnxruntime import OnnxRuntimeModule

        return OnnxRuntimeModule
    if name == "tensorrt":
        from bamboo.backends.tensorrt import TensorRTModule

        return TensorRTModule
    if name not in _BACKENDS:
        raise InputError(f"unknown backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]


def check_backend_options(name: str, options: dict) -> None:
    """Refuse keywords a backend does not take before anything is compiled (its constructor would raise a bare
    TypeError, at the first call for the Dynamo backends)."""
    import inspect

    cls = _options_class(name)
    params = [] if cls.__init__ is object.__init__ else inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):  # passes its options on (torch-tensorrt's)
        return
    # what bamboo.api supplies itself (the program maker or ONNX writer, the signature) is not the user's to pass
    accepted = [p.name for p in params if p.name not in ("self", "make_program", "write_onnx", "signature_of")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"its options are {accepted}" if accepted else "it takes no options of its own"
        raise InputError(f"bamboo.compile got unknown keyword argument(s) {unknown} for backend {name!r}: {takes}, "
                         "besides sparsity, predictors, dynamic, fullgraph and dump_dir")
