"""Integrations with model libraries: what bamboo knows about a library's models lives here, never in the passes.

`transformers` (when installed): capture adapters for transformers models (caches off for export, MoE experts
run one at a time) and the Bamboo classes registered with transformers' Auto classes."""
import importlib.util

if importlib.util.find_spec("transformers") is not None:
    from bamboo.integrations import transformers as _transformers  # noqa: F401  (registers on import)
