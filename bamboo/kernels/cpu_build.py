"""Builds and loads the CPU kernel (kernels/cpu/sparse_ffn.cpp) just in time, once per machine.

`torch.utils.cpp_extension.load` compiles it with g++ -O3 -march=native -fopenmp into torch's extensions directory
(about a minute on 2 cores, the first time only); later processes load the cached library in milliseconds. The
library's name carries a hash of the source, the torch version and the CPU's flags, so an edited source, another
torch or a machine with other vector units never loads a stale or illegal build. Where it cannot build (no
compiler, no ninja) bamboo warns once and the op runs its torch reference.

BAMBOO_CPU_KERNEL=0 turns the kernel off (the op then runs the reference), for comparisons and debugging.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu") / "sparse_ffn.cpp"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def enabled() -> bool:
    return os.environ.get("BAMBOO_CPU_KERNEL", "1") != "0"


@functools.lru_cache(maxsize=None)
def cpu_signature() -> str:
    """The CPU model and its flags (a -march=native build runs only where they match)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def library_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + cpu_signature().encode())
    return "bamboo_cpu_sparse_ffn_" + digest.hexdigest()[:12]


def available() -> bool:
    """True when torch.ops.bamboo_cpu.sparse_ffn is loaded (building it first if needed)."""
    if not enabled():
        return False
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
    return _state["ok"]


def _build() -> bool:
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=library_name(), sources=[str(SOURCE)], is_python_module=False, verbose=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
        torch.ops.bamboo_cpu.sparse_ffn  # noqa: B018  (raises if the library did not register the op)
        return True
    except Exception as exc:  # no compiler, no ninja, a compile error: the reference still works
        warnings.warn(f"bamboo: the CPU sparse FFN kernel could not be built ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); bamboo::sparse_ffn runs "
                      "its torch reference on the CPU, which is slower than dense. Install g++ and ninja "
                      "(pip install ninja) to get it.", RuntimeWarning, stacklevel=3)
        return False
