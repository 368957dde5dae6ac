"""Timing helpers shared by the benchmarks: CUDA-graph replays timed with events, medians, device facts."""
from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import torch


def device_facts() -> dict:
    facts = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if torch.cuda.is_available():
        facts.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                     memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return facts


def time_cuda_graph(fn, reps: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of one replay of a CUDA graph that runs `fn` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 4
    a, b = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    ms = time_cuda_graph(lambda: b.copy_(a), reps=20)

    return 2 * n * 4 / (ms / 1e3)


def read_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a large bf16 reduction: the access pattern of a GEMV (read-only, streaming)."""
    n = int(gib * 2**30) // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda_graph(lambda: torch.sum(a, dtype=torch.float32), reps=20)

    return n * 2 / (ms / 1e3)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def print_table(headers, rows) -> None:
    from bamboo.graph.site_table import format_table

    print(format_table(headers, rows), flush=True)
