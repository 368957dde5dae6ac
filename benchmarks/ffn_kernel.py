"""One FFN layer at Bamboo-7B shapes (hidden 4096, intermediate 14336, bf16): dense cuBLAS against the sparse
paths, batch 1-16, 5-50% of neurons.

    python benchmarks/ffn_kernel.py --json benchmarks/results/ffn_kernel.json --plot benchmarks/results/ffn_kernel.png

Variants (each a CUDA graph over `--layers` distinct random layers, so repeated runs do not sit in L2):
  dense      F.linear gate, up, relu*relu, F.linear down (cuBLAS)
  gather     naive torch: index_select the rows of gate, up and neuron-major down, then matmul
  exact      bamboo exact mode (Triton): dense gate + compaction, up/down only where needed (random weights)
  predictor  bamboo predictor mode (Triton), rank-256 random predictors, the threshold set per layer so that
             exactly k neurons pass over the batch ("forced k"), two ways: "cap k" (the op's capped path: scores
             in torch, a device top-k, grids sized to k) and "threshold only" (no cap, as calibrated predictors run
             by default: fused scoring + compaction, grids sized to every neuron)
  fixed grid the same exact and predictor calls on bamboo/kernels/fixed_grid_ffn.py (BAMBOO_FFN_KERNELS=fixed-grid:
             at most three launches, no compaction, no memset), beside the compacting kernels in the same run
The floor is the bytes the variant's code reads (benchmarks/read_bytes.py: the down kernel skips rows whose h is
0, so with random weights about a quarter of the selected neurons' down rows) over the best measured bandwidth
(copy or streaming read).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bamboo.kernels import predicted_sparse_ffn  # noqa: E402
from bamboo.kernels.fixed_grid_ffn import fixed_grid_sparse_ffn  # noqa: E402
from bamboo.kernels.sparse_ffn_triton import triton_sparse_ffn  # noqa: E402
from benchmarks.common import (  # noqa: E402
    copy_bandwidth,
    device_facts,
    median_host_ms,
    print_table,
    read_bandwidth,
    time_cuda_graph,
    write_json,
)
from benchmarks.read_bytes import layer_rows  # noqa: E402

HIDDEN, INTERMEDIATE, RANK = 4096, 14336, 256
DEVICE = "cuda"


timer = time_cuda_graph


def make_layers(n, dtype):
    layers = []
    for _ in range(n):
        gw = torch.randn(INTERMEDIATE, HIDDEN, device=DEVICE, dtype=dtype) / HIDDEN**0.5
        uw = torch.randn(INTERMEDIATE, HIDDEN, device=DEVICE, dtype=dtype) / HIDDEN**0.5
        dw = torch.randn(HIDDEN, INTERMEDIATE, device=DEVICE, dtype=dtype) / INTERMEDIATE**0.5
        layers.append(dict(gw=gw, uw=uw, dw=dw, dnm=dw.t().contiguous(),
                           p_in=torch.randn(RANK, HIDDEN, device=DEVICE, dtype=dtype) / HIDDEN**0.5,
                           p_out=torch.randn(INTERMEDIATE, RANK, device=DEVICE, dtype=dtype) / RANK**0.5))
    return layers


def forced_threshold(layer, x, k):
    """The score threshold that lets exactly k neurons through for this batch (random predictors: no real
    threshold exists, so the speed run forces the count)."""
    scores = (torch.relu(x @ layer["p_in"].t()) @ layer["p_out"].t()).float().amax(0)
    return scores.topk(k + 1).values[-1].item()


@contextlib.contextmanager
def ffn_kernels(choice):
    """BAMBOO_FFN_KERNELS for the block: the compacting kernels or the fixed-grid ones."""
    previous = os.environ.get("BAMBOO_FFN_KERNELS")
    os.environ["BAMBOO_FFN_KERNELS"] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ["BAMBOO_FFN_KERNELS"]
        else:
            os.environ["BAMBOO_FFN_KERNELS"] = previous


def rows_read(layers, xs, mode, thresholds=None, cap=0):
    """(gate, up, down) rows read per layer, averaged over layers, as the Triton kernels read them."""
    totals = [0, 0, 0]
    for i, (layer, x) in enumerate(zip(layers, xs)):
        predictor = None
        if mode == "predictor":
            predictor = SimpleNamespace(w_in=layer["p_in"], w_out=layer["p_out"], bias=None,
                                        threshold=thresholds[i], top_k=cap)
        totals = [t + r for t, r in zip(totals, layer_rows(x, layer["gw"], layer["uw"], mode, predictor=predictor))]
    return [t / len(layers) for t in totals]


def reads_bytes(rows):
    return sum(rows) * HIDDEN * 2  # bf16 rows of HIDDEN in gate, up and neuron-major down


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.15, 0.25, 0.50])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--tune", action="store_true", help="sweep kernel block sizes at batch 1 first")
    parser.add_argument("--json", default="benchmarks/results/ffn_kernel.json")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shapes, Triton's interpreter (TRITON_INTERPRET=1): checks the script only")
    args = parser.parse_args()
    global HIDDEN, INTERMEDIATE, RANK, DEVICE, timer
    if args.smoke:  # the script's logic on the CPU through Triton's interpreter: times mean nothing
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("ffn_kernel.py --smoke runs the Triton kernels in their CPU interpreter: set TRITON_INTERPRET=1")
        HIDDEN, INTERMEDIATE, RANK, DEVICE = 64, 448, 16, "cpu"
        copy_bw = read_bw = bandwidth = None
        timer = lambda fn, reps: median_host_ms(fn, reps=2, warmup=1)  # noqa: E731
    elif not torch.cuda.is_available():
        sys.exit("ffn_kernel.py needs an NVIDIA GPU (or --smoke with TRITON_INTERPRET=1 for a CPU check of the script)")
    else:
        copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
        bandwidth = max(copy_bw, read_bw)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    layers = make_layers(args.layers, dtype)
    elt = 2
    weight_bytes = 3 * HIDDEN * INTERMEDIATE * elt
    predictor_bytes = (RANK * HIDDEN + INTERMEDIATE * RANK) * elt
    row_bytes = HIDDEN * elt
    L = len(layers)
    blocks = {}
    results, table = [], []

    def record(batch, variant, fraction, ms, nbytes, dense_ms, label=""):
        floor_ms = nbytes / bandwidth * 1e3 if bandwidth else None
        row = dict(batch=batch, variant=variant, neurons=fraction, ms=ms, bytes=nbytes, gbps=nbytes / ms / 1e6,
                   floor_ms=floor_ms, floor_share=floor_ms / ms if floor_ms else None,
                   speedup_vs_dense=dense_ms / ms, label=label)
        results.append(row)
        table.append([batch, variant + (f" ({label})" if label else ""), f"{fraction:.0%}", f"{ms:.4f}",
                      f"{row['gbps']:.0f}", f"{floor_ms:.4f}" if floor_ms else "-",
                      f"{row['floor_share']:.0%}" if floor_ms else "-", f"{row['speedup_vs_dense']:.2f}x"])

    if args.tune:
        xs = [torch.randn(1, HIDDEN, device=DEVICE, dtype=dtype) for _ in layers]
        k = int(0.15 * INTERMEDIATE)
        best = {}
        thresholds = [forced_threshold(l, x, k) for l, x in zip(layers, xs)]
        for mode in ("exact", "predictor"):
            for bn in (16, 32):
                for bk in (256, 512):
                    for dbn in (32, 64, 128):
                        for bh in (128, 256):
                            cfg = dict(block_n=bn, block_k=bk, down_block_n=dbn, block_h=bh,
                                       gate_block=128 if mode == "exact" else 64)
                            if mode == "exact":
                                fn = lambda: [triton_sparse_ffn(x, l["gw"], None, l["uw"], None, l["dnm"], None, "relu",  # noqa: E731
                                                                **cfg) for l, x in zip(layers, xs)]
                            else:
                                fn = lambda: [predicted_sparse_ffn(x, l["gw"], l["uw"], l["dnm"], l["p_in"], l["p_out"],  # noqa: E731
                                                                   k=k, threshold=t, **cfg)
                                              for l, x, t in zip(layers, xs, thresholds)]
                            try:
                                ms = timer(fn, reps=10) / L
                            except Exception as exc:  # a config the compiler refuses (shared memory, say)
                                print(f"  {mode} {cfg}: failed ({type(exc).__name__})")
                                continue
                            print(f"  {mode} {cfg}: {ms:.4f} ms", flush=True)
                            if mode not in best or ms < best[mode][0]:
                                best[mode] = (ms, cfg)
        blocks = {mode: cfg for mode, (_, cfg) in best.items()}
        print("best blocks:", blocks, flush=True)

    for batch in args.batches:
        xs = [torch.randn(batch, HIDDEN, device=DEVICE, dtype=dtype) for _ in layers]
        dense_ms = timer(lambda: [F.linear(F.relu(F.linear(x, l["gw"])) * F.relu(F.linear(x, l["uw"])), l["dw"])
                                            for l, x in zip(layers, xs)], reps=args.reps) / L
        record(batch, "dense", 1.0, dense_ms, weight_bytes, dense_ms)
        exact_ms = timer(lambda: [triton_sparse_ffn(x, l["gw"], None, l["uw"], None, l["dnm"], None, "relu",
                                                              **blocks.get("exact", {})) for l, x in zip(layers, xs)],
                                   reps=args.reps) / L
        reads = rows_read(layers, xs, "exact")
        record(batch, "exact", reads[2] / INTERMEDIATE, exact_ms, reads_bytes(reads), dense_ms,
               f"gate {reads[1] / INTERMEDIATE:.0%} active")
        fixed_ms = timer(lambda: [fixed_grid_sparse_ffn(x, l["gw"], None, l["uw"], None, l["dnm"], None, "relu")
                                  for l, x in zip(layers, xs)], reps=args.reps) / L
        record(batch, "exact", reads[2] / INTERMEDIATE, fixed_ms, reads_bytes(reads), dense_ms,
               f"fixed grid; gate {reads[1] / INTERMEDIATE:.0%} active")
        for fraction in args.fractions:
            k = int(round(fraction * INTERMEDIATE))
            ids = [torch.randperm(INTERMEDIATE, device=DEVICE)[:k] for _ in layers]

            def gather():
                out = []
                for l, x, idx in zip(layers, xs, ids):
                    h = F.relu(F.linear(x, l["gw"].index_select(0, idx))) * F.relu(F.linear(x, l["uw"].index_select(0, idx)))
                    out.append(h @ l["dnm"].index_select(0, idx))
                return out

            record(batch, "gather", fraction, timer(gather, reps=args.reps) / L, 3 * k * row_bytes, dense_ms)
            thresholds = [forced_threshold(l, x, k) for l, x in zip(layers, xs)]
            for choice, label, cap in (("compact", "cap k", k), ("compact", "threshold only", None),
                                       ("fixed-grid", "fixed grid, cap k", k),
                                       ("fixed-grid", "fixed grid, threshold only", None)):
                with ffn_kernels(choice):
                    ms = timer(lambda: [predicted_sparse_ffn(x, l["gw"], l["uw"], l["dnm"], l["p_in"], l["p_out"],
                                                             k=cap, threshold=t, **blocks.get("predictor", {}))
                                        for l, x, t in zip(layers, xs, thresholds)], reps=args.reps) / L
                reads = rows_read(layers, xs, "predictor", thresholds, cap or 0)
                record(batch, "predictor", fraction, ms, reads_bytes(reads) + predictor_bytes, dense_ms,
                       f"forced k, {label}; down rows {reads[2] / INTERMEDIATE:.1%}")

    headers = ["batch", "variant", "neurons", "ms", "GB/s", "floor ms", "floor/time", "vs dense"]
    print_table(headers, table)
    data = dict(benchmark="ffn_kernel", facts=device_facts(), copy_bandwidth_bytes_per_s=copy_bw,
                read_bandwidth_bytes_per_s=read_bw, floor_bandwidth_bytes_per_s=bandwidth,
                smoke=args.smoke, shapes=dict(hidden=HIDDEN, intermediate=INTERMEDIATE, predictor_rank=RANK, dtype=str(dtype),
                            layers_per_graph=L), reps=args.reps, blocks=blocks, results=results,
                command=" ".join(["python"] + sys.argv))
    write_json(args.json, data)
    if bandwidth:
        print(f"wrote {args.json}; copy {copy_bw / 1e12:.2f} TB/s, streaming read {read_bw / 1e12:.2f} TB/s")
    if args.plot:
        from benchmarks.plot_ffn_kernel import plot

        plot(data, args.plot)


if __name__ == "__main__":
    main()
