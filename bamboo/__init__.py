"""bamboo: compile ReLU-sparse LLMs so that their FFNs read only the weight rows of neurons that fire."""
from bamboo import ops  # noqa: F401  (registers torch.ops.bamboo.*)
from bamboo.api import compile, export, inspect
from bamboo.errors import BambooError

__version__ = "0.1.0"
__all__ = ["BambooError", "compile", "export", "inspect", "__version__"]
