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
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bamboo  # noqa: E402
from bamboo.calibrate.predictors import LayerPredictor, Predictors, fingerprint  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM  # noqa: E402
from benchmarks.common import device_facts, print_table, read_bandwidth, write_json  # noqa: E402


def forced_k_predictors(model, fraction, rank=256):
    layers = []
    cfg = model.config
    k = int(round(fraction * cfg.intermediate_size))
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate_proj.weight
        w_in = torch.randn(rank, cfg.hidden_size, device=gate.device, dtype=gate.dtype) / cfg.hidden_size**0.5
        w_out = torch.randn(cfg.intermediate_size, rank, device=gate.device, dtype=gate.dtype) / rank**0.5
        layers.append(LayerPredictor(f"model.layers.{i}.mlp", w_in, w_out, torch.zeros_like(w_out[:, 0]),
                                     -math.inf, fingerprint(gate), top_k=k))
    return Predictors(layers, {"rank": rank, "forced_k": k})


def decode_seconds(model, prompt, new_tokens, repeats):
    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, eos_token_id=None)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens)  # compile / record graphs
    run(2)
    full = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    short = sorted(run(1) for _ in range(repeats))[repeats // 2]
    return (full - short) / (new_tokens - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bamboo-7b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.15])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled", "exact", "predictor"])
    parser.add_argument("--json", default="benchmarks/results/decode_e2e.json")
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
                    predictors = forced_k_predictors(model, fraction)
                    compiled = bamboo.compile(model, backend="inductor", sparsity="predictor", predictors=predictors,
                                              mode="reduce-overhead", dynamic=False)
                    pred_bytes = sum((p.w_in.numel() + p.w_out.numel()) * 2 for p in predictors.values())
                    record(f"bamboo predictor {fraction:.0%}", decode_seconds(compiled, prompt, args.new, args.repeats),
                           weight_bytes - ffn_bytes * (1 - fraction) + pred_bytes, "forced k, random predictors")
                    del compiled
            torch.cuda.empty_cache()
    print_table(["batch", "variant", "ms/step", "tok/s", "floor tok/s", "of floor", "vs dense compiled", "note"],
                table)
    write_json(args.json, dict(benchmark="decode_e2e", facts=device_facts(), config=args.config,
                               prompt=args.prompt, new_tokens=args.new, read_bandwidth=bandwidth,
                               weight_bytes=weight_bytes, rows=rows, command=" ".join(["python"] + sys.argv)))


if __name__ == "__main__":
    main()
