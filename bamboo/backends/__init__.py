"""Backends: eager and inductor, behind one registry."""
from bamboo.backends import eager, inductor  # noqa: F401  (register themselves)
from bamboo.backends.registry import (
    Backend,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "available_backends", "get_backend", "register_backend"]
