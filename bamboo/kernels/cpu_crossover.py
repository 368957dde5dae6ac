"""When the CPU sparse FFN is slower than dense: the crossover share of active neurons, measured on this machine.

Sparse reads fewer bytes but reads them with less regular access than a dense GEMV or GEMM (gathered rows; with
more rows, dense matmuls reach compute efficiency the row loop does not), and it pays fixed costs (predictor mode's
scoring and selection) that matter on small FFNs. So the op asks `crossover(dtype, rows, ffn_bytes, mode)`: above
that share of neurons the dense FFN is faster and runs instead. The share is measured, not guessed: the whole op
(dispatch included) forced sparse at a chosen share of neurons against the dense FFN as an uncompiled model runs
it (three F.linear calls, no custom op), on one representative shape per shape
class ("cache": the FFN fits in the last-level cache, as a small model's does; "memory": it does not, as a 1B-7B
model's does), for the call's mode, dtype and row bucket (1, 2, 4, 8, 16). Each result is kept in memory and in a
JSON file under the user cache directory, keyed by the CPU model, core and thread counts, the kernel build (its
name hashes the source, torch version and CPU flags), dtype, shape class, rows and mode, so each is measured once
per machine (about a second each, under 10 s for the memory class). A crossover below REWRITE_MIN_SHARE at one row
means the op cannot beat the model's own dense FFN at the shares real FFNs run at that size: bamboo.compile then
leaves such FFNs unrewritten and reports why (`dense_is_faster`), since even the op's dense fallback pays its
dispatch.

Tests must not depend on timing: BAMBOO_CPU_CROSSOVER (a share, e.g. 1.0 = always sparse, 0 = always dense) or
`set_crossover(value)` fixes it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

SHARES = (0.05, 0.25, 0.5, 0.75, 1.0)
ROW_BUCKETS = (1, 2, 4, 8, 16)
# bamboo.compile rewrites an FFN on a CPU only where the sparse op wins with at least this share of neurons active at
# one row: random-weight dReLU gates run about half their neurons, trained ones a quarter or more of the gate (the
# share exact mode reads up rows for); below it, a measured win is too narrow (and too close to the noise) to pay.
REWRITE_MIN_SHARE = 0.25
CACHE_CLASS_BYTES = 16 << 20  # FFN weights up to this size stay in this class's caches between calls
SHAPES = {"cache": (256, 1024), "memory": (2048, 5632)}  # (hidden, intermediate): austen-small, a ~1B model

_override: Optional[float] = None
_known: dict[str, float] = {}
_lock = threading.Lock()


def set_crossover(value: Optional[float]) -> None:
    """Fix the crossover share for every call (None: measure again)."""
    global _override
    _override = value


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "bamboo" / "cpu_crossover.json"


def shape_class(ffn_bytes: int) -> str:
    return "cache" if ffn_bytes <= CACHE_CLASS_BYTES else "memory"


def row_bucket(rows: int) -> int:
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


@functools.lru_cache(maxsize=None)
def machine() -> str:
    from bamboo.kernels.cpu_build import cpu_signature

    model = next((ln.split(":", 1)[1].strip() for ln in cpu_signature().splitlines() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model} x{os.cpu_count()} threads={torch.get_num_threads()}"


def key(dtype: torch.dtype, rows: int, klass: str, mode: str) -> str:
    from bamboo.kernels.cpu_build import library_name  # another kernel build (an edited source) measures afresh

    return (f"{machine()}|{library_name()}|{str(dtype).removeprefix('torch.')}|{klass}|rows {row_bucket(rows)}"
            f"|{mode}|vs eager")


def crossover(dtype: torch.dtype, rows: int, ffn_bytes: int, mode: str = "exact") -> float:
    """The share of neurons above which the dense FFN is faster on this machine, for exact or predictor mode."""
    if _override is not None:
        return _override
    env = os.environ.get("BAMBOO_CPU_CROSSOVER")
    if env:
        return float(env)
    klass = shape_class(ffn_bytes)
    fast = (dtype, row_bucket(rows), klass, mode, torch.get_num_threads())  # the per-call lookup: no string building
    if fast in _known:
        return _known[fast]
    k = key(dtype, rows, klass, mode)
    with _lock:
        if k not in _known:
            stored = _read_cache()
            if k not in stored:
                value = measure(dtype, row_bucket(rows), *SHAPES[klass], mode=mode)["crossover"]
                stored = _read_cache()  # merge with what other processes wrote meanwhile
                stored[k] = value
                _write_cache(stored)
            _known[k] = _known[fast] = stored[k]
    return _known[k]


@contextlib.contextmanager
def forced(value: Optional[float]):
    """Fix the crossover inside this block (the measurement forces the sparse path with it)."""
    global _override
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


def dense_is_faster(dtype: torch.dtype, device: torch.device, ffn_bytes: int, mode: str) -> str:
    """Why an FFN of this size should stay the model's own dense FFN on this CPU ("" when the sparse op can win):
    the measured crossover at one row (decode) is below REWRITE_MIN_SHARE, so the op would mostly add its dispatch
    to a dense FFN."""
    from bamboo.kernels import cpu_build

    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or mode not in ("exact", "predictor") \
            or not cpu_build.available():
        return ""
    share = crossover(dtype, 1, ffn_bytes, mode)
    if share >= REWRITE_MIN_SHARE:
        return ""
    wins = "at no share of active neurons" if share <= 0 else f"only below {share:.0%} of neurons active"
    return (f"left dense: on this CPU the model's dense FFN is faster than bamboo's sparse op at this size "
            f"({ffn_bytes / 2**20:.1f} MiB of {str(dtype).removeprefix('torch.')} weights, {mode} mode: the sparse "
            f"op wins {wins} at one row, measured; {cache_path()}); keep_dense_where_faster=False or "
            "BAMBOO_CPU_CROSSOVER=1 rewrites it anyway")


def measure(dtype: torch.dtype, rows: int, hidden: int, intermediate: int, mode: str = "exact", reps: int = 7) -> dict:
    """Best ms of the whole op (`torch.ops.bamboo.sparse_ffn`, its Python wrapper and, in predictor mode, its
    selection included) forced sparse at each share in SHARES, and of the eager dense FFN (F.linear x3, as the
    uncompiled model runs it); calls interleaved. Exact
    mode's share is set through the gate bias (that share of neurons has a positive gate), predictor mode's through
    the cap k. The crossover share by linear interpolation between the measured points (1.0 when sparse wins
    everywhere, 0.0 when it never does). Delete the cache file (`cache_path()`) to measure again, on a quiet machine."""
    gen = torch.Generator().manual_seed(0)
    rank = max(8, hidden // 8)

    def r(*shape):
        return torch.randn(*shape, generator=gen).mul_(shape[-1] ** -0.5).to(dtype)

    x = r(rows, hidden)
    layers = 4 if intermediate * hidden * 6 > CACHE_CLASS_BYTES else 1  # memory class: rotate, so no run hits cache
    ws = [(r(intermediate, hidden), r(intermediate, hidden), r(hidden, intermediate), r(rank, hidden),
           r(intermediate, rank)) for _ in range(layers)]
    op = torch.ops.bamboo.sparse_ffn.default
    dense_bias = torch.zeros(intermediate, dtype=dtype)

    def eager_dense():
        for g, u, d, _, _ in ws:
            F.linear(torch.relu(F.linear(x, g, dense_bias)) * torch.relu(F.linear(x, u)), d)

    def variant(m, share=1.0):
        k = max(1, round(share * intermediate))
        bias = torch.full((intermediate,), -10.0)  # finite and <= 0: exact mode skips the neuron
        bias[torch.randperm(intermediate, generator=gen)[:k]] = 10.0
        bias = bias.to(dtype)

        def run():
            for g, u, d, p_in, p_out in ws:
                op(x, g, bias, u, None, d, None, None, p_in, p_out, None, "drelu", m, "relu", -math.inf,
                   k if m == "predictor" else 0)
        return run

    fns = [eager_dense] + [variant(mode, s) for s in SHARES]
    times = [[] for _ in fns]
    with forced(1.0):
        for fn in fns:
            fn()  # warm up (and the neuron-major copies)
        for _ in range(reps):  # interleaved, and the best of each: a burst of other work hits every variant alike
            for t, fn in zip(times, fns):
                start = time.perf_counter()
                fn()
                t.append((time.perf_counter() - start) * 1e3 / len(ws))
    dense_ms, sparse_ms = min(times[0]), [min(t) for t in times[1:]]
    return dict(mode=mode, shares=list(SHARES), sparse_ms=sparse_ms, dense_ms=dense_ms,
                crossover=interpolate(list(SHARES), sparse_ms, dense_ms))


def interpolate(shares: list, sparse_ms: list, dense_ms: float) -> float:
    """The share where the sparse time (piecewise linear in the share) reaches the dense time."""
    if sparse_ms[0] >= dense_ms:
        return 0.0
    for (s0, t0), (s1, t1) in zip(zip(shares, sparse_ms), zip(shares[1:], sparse_ms[1:])):
        if t1 >= dense_ms:
            return s0 + (s1 - s0) * (dense_ms - t0) / (t1 - t0) if t1 > t0 else s0
    return 1.0


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(data: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # a read-only home: measured again in the next process
