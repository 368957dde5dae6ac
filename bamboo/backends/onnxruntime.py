"""The ONNX Runtime backend: export the model once (at its first call, with that call's inputs as examples and
dynamic batch and sequence dims), open an InferenceSession, and run it with the model's call signature.

Inputs and outputs stay torch tensors on their device: they are bound by pointer with IOBinding (CUDA EP from
onnxruntime-gpu for CUDA tensors, CPU EP for CPU tensors), so no host copies. Each call waits for torch's
stream before ORT starts and returns when ORT's stream is done (ORT computes on a stream of its own).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bamboo.errors import CompileError, InputError, require
from bamboo.graph.capture import normalize_example_inputs

BFLOAT16_REFUSAL = ("the onnxruntime backend cannot run a bfloat16 model: ONNX Runtime's CPU execution provider has "
                    "no bfloat16 kernels (Mul fails with NOT_IMPLEMENTED) and its CUDA provider has no bfloat16 "
                    "TopK; compile model.float() for the CPU or model.half() for the CUDA provider")


def _check_providers(ort, providers):
    available = ort.get_available_providers()
    names = [p if isinstance(p, str) else p[0] for p in providers]  # a name, or (name, options)
    missing = [name for name in names if name not in available]
    if missing:
        raise InputError(f"ONNX Runtime provider(s) {missing} are not available here (available: {available}); "
                         "for CUDAExecutionProvider install onnxruntime-gpu in place of onnxruntime")


class OnnxRuntimeModule:
    """A program backend: `write_onnx(args, kwargs, path)` writes the model, exported with the rewrite for those
    example inputs, as ONNX at `path` (bamboo.export_onnx); that happens at the first call (or at once with
    `example_inputs`), then the file runs in an InferenceSession. `signature_of`: the module whose forward
    names the inputs, so keyword inputs are matched by name. bamboo.compile(model, backend="onnxruntime")
    builds one."""

    def __init__(self, write_onnx, signature_of=None, providers=None, session_options=None, path=None,
                 example_inputs=None, example_kwargs=None):
        self.ort = require("onnxruntime", "onnx", "the onnxruntime backend")
        self.write_onnx, self.signature_of = write_onnx, signature_of
        self.session_options = session_options
        self.requested_providers = providers
        self.path = Path(path) if path else None
        self.session = None
        self._tmp = None
        self.baked: dict = {}  # non-tensor kwargs the export took (use_cache=False): fixed in the ONNX graph
        if example_inputs is not None:
            self._build(normalize_example_inputs(example_inputs), example_kwargs or {})

    def _providers(self, device: torch.device):
        if self.requested_providers is not None:
            providers = list(self.requested_providers)
        elif device.type == "cuda" and "CUDAExecutionProvider" in self.ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        _check_providers(self.ort, providers)
        return providers

    def _build(self, args, kwargs):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in (*args, *kwargs.values())):
            raise CompileError(BFLOAT16_REFUSAL)
        if self.path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bamboo-onnx-")
            self.path = Path(self._tmp.name) / "model.onnx"

        def widen(a):  # examples of size 1 would fix those dims: export with batch and sequence of at least 2
            if isinstance(a, torch.Tensor) and a.dim() >= 1:
                return a.expand(*[max(d, 2) if i < 2 else d for i, d in enumerate(a.shape)]).contiguous()
            return a

        self.baked = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        self.write_onnx(tuple(map(widen, args)), {k: widen(v) for k, v in kwargs.items()}, self.path)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        self.session = self.ort.InferenceSession(str(self.path), sess_options=self.session_options,
                                                 providers=self._providers(device))
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def providers(self):
        return self.session.get_providers() if self.session else None

    def _tensors(self, args, kwargs) -> list:
        """The call's tensors in the session's input order: by name (ONNX inputs are named as forward's
        parameters), else args then kwargs as given."""
        changed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and self.baked.get(k, v) != v}
        if changed:
            raise InputError(f"the ONNX model was exported with {self.baked}; this call passes {changed}: "
                             "non-tensor arguments are fixed at export")
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        if kwargs and hasattr(self.signature_of, "forward"):
            import inspect

            try:
                named = inspect.signature(self.signature_of.forward).bind_partial(*args, **kwargs).arguments
            except TypeError:
                return tensors
            if all(isinstance(named.get(n), torch.Tensor) for n in self.input_names):
                return [named[n] for n in self.input_names]
        return tensors

    def __call__(self, *args, **kwargs):
        if self.session is None:
            self._build(args, kwargs)
        tensors = self._tensors(args, kwargs)
        if len(tensors) != len(self.input_names):
            raise InputError(f"the exported model takes {len(self.input_names)} tensor input(s) "
                             f"({self.input_names}), got {len(tensors)}")
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise InputError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise InputError(f"inputs are on {device} but the session runs on {self.session.get_providers()}; "
                             "install onnxruntime-gpu (CUDAExecutionProvider) or pass CPU tensors")
        outputs = run_with_iobinding(self.session, tensors, device)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# One path for both devices: torch tensors are bound by pointer (IOBinding), so CI's CPU runs exercise the
# code that serves CUDA. Outputs go into torch tensors allocated here when their shapes follow from the
# inputs' (the usual case: symbolic dims named after input dims), else ORT allocates them.
_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def run_with_iobinding(session, tensors, device: torch.device) -> list:
    """The session's outputs for `tensors` (its inputs, in order) as torch tensors on `device`."""
    kind, index = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
    binding = session.io_binding()
    bound = [t.detach().contiguous() for t in tensors]  # kept alive until the run returns
    dims = {}
    for meta, t in zip(session.get_inputs(), bound):
        binding.bind_input(meta.name, kind, index, _numpy_dtype(t.dtype), list(t.shape), t.data_ptr())
        dims.update({d: size for d, size in zip(meta.shape, t.shape) if isinstance(d, str)})
    if kind == "cuda":
        # ORT computes on its own stream: the inputs torch wrote on its stream must be complete first.
        torch.cuda.current_stream(device).synchronize()
    preallocated = []
    for meta in session.get_outputs():
        shape = _resolve_shape(meta.shape, dims)
        dtype = _ORT_TO_TORCH.get(meta.type)
        if shape is None or dtype is None:
            binding.bind_output(meta.name, kind, index)
            preallocated.append(None)
            continue
        out = torch.empty(shape, dtype=dtype, device=device)
        binding.bind_output(meta.name, kind, index, _numpy_dtype(dtype), shape, out.data_ptr())
        preallocated.append(out)
    session.run_with_iobinding(binding)  # returns after ORT's stream is synchronised
    if all(o is not None for o in preallocated):
        return preallocated
    allocated = binding.get_outputs()
    return [o if o is not None else _to_torch(v, device) for o, v in zip(preallocated, allocated)]


def _resolve_shape(shape, dims: dict):
    """An output's concrete shape from its symbolic one, or None when a dim is not an input dim."""
    resolved = []
    for d in shape:
        if isinstance(d, int):
            resolved.append(d)
        elif isinstance(d, str) and d.isdigit():
            resolved.append(int(d))
        elif d in dims:
            resolved.append(int(dims[d]))
        else:
            return None
    return resolved


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    table = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
             torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}
    if dtype not in table:
        raise InputError(f"the onnxruntime backend cannot bind {dtype} tensors (numpy has no such type); use "
                         "float16 or float32 models (ORT's CUDA EP also lacks bfloat16 TopK)")
    return table[dtype]


def _to_torch(ort_value, device: torch.device) -> torch.Tensor:
    """An output ORT allocated, as a torch tensor on `device` (no copy through DLPack on the GPU)."""
    if device.type == "cpu":
        return torch.from_numpy(ort_value.numpy())
    to_dlpack = getattr(ort_value, "to_dlpack", None) or ort_value._ortvalue.to_dlpack  # public only in some versions
    return torch.utils.dlpack.from_dlpack(to_dlpack())
