"""Timing helpers shared by the benchmarks: CUDA-graph replays timed with events, medians, device facts."""
from __future__ import annotations

import json
import math
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


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights (std 0.02, as in training init) in every matrix: speed runs need no trained model."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return module


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of all parameters (tied ones once) and of the FFN ones: what a dense decode step reads."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    ffn = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp." in n)
    return total, ffn


def ffn_modules(model) -> dict:
    """{module path: BambooMLP} of a Bamboo causal LM, as predictors name them."""
    return {f"model.layers.{i}.mlp": layer.mlp for i, layer in enumerate(model.model.layers)}


def forced_k_predictors(mlps: dict, fraction: float, rank: int = 256):
    """Random rank-`rank` predictors for the FFNs in `mlps` ({module path: BambooMLP}) whose threshold lets every
    neuron through and whose cap keeps the top `fraction` of them: a speed run at a chosen k ("forced k"), since
    random weights have no real predictor."""
    from bamboo.calibrate.predictors import LayerPredictor, Predictors, fingerprint

    layers, k = [], 0
    for name, mlp in mlps.items():
        gate = mlp.gate_proj.weight
        intermediate, hidden = gate.shape
        k = int(round(fraction * intermediate))
        w_in = torch.randn(rank, hidden, device=gate.device, dtype=gate.dtype) / hidden**0.5
        w_out = torch.randn(intermediate, rank, device=gate.device, dtype=gate.dtype) / rank**0.5
        layers.append(LayerPredictor(name, w_in, w_out, torch.zeros_like(w_out[:, 0]), -math.inf, fingerprint(gate),
                                     top_k=k))
    return Predictors(layers, {"rank": rank, "forced_k": k})


def forced_threshold_predictors(capped, inputs):
    """The predictors of `forced_k_predictors` without their cap, each with the threshold that lets k neurons
    through for its layer's input in `inputs` ({module path: FFNInput}, benchmarks/read_bytes.py): the uncapped
    path calibrated predictors take (their default), at about the same k."""
    from dataclasses import replace

    from bamboo.calibrate.predictors import Predictors

    layers = []
    for name, p in capped.items():
        best = p.scores(inputs[name].x).amax(0)
        threshold = best.topk(p.top_k + 1).values[-1].item() if p.top_k < best.numel() else -math.inf
        layers.append(replace(p, threshold=threshold, top_k=0))
    return Predictors(layers, dict(capped.meta, forced_k=None, forced_threshold=True))


def predictor_bytes(predictors) -> int:
    return sum((p.w_in.numel() + p.w_out.numel() + p.bias.numel()) * p.w_in.element_size()
               for p in predictors.values())


def median_host_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median wall milliseconds of `fn()` (which must return only when its work is done)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
