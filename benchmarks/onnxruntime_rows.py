"""ONNX Runtime rows: one dReLU FFN layer at Bamboo-7B shapes and the Bamboo decode step, dense and sparse
(exact; predictor with forced k) exported by bamboo.export_onnx, all in one run.

    python benchmarks/onnxruntime_rows.py --json benchmarks/results/onnxruntime.json     # GPU, onnxruntime-gpu
    python benchmarks/onnxruntime_rows.py --smoke --json /tmp/onnxruntime_smoke.json    # any machine, CPU EP

On a CUDA device the CUDA EP runs fp16 models (its TopK has no bf16), with inputs and outputs bound as torch
CUDA tensors through bamboo's onnxruntime backend (IOBinding, no host copies). Each call is timed on the host
around a synchronised run: what a caller pays, ORT's per-run overhead included (ORT's own CUDA graphs cannot
capture NonZero/TopK, whose output shapes depend on the data). The decode rows use a model of Bamboo-7B width
with --decode-layers layers (32 is the full model: a 14.5 GB export); tok/s and floors are that model's.
--smoke runs the CPU EP in fp32 at a small width: it checks the script; its times say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bamboo  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM  # noqa: E402
from bamboo.models.decode_step import BambooDecodeStep, greedy_generate_with_step  # noqa: E402
from bamboo.models.modeling import BambooMLP  # noqa: E402
from benchmarks.common import (  # noqa: E402
    device_facts,
    ffn_modules,
    forced_k_predictors,
    median_host_ms,
    predictor_bytes,
    print_table,
    randomize,
    read_bandwidth,
    write_json,
)
from benchmarks.read_bytes import ffn_inputs, ffn_reads, kv_cache_bytes, layer_rows, outside_ffn_bytes  # noqa: E402


class OneFFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp = BambooMLP(config)

    def forward(self, x):
        return self.mlp(x)


def check_provider(session, device):
    wanted = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if wanted not in session.get_providers():
        sys.exit(f"ONNX Runtime runs on {session.get_providers()}, not {wanted}: install onnxruntime-gpu (and call "
                 "onnxruntime.preload_dlls() where CUDA comes from the torch wheels), or pass --smoke")


def ffn_rows(config, device, dtype, batches, fractions, reps, workdir, bandwidth):
    model = randomize(OneFFN(config)).to(device=device, dtype=dtype).eval()
    hidden, inter = config.hidden_size, config.intermediate_size
    row_bytes = hidden * torch.finfo(dtype).bits // 8
    modes = [("dense", "dense", None), ("exact", "exact", None)]
    modes += [(f"predictor {f:.0%}", "predictor", forced_k_predictors({"mlp": model.mlp}, f)) for f in fractions]
    sessions = {}
    for label, mode, predictors in modes:
        module = bamboo.compile(model, backend="onnxruntime", sparsity=mode, predictors=predictors,
                               path=workdir / f"ffn_{label.replace(' ', '_').replace('%', '')}.onnx",
                                   example_inputs=(torch.randn(2, 2, hidden, device=device, dtype=dtype),))
        check_provider(module.session, device)
        sessions[label] = (module, mode, predictors)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 1, hidden, device=device, dtype=dtype)
        with torch.no_grad():
            g, u = x @ model.mlp.gate_proj.weight.t(), x @ model.mlp.up_proj.weight.t()
            active = ((g > 0) & (u > 0)).reshape(-1, inter).any(0).float().mean().item()
            expected = model(x).float()
        dense_ms = None
        for label, (module, mode, predictors) in sessions.items():
            out = module(x)
            err = ((out.float() - expected).norm() / expected.norm()).item()
            ms = median_host_ms(lambda m=module: m(x), reps)
            if label == "dense":
                dense_ms = ms
            # rows as the ONNX lowering reads them (Gather by id: up and down rows of every selected neuron)
            predictor = predictors["mlp"] if predictors else None
            reads = layer_rows(x.reshape(batch, hidden), model.mlp.gate_proj.weight, model.mlp.up_proj.weight, mode,
                               "ort", predictor)
            nbytes = sum(reads) * row_bytes + (predictor_bytes(predictors) if predictors else 0)
            rows.append(dict(part="ffn layer", batch=batch, variant=f"ORT {label}", ms=ms, vs_dense=dense_ms / ms,
                             bytes=nbytes, floor_ms=nbytes / bandwidth * 1e3 if bandwidth else None,
                             active_fraction=active if label == "exact" else None, rel_err_vs_dense_torch=err))
    return rows


def decode_rows(config, device, dtype, batches, fractions, prompt_len, new_tokens, workdir, bandwidth):
    model = randomize(BambooForCausalLM(config)).to(device=device, dtype=dtype).eval()
    model.reset_non_persistent_buffers(device)
    step = BambooDecodeStep(model)
    outside = outside_ffn_bytes(model)
    inputs = {batch: ffn_inputs(model, torch.randint(3, config.vocab_size, (batch, prompt_len), device=device))
              for batch in batches}  # each FFN's input at the prompt's last token: the rows a step reads
    modes = [("dense", "dense", None), ("exact", "exact", None)]
    modes += [(f"predictor {f:.0%}", "predictor", forced_k_predictors(ffn_modules(model), f)) for f in fractions]
    examples = step.example_inputs(prompt_len + new_tokens)
    rows = []
    for label, mode, predictors in modes:
        module = bamboo.compile(step, backend="onnxruntime", sparsity=mode, predictors=predictors,
                               path=workdir / f"step_{label.replace(' ', '_').replace('%', '')}.onnx",
                                   example_inputs=examples)
        check_provider(module.session, device)
        for batch in batches:
            ms, tokens = time_decode(module, step, config, batch, prompt_len, new_tokens, device)
            nbytes = (outside + kv_cache_bytes(config, batch, prompt_len + new_tokens, model.lm_head.weight.element_size())
                      + ffn_reads(inputs[batch], mode, "ort", predictors).bytes)
            dense = next((r for r in rows if r["batch"] == batch and r["variant"] == "ORT dense"), None)
            rows.append(dict(part=f"decode step ({config.num_hidden_layers} layers)", batch=batch,
                             variant=f"ORT {label}", ms=ms, tok_s=batch / ms * 1e3,
                             vs_dense=dense["ms"] / ms if dense else 1.0, bytes=nbytes,
                             floor_ms=nbytes / bandwidth * 1e3 if bandwidth else None,
                             tokens_equal_dense=torch.equal(tokens, dense["tokens"]) if dense else True,
                             tokens=tokens))
        del module
    for r in rows:
        r["tokens"] = r["tokens"].tolist() if "tokens" in r else None
    return rows


def time_decode(module, step, config, batch, prompt_len, new_tokens, device):
    """Median ms of one decode step (greedy, prefill excluded) and the tokens it generated. A step's time runs
    from its call to the next call's start of ORT work (each call first waits for torch's argmax)."""
    prompt = torch.randint(3, config.vocab_size, (batch, prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(batch))
    times = []

    def timed(*args):
        start = time.perf_counter()
        outputs = module(*args)
        times.append((time.perf_counter() - start) * 1e3)
        return outputs

    tokens = greedy_generate_with_step(timed, prompt, new_tokens, step.empty_cache(batch, prompt_len + new_tokens))
    steps = sorted(times[1 + 2:])  # without the prefill and the first steps, which warm ORT's allocator
    return steps[len(steps) // 2], tokens[:, prompt_len:].cpu()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.10, 0.15, 0.25])
    parser.add_argument("--decode-layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="CPU EP, fp32, small width: checks the script only")
    parser.add_argument("--json", default="benchmarks/results/onnxruntime.json")
    args = parser.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the torch wheels, when onnxruntime-gpu has none of its own
    if args.smoke:
        device, dtype, bandwidth = torch.device("cpu"), torch.float32, None
        config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512)
        args.prompt, args.new, args.reps = min(args.prompt, 16), min(args.new, 8), min(args.reps, 5)
    else:
        if not torch.cuda.is_available():
            sys.exit("onnxruntime_rows.py needs an NVIDIA GPU (or --smoke for a CPU check)")
        device, dtype, bandwidth = torch.device("cuda"), torch.float16, read_bandwidth()
        config = BambooConfig.named("bamboo-7b", num_hidden_layers=args.decode_layers)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bamboo-ort-bench-") as tmp:
        rows = ffn_rows(config, device, dtype, args.batch, args.fractions, args.reps, Path(tmp), bandwidth)
        rows += decode_rows(config, device, dtype, args.batch, args.fractions, args.prompt, args.new, Path(tmp),
                            bandwidth)
    table = [[r["part"], r["batch"], r["variant"], f"{r['ms']:.3f}",
              f"{r['floor_ms']:.3f}" if r["floor_ms"] else "-", f"{r['vs_dense']:.2f}x",
              f"{r['tok_s']:.1f}" if "tok_s" in r else "-",
              {True: "yes", False: "no"}.get(r.get("tokens_equal_dense"), "-")] for r in rows]
    print_table(["part", "batch", "variant", "ms", "floor ms", "vs ORT dense", "tok/s", "tokens = dense"], table)
    write_json(args.json, dict(benchmark="onnxruntime_rows", facts={**device_facts(), "onnxruntime": ort.__version__},
                               dtype=str(dtype), hidden=config.hidden_size, intermediate=config.intermediate_size,
                               decode_layers=config.num_hidden_layers, prompt=args.prompt, new_tokens=args.new,
                               read_bandwidth=bandwidth, smoke=args.smoke, bamboo=bamboo.__version__, rows=rows,
                               command=" ".join(["python"] + sys.argv)))


if __name__ == "__main__":
    main()
