"""Error types. Every message names the problem and the fix; callers never see a deep traceback."""


class BambooError(Exception):
    """Base class for errors raised by bamboo."""


class ConfigError(BambooError, ValueError):
    """A model configuration that cannot describe a Bamboo model."""


class CheckpointError(BambooError, OSError):
    """A checkpoint directory or file that cannot be loaded or saved."""


class InputError(BambooError, ValueError):
    """Arguments of the wrong shape, dtype or value."""


class CompileError(BambooError, RuntimeError):
    """A model or graph the compiler cannot handle."""


class MissingDependencyError(BambooError, ImportError):
    """An optional dependency (a backend, the tokenizer) is not installed."""


def require(module_name: str, extra: str, purpose: str):
    """Import an optional dependency or raise a MissingDependencyError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{module_name}', which is not installed "
            f"({exc}). Install it with: pip install 'bamboo-compiler[{extra}]'"
        ) from None
