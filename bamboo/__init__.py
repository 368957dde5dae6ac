"""bamboo: compile ReLU-sparse LLMs so that their FFNs read only the weight rows of neurons that fire."""
from bamboo import (
    integrations,  # noqa: F401  (adapters and Auto classes for installed libraries)
    ops,  # noqa: F401  (registers torch.ops.bamboo.*)
)
from bamboo.api import compile, export, inspect
from bamboo.calibrate.train_predictors import calibrate as _calibrate
from bamboo.errors import BambooError
from bamboo.onnx.export import export_onnx

# `bamboo.calibrate(model, batches)` is the function (the design's API); import the subpackage's modules with
# `from bamboo.calibrate.corpus import ...`.
calibrate = _calibrate

__version__ = "0.1.0"
__all__ = ["BambooError", "calibrate", "compile", "export", "export_onnx", "inspect", "__version__"]
