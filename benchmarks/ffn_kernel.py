"""One FFN layer at Bamboo-7B shapes (hidden 4096, intermediate 14336, bf16): dense cuBLAS against the sparse
paths, batch 1-16, 5-50% of neurons.

    python benchmarks/ffn_kernel.py --json benchmarks/results/ffn_kernel.json --plot benchmarks/results/ffn_kernel.png

Variants (each a CUDA graph over `--layers` distinct random layers, so repeated runs do not sit in L2):
  dense      F.linear gate, up, relu*relu, F.linear down (cuBLAS)
  gather     naive torch: index_select the rows of gate, up and neuron-major down, then matmul
  exact      bamboo exact mode (Triton): dense gate + compaction, up/down only where needed (random weights)
  predictor  bamboo predictor mode (Triton): rank-256 random predictor, fused scoring + threshold selection; the
             threshold is set per layer so that exactly k neurons pass over the batch ("forced k")
  topk       the same predictor with torch.topk selection (static k)
The floor is the bytes the variant must read over the best measured bandwidth (copy or streaming read).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bamboo.kernels import predicted_sparse_ffn  # noqa: E402
from bamboo.kernels.sparse_ffn_triton import triton_sparse_ffn  # noqa: E402
from benchmarks.common import (  # noqa: E402
    copy_bandwidth,
    device_facts,
    print_table,
    read_bandwidth,
    time_cuda_graph,
    write_json,
)

HIDDEN, INTERMEDIATE, RANK = 4096, 14336, 256


def make_layers(n, dtype):
    layers = []
    for _ in range(n):
        gw = torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=dtype) / HIDDEN**0.5
        uw = torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=dtype) / HIDDEN**0.5
        dw = torch.randn(HIDDEN, INTERMEDIATE, device="cuda", dtype=dtype) / INTERMEDIATE**0.5
        layers.append(dict(gw=gw, uw=uw, dw=dw, dnm=dw.t().contiguous(),
                           p_in=torch.randn(RANK, HIDDEN, device="cuda", dtype=dtype) / HIDDEN**0.5,
                           p_out=torch.randn(INTERMEDIATE, RANK, device="cuda", dtype=dtype) / RANK**0.5))
    return layers


def forced_threshold(layer, x, k):
    """The score threshold that lets exactly k neurons through for this batch (random predictors: no real
    threshold exists, so the speed run forces the count)."""
    scores = (torch.relu(x @ layer["p_in"].t()) @ layer["p_out"].t()).float().amax(0)
    return scores.topk(k + 1).values[-1].item()


def active_fractions(layers, xs):
    """Union over rows of gate>0 and of the nonzero product, averaged over layers."""
    gate, product = [], []
    for layer, x in zip(layers, xs):
        g = F.linear(x, layer["gw"]) > 0
        p = g & (F.linear(x, layer["uw"]) > 0)
        gate.append(g.any(0).float().mean().item())
        product.append(p.any(0).float().mean().item())
    return sum(gate) / len(gate), sum(product) / len(product)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.15, 0.25, 0.50])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--tune", action="store_true", help="sweep kernel block sizes at batch 1 first")
    parser.add_argument("--json", default="benchmarks/results/ffn_kernel.json")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ffn_kernel.py needs an NVIDIA GPU")
    torch.manual_seed(0)
    dtype = torch.bfloat16
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    bandwidth = max(copy_bw, read_bw)
    layers = make_layers(args.layers, dtype)
    elt = 2
    weight_bytes = 3 * HIDDEN * INTERMEDIATE * elt
    predictor_bytes = (RANK * HIDDEN + INTERMEDIATE * RANK) * elt
    row_bytes = HIDDEN * elt
    L = len(layers)
    blocks = {}
    results, table = [], []

    def record(batch, variant, fraction, ms, nbytes, dense_ms, label=""):
        floor_ms = nbytes / bandwidth * 1e3
        row = dict(batch=batch, variant=variant, neurons=fraction, ms=ms, bytes=nbytes, gbps=nbytes / ms / 1e6,
                   floor_ms=floor_ms, floor_share=floor_ms / ms, speedup_vs_dense=dense_ms / ms, label=label)
        results.append(row)
        table.append([batch, variant + (f" ({label})" if label else ""), f"{fraction:.0%}", f"{ms:.4f}",
                      f"{row['gbps']:.0f}", f"{floor_ms:.4f}", f"{row['floor_share']:.0%}",
                      f"{row['speedup_vs_dense']:.2f}x"])

    if args.tune:
        xs = [torch.randn(1, HIDDEN, device="cuda", dtype=dtype) for _ in layers]
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
                                ms = time_cuda_graph(fn, reps=10) / L
                            except Exception as exc:  # a config the compiler refuses (shared memory, say)
                                print(f"  {mode} {cfg}: failed ({type(exc).__name__})")
                                continue
                            print(f"  {mode} {cfg}: {ms:.4f} ms", flush=True)
                            if mode not in best or ms < best[mode][0]:
                                best[mode] = (ms, cfg)
        blocks = {mode: cfg for mode, (_, cfg) in best.items()}
        print("best blocks:", blocks, flush=True)

    for batch in args.batches:
        xs = [torch.randn(batch, HIDDEN, device="cuda", dtype=dtype) for _ in layers]
        dense_ms = time_cuda_graph(lambda: [F.linear(F.relu(F.linear(x, l["gw"])) * F.relu(F.linear(x, l["uw"])), l["dw"])
                                            for l, x in zip(layers, xs)], reps=args.reps) / L
        record(batch, "dense", 1.0, dense_ms, weight_bytes, dense_ms)
        gate_frac, product_frac = active_fractions(layers, xs)
        exact_ms = time_cuda_graph(lambda: [triton_sparse_ffn(x, l["gw"], None, l["uw"], None, l["dnm"], None, "relu",
                                                              **blocks.get("exact", {})) for l, x in zip(layers, xs)],
                                   reps=args.reps) / L
        exact_bytes = HIDDEN * INTERMEDIATE * elt + (gate_frac + product_frac) * INTERMEDIATE * row_bytes
        record(batch, "exact", product_frac, exact_ms, exact_bytes, dense_ms, f"gate {gate_frac:.0%} active")
        for fraction in args.fractions:
            k = int(round(fraction * INTERMEDIATE))
            ids = [torch.randperm(INTERMEDIATE, device="cuda")[:k] for _ in layers]

            def gather():
                out = []
                for l, x, idx in zip(layers, xs, ids):
                    h = F.relu(F.linear(x, l["gw"].index_select(0, idx))) * F.relu(F.linear(x, l["uw"].index_select(0, idx)))
                    out.append(h @ l["dnm"].index_select(0, idx))
                return out

            sparse_bytes = 3 * k * row_bytes
            record(batch, "gather", fraction, time_cuda_graph(gather, reps=args.reps) / L, sparse_bytes, dense_ms)
            thresholds = [forced_threshold(l, x, k) for l, x in zip(layers, xs)]
            pred_ms = time_cuda_graph(lambda: [predicted_sparse_ffn(x, l["gw"], l["uw"], l["dnm"], l["p_in"], l["p_out"],
                                                                    k=k, threshold=t, **blocks.get("predictor", {}))
                                               for l, x, t in zip(layers, xs, thresholds)], reps=args.reps) / L
            record(batch, "predictor", fraction, pred_ms, sparse_bytes + predictor_bytes, dense_ms, "forced k")
            if batch == 1:
                topk_ms = time_cuda_graph(lambda: [predicted_sparse_ffn(x, l["gw"], l["uw"], l["dnm"], l["p_in"],
                                                                        l["p_out"], k=k, **blocks.get("predictor", {}))
                                                   for l, x in zip(layers, xs)], reps=args.reps) / L
                record(batch, "topk", fraction, topk_ms, sparse_bytes + predictor_bytes, dense_ms, "torch.topk")

    headers = ["batch", "variant", "neurons", "ms", "GB/s", "floor ms", "floor/time", "vs dense"]
    print_table(headers, table)
    data = dict(benchmark="ffn_kernel", facts=device_facts(), copy_bandwidth_bytes_per_s=copy_bw,
                read_bandwidth_bytes_per_s=read_bw, floor_bandwidth_bytes_per_s=bandwidth,
                shapes=dict(hidden=HIDDEN, intermediate=INTERMEDIATE, predictor_rank=RANK, dtype=str(dtype),
                            layers_per_graph=L), reps=args.reps, blocks=blocks, results=results,
                command=" ".join(["python"] + sys.argv))
    write_json(args.json, data)
    print(f"wrote {args.json}; copy {copy_bw / 1e12:.2f} TB/s, streaming read {read_bw / 1e12:.2f} TB/s")
    if args.plot:
        from benchmarks.plot_ffn_kernel import plot

        plot(data, args.plot)


if __name__ == "__main__":
    main()
