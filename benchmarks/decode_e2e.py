"""Decode speed of a whole Bamboo-shaped model (random weights, bf16), side by side with dense baselines.

    python benchmarks/decode_e2e.py --config bamboo-7b --json benchmarks/results/decode_e2e.json

Rows (one run, same model object, same static KV cache code): dense eager; dense torch.compile
(Inductor, CUDA graphs, the same model code); bamboo exact and bamboo predictor (forced k: random rank-256
predictors whose threshold lets every neuron through and whose cap keeps k, labelled) through
bamboo.compile(backend="inductor", mode="reduce-overhead"). Decode tok/s = batch x (new tokens - 1) / the time
of the decode steps (prefill excluded: a 1-token generate is subtracted). The floor reads every byte once.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bamboo  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM  # noqa: E402
from benchmarks.common import (  # noqa: E402
    device_facts,
    forced_k_predictors,
    predictor_bytes,
    print_table,
    read_bandwidth,
    write_json,
)


def decode_seconds(model, prompt, new_tokens, repeats):
    cache_len = prompt.shape[1] + new_tokens  # one cache shape for the long and the short run: same graphs

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, eos_token_id=None, cache_bucket=cache_len, keep_cache=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens)  # compile / record graphs
    run(2)
    full = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    short = sorted(run(1) for _ in range(repeats))[repeats // 2]
    return (full - short) / (new_tokens - 1)


def onnxruntime_decode_table(args, config, bandwidth, rows):
    """ORT CUDA EP rows (fp16: ORT has no bf16 TopK), from benchmarks/onnxruntime_rows.py's decode step."""
    import tempfile

    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        print("onnxruntime rows skipped: onnxruntime-gpu (CUDAExecutionProvider) is not installed", flush=True)
        return []
    from benchmarks.onnxruntime_rows import decode_rows

    layers = args.ort_layers or config.num_hidden_layers
    ort_config = BambooConfig.named(args.config, num_hidden_layers=layers)
    with tempfile.TemporaryDirectory(prefix="bamboo-ort-decode-") as tmp:
        new = decode_rows(ort_config, torch.device("cuda"), torch.float16, args.batch, args.fractions, args.prompt,
                          args.new, Path(tmp), bandwidth)
    for r in new:
        r["variant"] = f"{r['variant']} ({layers} layers, fp16)"
    rows += new
    return [[r["batch"], r["variant"], f"{r['ms']:.2f}", f"{r['tok_s']:.1f}",
             f"{r['batch'] * 1e3 / r['floor_ms']:.0f}", f"{r['floor_ms'] / r['ms']:.0%}", f"{r['vs_dense']:.2f}x vs ORT",
             "ORT CUDA EP, IOBinding"] for r in new]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bamboo-7b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.15])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled", "exact", "predictor", "onnxruntime"])
    parser.add_argument("--ort-layers", type=int, default=None,
                        help="layers of the model the ONNX Runtime rows export (default: all; fp16, CUDA EP)")
    parser.add_argument("--json", default="benchmarks/results/decode_e2e.json")
    parser.add_argument("--plot", default="benchmarks/results/decode_e2e.png")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_e2e.py needs an NVIDIA GPU")
    torch.manual_seed(0)
    config = BambooConfig.named(args.config)
    with torch.device("cuda"):
        model = BambooForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.reset_non_persistent_buffers("cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = read_bandwidth()
    ffn_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp." in n)
    rows, table = [], []
    for batch in args.batch:
        prompt = torch.randint(3, config.vocab_size, (batch, args.prompt), device="cuda")
        dense_compiled = None

        def record(variant, seconds, nbytes, note=""):
            tok_s = batch / seconds
            floor = batch * bandwidth / nbytes
            row = dict(batch=batch, variant=variant, step_ms=seconds * 1e3, tok_s=tok_s, floor_tok_s=floor,
                       floor_share=tok_s / floor, bytes_per_step=nbytes, note=note,
                       vs_dense_compiled=(tok_s / dense_compiled) if dense_compiled else None)
            rows.append(row)
            table.append([batch, variant, f"{seconds * 1e3:.2f}", f"{tok_s:.1f}", f"{floor:.0f}",
                          f"{tok_s / floor:.0%}", f"{row['vs_dense_compiled']:.2f}x" if dense_compiled else "-", note])
            print(table[-1], flush=True)

        with torch.no_grad():
            if "eager" in args.variants:
                record("dense eager", decode_seconds(model, prompt, args.new, args.repeats), weight_bytes)
            if "compiled" in args.variants:
                compiled = bamboo.compile(model, backend="inductor", sparsity="dense", mode="reduce-overhead",
                                          dynamic=False)
                seconds = decode_seconds(compiled, prompt, args.new, args.repeats)
                dense_compiled = batch / seconds
                record("dense torch.compile + CUDA graphs", seconds, weight_bytes)
                del compiled
            if "exact" in args.variants:
                compiled = bamboo.compile(model, backend="inductor", sparsity="exact", mode="reduce-overhead",
                                          dynamic=False)
                record("bamboo exact", decode_seconds(compiled, prompt, args.new, args.repeats),
                       weight_bytes - ffn_bytes * 0.5, "random weights; bytes: gate + half of up/down (approx.)")
                del compiled
            if "predictor" in args.variants:
                for fraction in args.fractions:
                    predictors = forced_k_predictors({f"model.layers.{i}.mlp": layer.mlp
                                                      for i, layer in enumerate(model.model.layers)}, fraction)
                    compiled = bamboo.compile(model, backend="inductor", sparsity="predictor", predictors=predictors,
                                              mode="reduce-overhead", dynamic=False)
                    pred_bytes = predictor_bytes(predictors)
                    record(f"bamboo predictor {fraction:.0%}", decode_seconds(compiled, prompt, args.new, args.repeats),
                           weight_bytes - ffn_bytes * (1 - fraction) + pred_bytes, "forced k, random predictors")
                    del compiled
            torch.cuda.empty_cache()
    if "onnxruntime" in args.variants:
        table += onnxruntime_decode_table(args, config, bandwidth, rows)
    print_table(["batch", "variant", "ms/step", "tok/s", "floor tok/s", "of floor", "vs dense compiled", "note"],
                table)
    data = dict(benchmark="decode_e2e", facts=device_facts(), config=args.config, prompt=args.prompt,
                new_tokens=args.new, read_bandwidth=bandwidth, weight_bytes=weight_bytes, rows=rows,
                command=" ".join(["python"] + sys.argv))
    write_json(args.json, data)
    if args.plot:
        from benchmarks.plot_decode_e2e import plot

        plot(data, args.plot)


if __name__ == "__main__":
    main()
