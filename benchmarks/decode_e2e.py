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
from bamboo.models import BambooConfig, BambooForCausalLM, pretrained_path  # noqa: E402
from benchmarks.common import (  # noqa: E402
    device_facts,
    ffn_modules,
    forced_k_predictors,
    predictor_bytes,
    print_table,
    randomize,
    read_bandwidth,
    weight_bytes,
    write_json,
)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(compiled) -> None:
    """Drop a variant's compiled graphs, CUDA graphs and weight copies before the next variant compiles."""
    import gc

    del compiled
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_seconds(model, prompt, new_tokens, repeats):
    cache_len = prompt.shape[1] + new_tokens  # one cache shape for the long and the short run: same graphs

    def run(n):
        synchronize(prompt.device)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, eos_token_id=None, cache_bucket=cache_len, keep_cache=True)
        synchronize(prompt.device)
        return time.perf_counter() - start

    run(new_tokens)  # compile / record graphs
    run(2)
    full = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    short = sorted(run(1) for _ in range(repeats))[repeats // 2]
    return (full - short) / (new_tokens - 1)


def exact_active_fraction(model, prompt) -> float:
    """Share of FFN neurons with a nonzero product for the prompt's last token, union over the batch rows,
    averaged over layers: what exact mode reads of up and down."""
    shares = []
    model.clear_cache()  # a full forward without the cache (the next generate sets it up again)

    def hook(mlp, args):
        x = args[0][:, -1]
        shares.append(((mlp.gate_proj(x) > 0) & (mlp.up_proj(x) > 0)).any(0).float().mean().item())

    handles = [layer.mlp.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        model(prompt)
    finally:
        for h in handles:
            h.remove()
    return sum(shares) / len(shares)


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
    ort_config = config.replace(num_hidden_layers=layers)  # random weights, fp16, the model's shapes
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
    parser.add_argument("--pretrained", default=None,
                        help="a checkpoint directory or bundled name (austen-small): its trained weights (real "
                             "activation sparsity) instead of random ones")
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
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, eager backend, no CUDA graphs, tiny model unless --config/--pretrained: checks the "
                             "script; its times say nothing about a GPU")
    args = parser.parse_args()
    if args.smoke:
        device, bandwidth, compile_options = torch.device("cpu"), None, dict(backend="eager")
        if args.config == "bamboo-7b":
            args.config = "tiny"
        args.variants = [v for v in args.variants if v != "onnxruntime"]  # covered by onnxruntime_rows --smoke
    elif not torch.cuda.is_available():
        sys.exit("decode_e2e.py needs an NVIDIA GPU (or --smoke for a CPU check of the script)")
    else:
        device, bandwidth = torch.device("cuda"), read_bandwidth()
        compile_options = dict(backend="inductor", mode="reduce-overhead")
    torch.manual_seed(0)
    if args.pretrained:
        directory = Path(args.pretrained) if Path(args.pretrained).is_dir() else pretrained_path(args.pretrained)
        model = BambooForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device=device).eval()
        config, args.config = model.config, str(args.pretrained)
    else:
        config = BambooConfig.named(args.config)
        with torch.device(device):
            model = randomize(BambooForCausalLM(config)).to(torch.bfloat16).eval()
        model.reset_non_persistent_buffers(device)
    all_bytes, ffn_bytes = weight_bytes(model)
    rows, table = [], []
    for batch in args.batch:
        prompt = torch.randint(3, config.vocab_size, (batch, args.prompt), device=device)
        dense_compiled = None

        def record(variant, seconds, nbytes, note=""):
            tok_s = batch / seconds
            floor = batch * bandwidth / nbytes if bandwidth else None
            row = dict(batch=batch, variant=variant, step_ms=seconds * 1e3, tok_s=tok_s, floor_tok_s=floor,
                       floor_share=tok_s / floor if floor else None, bytes_per_step=nbytes, note=note,
                       vs_dense_compiled=(tok_s / dense_compiled) if dense_compiled else None)
            rows.append(row)
            table.append([batch, variant, f"{seconds * 1e3:.2f}", f"{tok_s:.1f}", f"{floor:.0f}" if floor else "-",
                          f"{tok_s / floor:.0%}" if floor else "-",
                          f"{row['vs_dense_compiled']:.2f}x" if dense_compiled else "-", note])
            print(table[-1], flush=True)

        with torch.no_grad():
            if "eager" in args.variants:
                record("dense eager", decode_seconds(model, prompt, args.new, args.repeats), all_bytes)
            if "compiled" in args.variants:
                compiled = bamboo.compile(model, sparsity="dense", dynamic=False, **compile_options)
                seconds = decode_seconds(compiled, prompt, args.new, args.repeats)
                dense_compiled = batch / seconds
                record("dense compiled (eager backend)" if args.smoke else "dense torch.compile + CUDA graphs",
                       seconds, all_bytes)
                release(compiled)
            if "exact" in args.variants:
                compiled = bamboo.compile(model, sparsity="exact", dynamic=False, **compile_options)
                active = exact_active_fraction(model, prompt)
                record("bamboo exact", decode_seconds(compiled, prompt, args.new, args.repeats),
                       all_bytes - ffn_bytes * (2 / 3) * (1 - active),
                       f"{'trained' if args.pretrained else 'random'} weights: {active:.0%} of neurons active "
                       "(union over the batch, last prompt token); gate read whole")
                release(compiled)
            if "predictor" in args.variants:
                for fraction in args.fractions:
                    predictors = forced_k_predictors(ffn_modules(model), fraction)
                    compiled = bamboo.compile(model, sparsity="predictor", predictors=predictors, dynamic=False,
                                              **compile_options)
                    pred_bytes = predictor_bytes(predictors)
                    record(f"bamboo predictor {fraction:.0%}", decode_seconds(compiled, prompt, args.new, args.repeats),
                           all_bytes - ffn_bytes * (1 - fraction) + pred_bytes, "forced k, random predictors")
                    release(compiled)
    if "onnxruntime" in args.variants:
        table += onnxruntime_decode_table(args, config, bandwidth, rows)
    print_table(["batch", "variant", "ms/step", "tok/s", "floor tok/s", "of floor", "vs dense compiled", "note"],
                table)
    data = dict(benchmark="decode_e2e", facts=device_facts(), config=args.config, smoke=args.smoke, prompt=args.prompt,
                new_tokens=args.new, read_bandwidth=bandwidth, weight_bytes=all_bytes, rows=rows,
                command=" ".join(["python"] + sys.argv))
    write_json(args.json, data)
    if args.plot:
        from benchmarks.plot_decode_e2e import plot

        plot(data, args.plot)


if __name__ == "__main__":
    main()
