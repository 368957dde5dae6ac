"""bamboo: compile ReLU-sparse LLMs so that their FFNs read only the weight rows of neurons that fire."""
from bamboo import (  # noqa: F401  (register torch.ops.bamboo.*, its device kernels, adapters for installed libraries)
    integrations,
    kernels,
    ops,
)
from bamboo.api import compile, export, export_onnx, export_tensorrt, export_tensorrt_onnx, inductor_pass, inspect
from bamboo.calibrate.train_predictors import calibrate as _calibrate
from bamboo.errors import BambooError

# `bamboo.calibrate(model, batches)` is the function (the design's API); import the subpackage's modules with
# `from bamboo.calibrate.corpus import ...`.
calibrate = _calibrate

__version__ = "0.1.0"
__all__ = ["BambooError", "calibrate", "compile", "export", "export_onnx", "export_tensorrt", "export_tensorrt_onnx",
           "inductor_pass", "inspect", "__version__"]
