"""The ONNX Runtime backend: export the model once (at its first call, with that call's inputs as examples and
dynamic batch and sequence dims), open an InferenceSession, and run it with the model's call signature.

On CUDA (onnxruntime-gpu) inputs and outputs stay on the device: torch CUDA tensors are bound with IOBinding,
no host copies. Otherwise the CPU EP runs on numpy views of the inputs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bamboo.errors import InputError, require


def _check_providers(ort, providers):
    available = ort.get_available_providers()
    missing = [p if isinstance(p, str) else p[0] for p in providers
               if (p if isinstance(p, str) else p[0]) not in available]
    if missing:
        raise InputError(f"ONNX Runtime provider(s) {missing} are not available here (available: {available}); "
                         "for CUDAExecutionProvider install onnxruntime-gpu in place of onnxruntime")


class OnnxRuntimeModule:
    def __init__(self, model: torch.nn.Module, sparsity: str = "exact", predictors=None, providers=None,
                 session_options=None, path=None, example_inputs=None):
        self.ort = require("onnxruntime", "onnx", "the onnxruntime backend")
        self.model, self.sparsity, self.predictors = model, sparsity, predictors
        self.session_options = session_options
        self.requested_providers = providers
        self.path = Path(path) if path else None
        self.session = None
        self._tmp = None
        if example_inputs is not None:
            self._build(tuple(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (example_inputs,))

    def _providers(self, device: torch.device):
        if self.requested_providers is not None:
            providers = list(self.requested_providers)
        elif device.type == "cuda" and "CUDAExecutionProvider" in self.ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        _check_providers(self.ort, providers)
        return providers

    def _build(self, args):
        from bamboo.onnx.export import export_onnx

        if self.path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bamboo-onnx-")
            self.path = Path(self._tmp.name) / "model.onnx"
        # Examples of size 1 would fix those dims: export with batch and sequence of at least 2.
        examples = tuple(a.expand(*[max(d, 2) if i < 2 else d for i, d in enumerate(a.shape)]).contiguous()
                         if isinstance(a, torch.Tensor) and a.dim() >= 1 else a for a in args)
        export_onnx(self.model, examples, self.path, sparsity=self.sparsity, predictors=self.predictors)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        self.session = self.ort.InferenceSession(str(self.path), sess_options=self.session_options,
                                                 providers=self._providers(device))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self):
        return self.session.get_providers() if self.session else None

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if self.session is None:
            self._build(args)
        if len(tensors) != len(self.input_names):
            raise InputError(f"the exported model takes {len(self.input_names)} tensor input(s) "
                             f"({self.input_names}), got {len(tensors)}")
        if tensors and tensors[0].is_cuda and "CUDAExecutionProvider" in self.session.get_providers():
            return self._run_cuda(tensors)
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors)}
        outputs = [torch.from_numpy(o) for o in self.session.run(self.output_names, feeds)]
        device = tensors[0].device if tensors else torch.device("cpu")
        outputs = [o.to(device) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _run_cuda(self, tensors):
        binding = self.session.io_binding()
        for name, t in zip(self.input_names, tensors):
            t = t.contiguous()
            binding.bind_input(name, "cuda", t.device.index or 0, _numpy_dtype(t.dtype), list(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", tensors[0].device.index or 0)
        self.session.run_with_iobinding(binding)
        outputs = [_to_torch(o) for o in binding.get_outputs()]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
            torch.bool: np.bool_}[dtype]


def _to_torch(ort_value) -> torch.Tensor:
    """An OrtValue on the GPU as a torch tensor, through DLPack (no copy)."""
    return torch.utils.dlpack.from_dlpack(ort_value.to_dlpack())
