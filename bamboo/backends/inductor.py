"""Lower the rewritten graph through TorchInductor (Triton on GPU, C++/OpenMP on CPU)."""
from bamboo.backends.registry import Backend, register_backend


@register_backend("inductor")
class InductorBackend(Backend):
    def __init__(self, mode=None, options=None):
        self.config_patches = dict(options or {})
        if mode == "reduce-overhead":
            self.config_patches.setdefault("triton.cudagraphs", True)
        elif mode == "max-autotune":
            self.config_patches.setdefault("max_autotune", True)
            self.config_patches.setdefault("triton.cudagraphs", True)
        elif mode not in (None, "default"):
            from bamboo.errors import InputError

            raise InputError(f"inductor mode must be None, 'default', 'reduce-overhead' or 'max-autotune', got {mode!r}")

    def compile_graph(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=self.config_patches)
