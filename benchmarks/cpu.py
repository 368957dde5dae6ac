"""bamboo on a CPU: one FFN layer at Bamboo-7B shapes and whole-model decode, dense vs exact vs predictor.

    python benchmarks/cpu.py --json benchmarks/results/cpu.json --plot benchmarks/results/cpu.png
    python benchmarks/cpu.py --smoke          # tiny shapes, seconds: checks the script, its times mean nothing

Part 1, one layer (hidden 4096, intermediate 14336, 1 row, random weights), bf16 and fp32: dense F.linear against
`torch.ops.bamboo.sparse_ffn` in exact mode and in predictor mode at 10/15/25% of neurons (a random rank-256
predictor, threshold -inf and a cap k: "forced k"), and the torch reference (index_select copies, then matmul:
what the op ran on a CPU before its kernel). Medians of `--reps` calls.
Part 2, decode tok/s at batch 1 (prefill excluded; the best of --repeats generates), dense eager vs
`bamboo.compile(backend="eager")` in exact and predictor (forced k) mode: a ~1B Bamboo-shaped model (hidden 2048,
intermediate 5632, 32 heads / 4 KV heads, random bf16 weights, `--layers` of its 22 layers) and austen-small
(trained, bf16). Every variant is compiled first, then timed once per round over --rounds interleaved rounds; each
row is the median, its speed against the same round's dense, so that load from other work falls on all alike.
The machine's read bandwidth (a large fp32 sum) is measured in the same run; each row's floor is the bytes it
really reads over that bandwidth (benchmarks/read_bytes.py: the rows the kernel reads for each layer's real input;
an FFN that compile left dense is read whole). The load average before and after is recorded: other work on the
machine slows everything.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bamboo  # noqa: E402
from bamboo.kernels import cpu_build, cpu_crossover  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM, pretrained_path  # noqa: E402
from bamboo.ops.sparse_ffn import reference_sparse_ffn  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ffn_modules,
    forced_k_predictors,
    median_host_ms,
    print_table,
    randomize,
    write_json,
)
from benchmarks.read_bytes import FFNReads, ffn_inputs, ffn_reads, layer_rows, outside_ffn_bytes  # noqa: E402

OP = torch.ops.bamboo.sparse_ffn.default


def machine_facts() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in cpu_build.cpu_signature().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return dict(cpu=model, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), kernel_built=cpu_build.available(),
                kernel_library=cpu_build.library_name(), load_average=os.getloadavg())


def read_bandwidth(mib: int, reps: int) -> float:
    """Bytes/s of a large fp32 sum (read-only streaming, all threads)."""
    a = torch.ones(mib * 2**20 // 4)
    ms = median_host_ms(lambda: a.sum(), reps)
    return a.numel() * 4 / (ms / 1e3)


def ffn_layer_rows(hidden, intermediate, rank, dtype, fractions, reps, bandwidth):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).mul_(shape[-1] ** -0.5).to(dtype)

    x, gw, uw, dw = r(1, hidden), r(intermediate, hidden), r(intermediate, hidden), r(hidden, intermediate)
    p_in, p_out = r(rank, hidden), r(intermediate, rank)
    row = hidden * x.element_size()
    crossover = cpu_crossover.crossover(dtype, 1, 3 * intermediate * row)

    def op(mode, k=0):
        return lambda: OP(x, gw, None, uw, None, dw, None, None, p_in, p_out, None, "drelu", mode, "relu",
                          -math.inf, k)

    def reads(mode, k=0) -> FFNReads:
        """The rows the CPU kernel reads: it skips the down rows whose h is 0, as the Triton one."""
        predictor = SimpleNamespace(w_in=p_in, w_out=p_out, bias=None, threshold=-math.inf, top_k=k)
        gate, up, down = layer_rows(x, gw, uw, mode, predictor=predictor)
        nbytes = (gate + up + down) * row + (p_in.numel() + p_out.numel()) * x.element_size() * (mode == "predictor")
        return FFNReads(nbytes, gate, up, down, intermediate)

    out = []
    dense_ms = median_host_ms(lambda: F.linear(F.relu(F.linear(x, gw)) * F.relu(F.linear(x, uw)), dw), reps)
    variants = [("dense", lambda: None, 3 * intermediate * row, 1.0, "F.linear x3")]
    exact = reads("exact")
    product_share = exact.down_rows / intermediate  # one row: the neurons whose product h is nonzero
    variants.append(("exact", op("exact"), exact.bytes, product_share, exact.describe()))
    for f in fractions:
        k = round(f * intermediate)
        predicted = reads("predictor", k)
        variants.append((f"predictor {f:.0%}", op("predictor", k), predicted.bytes, f,
                         f"forced k = {k}, rank-{rank} predictor; {predicted.describe()}"))
    variants.append(("torch reference exact", lambda: reference_sparse_ffn(x, gw, None, uw, None, dw, None, None),
                     exact.bytes, product_share, "index_select copies, then matmul (the CPU path before this kernel)"))
    for name, fn, nbytes, share, note in variants:
        ms = dense_ms if name == "dense" else median_host_ms(fn, max(3, reps // 3) if "reference" in name else reps)
        floor = nbytes / bandwidth * 1e3
        out.append(dict(part="ffn layer", dtype=str(dtype).removeprefix("torch."), variant=name, neurons=share,
                        ms=ms, vs_dense=dense_ms / ms, bytes=nbytes, floor_ms=floor, floor_share=floor / ms, note=note,
                        crossover=crossover))
    return out


def decode_best(model, prompt, new_tokens, repeats):
    """Seconds per decode step: the best of `repeats` generates of `new_tokens`, minus the best 1-token generate
    (prefill). Best, not median: on a shared machine a burst of other work only ever adds time."""
    cache_len = prompt.shape[1] + new_tokens

    def run(n):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, eos_token_id=None, cache_bucket=cache_len, keep_cache=True)
        return time.perf_counter() - start

    run(new_tokens)  # compile
    run(2)
    full = min(run(new_tokens) for _ in range(repeats))
    short = min(run(1) for _ in range(repeats))
    return (full - short) / (new_tokens - 1)


def step_ffn_reads(compiled, inputs, mode, predictors=None) -> tuple[int, str]:
    """(bytes, note) the FFNs read at one decode step: the sites bamboo.compile rewrote as the CPU kernel reads
    them (as the Triton kernel: read_bytes), the rest whole, since it left them dense (on this CPU the sparse op
    cannot beat the dense FFN at their size) or did not rewrite them; the note says which ran."""
    if not compiled.bamboo_report.graphs:  # bamboo.compile rewrites at the first call: nothing to read yet
        raise RuntimeError("step_ffn_reads: run the compiled model first; its report is still empty")
    rewritten = {site.name for site in compiled.bamboo_report.sites}
    sparse = {name: item for name, item in inputs.items() if name in rewritten}
    dense = {name: item for name, item in inputs.items() if name not in rewritten}
    nbytes = ffn_reads(dense, "dense").bytes
    notes = []
    if sparse:
        reads = ffn_reads(sparse, mode, predictors=predictors)
        nbytes += reads.bytes
        notes.append(reads.describe() + " (last prompt token)")
    crossover = {r.module for r in compiled.bamboo_report.sites.rejected if "left dense" in r.reason}
    if dense.keys() & crossover:
        notes.append(f"{len(dense.keys() & crossover) / len(inputs):.0%} of FFNs left dense by compile (crossover too "
                     "low here)")
    if dense.keys() - crossover:
        notes.append(f"{len(dense.keys() - crossover) / len(inputs):.0%} of FFNs not rewritten (see bamboo_report)")
    return nbytes, "; ".join(notes)


def decode_rows(label, model, fractions, prompt_len, new, repeats, bandwidth, rank, rounds):
    """Dense eager, exact and predictor decode, all compiled first and then timed in `rounds` interleaved rounds
    (each variant once per round): a burst of other work on a shared machine then lands on every variant alike,
    and each row gives the median over rounds of its speed against the same round's dense."""
    from benchmarks.decode_e2e import release

    config = model.config
    prompt = torch.randint(3, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    inputs = ffn_inputs(model, prompt)  # the prompt's last token stands for a decode step's FFN inputs
    outside = outside_ffn_bytes(model)  # no input embedding: one row per token, not the table
    with torch.no_grad():
        # (name, runner, mode, predictors); bytes are counted after the runs: compile rewrites at the first call
        variants = [("dense eager", model, "dense", None),
                    ("exact", bamboo.compile(model, sparsity="exact", dynamic=False, backend="eager"), "exact", None)]
        for f in fractions:
            predictors = forced_k_predictors(ffn_modules(model), f, rank=rank)
            variants.append((f"predictor {f:.0%}", bamboo.compile(model, sparsity="predictor", predictors=predictors,
                                                                  dynamic=False, backend="eager"), "predictor", predictors))
        seconds = {name: [] for name, *_ in variants}
        for _ in range(rounds):
            for name, runner, *_ in variants:
                seconds[name].append(decode_best(runner, prompt, new, repeats))
        reads = {name: (ffn_reads(inputs, "dense").bytes, "") if mode == "dense" else
                 step_ffn_reads(runner, inputs, mode, predictors) for name, runner, mode, predictors in variants}
        release(variants)
    rows, dense = [], seconds["dense eager"]
    for name, (nbytes, note) in reads.items():
        nbytes += outside
        if name.startswith("predictor"):
            note = f"forced k, rank-{rank} predictors; {note}"
        tok_s = 1 / statistics.median(seconds[name])
        vs_dense = statistics.median(d / s for d, s in zip(dense, seconds[name]))
        floor = bandwidth / nbytes
        rounds_note = f"median of {rounds} interleaved rounds"
        rows.append(dict(part=label, variant=name, ms=1e3 / tok_s, tok_s=tok_s, bytes=nbytes, floor_tok_s=floor,
                         floor_share=tok_s / floor, vs_dense=vs_dense, round_ms=[t * 1e3 for t in seconds[name]],
                         note=f"{note}; {rounds_note}" if note else rounds_note))
        print(f"  {label}: {name}: {1e3 / tok_s:.1f} ms/token, {tok_s:.1f} tok/s, {vs_dense:.2f}x dense", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.10, 0.15, 0.25])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--layers", type=int, default=8, help="layers of the ~1B model (of its 22)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode variants")
    parser.add_argument("--json", default="benchmarks/results/cpu.json")
    parser.add_argument("--plot", default="benchmarks/results/cpu.png")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, the cores)")
    parser.add_argument("--models", nargs="*", default=["1b", "austen-small"], help="decode rows: 1b, austen-small")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats: checks the script")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, intermediate, rank = (64, 224, 16) if args.smoke else (4096, 14336, 256)
    if args.smoke:
        args.reps, args.layers, args.new, args.repeats, args.prompt, args.rounds = 2, 2, 4, 1, 8, 1
    facts = machine_facts()
    bandwidth = read_bandwidth(16 if args.smoke else 1024, 3 if args.smoke else 9)
    print(f"{facts['cpu']}, {facts['cores']} cores, load {facts['load_average']}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for name in args.dtypes:
        rows += ffn_layer_rows(hidden, intermediate, rank, getattr(torch, name), args.fractions, args.reps, bandwidth)
        print(f"  ffn layer {name}: " + ", ".join(f"{r['variant']} {r['ms']:.2f} ms" for r in rows if r["dtype"] == name),
              flush=True)
    one_b = BambooConfig.named("bamboo-7b", hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                               num_key_value_heads=4, num_hidden_layers=args.layers)
    if args.smoke:
        one_b = BambooConfig.named("tiny")
    if "1b" in args.models:
        model = randomize(BambooForCausalLM(one_b)).to(torch.bfloat16).eval()
        model.reset_non_persistent_buffers(torch.device("cpu"))
        label = "tiny model (smoke)" if args.smoke else f"~1B Bamboo shapes, {args.layers} of 22 layers"
        rows += decode_rows(label, model, args.fractions, args.prompt, args.new, args.repeats, bandwidth,
                            rank=min(256, one_b.hidden_size // 4), rounds=args.rounds)
        del model
    if "austen-small" in args.models:
        small = BambooForCausalLM.from_pretrained(pretrained_path("austen-small"), dtype=torch.bfloat16).eval()
        rows += decode_rows("austen-small (trained)", small, args.fractions, args.prompt, args.new, args.repeats,
                            bandwidth, rank=small.config.hidden_size // 4, rounds=args.rounds)
    facts["load_average_after"] = os.getloadavg()
    table = []
    for r in rows:
        if r["part"] == "ffn layer":
            table.append([f"ffn layer {r['dtype']}", r["variant"], f"{r['ms']:.2f} ms", f"{r['vs_dense']:.2f}x",
                          f"{r['floor_ms']:.2f} ms", f"{r['floor_share']:.0%}", r["note"]])
        else:
            table.append([r["part"], r["variant"], f"{r['tok_s']:.1f} tok/s", f"{r['vs_dense']:.2f}x",
                          f"{r['floor_tok_s']:.1f} tok/s", f"{r['floor_share']:.0%}", r["note"]])
    print_table(["part", "variant", "time", "vs dense", "floor", "of floor", "note"], table)
    data = dict(benchmark="cpu", smoke=args.smoke, facts=facts, read_bandwidth_bytes_per_s=bandwidth,
                shapes=dict(hidden=hidden, intermediate=intermediate, predictor_rank=rank, rows=1,
                            decode_config=dict(hidden=one_b.hidden_size, intermediate=one_b.intermediate_size,
                                               layers=one_b.num_hidden_layers)),
                reps=args.reps, rows=rows, command=" ".join(["python"] + sys.argv))
    write_json(args.json, data)
    if args.plot:
        plot(data, args.plot)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(dict.fromkeys(f"{r['part']} {r.get('dtype', '')}".strip() for r in data["rows"]))
    fig, axes = plt.subplots(1, len(parts), figsize=(3.2 * len(parts), 3.6), squeeze=False)
    for ax, part in zip(axes[0], parts):
        mine = [r for r in data["rows"] if f"{r['part']} {r.get('dtype', '')}".strip() == part]
        ax.bar(range(len(mine)), [r["vs_dense"] for r in mine], color="tab:green")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(mine)), [r["variant"].replace("torch reference", "ref") for r in mine], rotation=60,
                      ha="right", fontsize=7)
        ax.set_title(part, fontsize=8)
    axes[0][0].set_ylabel("speed vs dense (x)")
    fig.suptitle(f"bamboo on {data['facts']['cpu']} ({data['facts']['cores']} cores), 1 row", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
