"""transformers integration: capture adapters for transformers models, an experts implementation that runs
MoE experts one at a time, and the Bamboo classes registered with transformers' Auto classes."""
from bamboo.graph.capture import register_capture_adapter
from bamboo.integrations.transformers import auto_classes, moe
from bamboo.integrations.transformers.capture import transformers_adapter

register_capture_adapter(transformers_adapter)
try:
    moe.register()
except ImportError:  # transformers 4.x has no experts interface
    pass
auto_classes.register()
