"""Decode speed of a whole Bamboo-shaped model (random weights, bf16), side by side with dense baselines.

    python benchmarks/decode_e2e.py --config bamboo-7b --json benchmarks/results/decode_e2e.json
    python benchmarks/decode_e2e.py --merge part1.json part2.json --json decode_e2e.json --plot decode_e2e.png

Rows (one model object, the same static-KV-cache code): dense eager; dense torch.compile (Inductor, CUDA graphs,
the same model code); bamboo exact; bamboo predictor: random rank-256 predictors forced to k neurons, capped at k
(grids sized to k) and, with --variants threshold, uncapped with a threshold that passes k on the prompt's last
token (grids sized to every neuron, as calibrated predictors without a cap run); or calibrated predictors from
--predictors. All through bamboo.compile(backend="inductor", mode="reduce-overhead"). Each variant compiles anew:
CUDA graphs bake the kernels' grids, so no graph carries over between predictors or batch sizes.

Decode tok/s = batch x (new tokens - 1) / the time of the decode steps (prefill excluded: a 1-token generate is
subtracted). The floor is the bytes one step reads (benchmarks/read_bytes.py: the rows each variant's code really
reads, the other weights but the input embedding, the static KV cache) over the measured read bandwidth; a model
that fits in L2 gets no floor. The JSON is rewritten after every row, so a run cut at a time limit keeps its rows;
--merge joins the parts of a split run (benchmarks/gpu_session.sh).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bamboo  # noqa: E402
from bamboo.kernels import max_sparse_rows  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM, pretrained_path  # noqa: E402
from benchmarks.common import (  # noqa: E402
    device_facts,
    ffn_modules,
    forced_k_predictors,
    forced_threshold_predictors,
    print_table,
    randomize,
    read_bandwidth,
    write_json,
)
from benchmarks.read_bytes import ffn_inputs, ffn_reads, kv_cache_bytes, outside_ffn_bytes  # noqa: E402


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


def predictor_variants(args, model, inputs):
    """(variant, predictors, note) for each predictor row: calibrated predictors from --predictors, else random
    rank-256 ones at each fraction, capped at k (grids sized to k) and, with "threshold", uncapped with a
    threshold that passes k on the prompt's last token (grids sized to every neuron, as a calibrated predictor
    without a cap runs)."""
    if args.predictors:
        from bamboo.calibrate.predictors import Predictors

        loaded = Predictors.load(args.predictors)
        device = next(model.parameters()).device
        predictors = Predictors([p.to(device=device) for p in loaded.values()], loaded.meta)
        if "predictor" in args.variants:
            yield "bamboo predictor (calibrated)", predictors, f"calibrated predictors: {args.predictors}"
        return
    for fraction in args.fractions:
        capped = forced_k_predictors(ffn_modules(model), fraction)
        if "predictor" in args.variants:
            yield f"bamboo predictor {fraction:.0%}, cap k", capped, "forced k: random predictors, cap k"
        if "threshold" in args.variants:
            yield (f"bamboo predictor ~{fraction:.0%}, threshold only", forced_threshold_predictors(capped, inputs),
                   "random predictors, no cap: threshold passes k on the prompt's last token")


def with_ratios(rows):
    """vs_dense_compiled for every row from the same batch's dense compiled row (if any)."""
    compiled = {r["batch"]: r["tok_s"] for r in rows if r["variant"].startswith("dense torch.compile")
                or r["variant"].startswith("dense compiled")}
    for r in rows:
        r["vs_dense_compiled"] = r["tok_s"] / compiled[r["batch"]] if r["batch"] in compiled else None
    return rows


def table_of(rows):
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    return [[r["batch"], r["variant"], f"{r['step_ms']:.2f}", f"{r['tok_s']:.1f}", fmt(r["floor_tok_s"], ".0f"),
             fmt(r["floor_share"], ".0%"), fmt(r["vs_dense_compiled"], ".2f") + ("x" if r["vs_dense_compiled"] else ""),
             r["note"]] for r in rows]


HEADERS = ["batch", "variant", "ms/step", "tok/s", "floor tok/s", "of floor", "vs dense compiled", "note"]


def merge(paths, json_path, plot_path):
    """One JSON (and PNG) from the JSONs of several runs of this script (the GPU session runs it in parts, each
    under the device's per-command limit): rows in file order, a later (batch, variant) replacing an earlier."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows[(r["batch"], r["variant"])] = r
    data = dict(runs[0], rows=with_ratios(list(rows.values())), merged_from=[str(p) for p in paths],
                commands=[run["command"] for run in runs])
    print_table(HEADERS, table_of(data["rows"]))
    write_json(json_path, data)
    if plot_path:
        from benchmarks.plot_decode_e2e import plot

        plot(data, plot_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bamboo-7b")
    parser.add_argument("--pretrained", default=None,
                        help="a checkpoint directory or bundled name (austen-small): its trained weights (real "
                             "activation sparsity) instead of random ones")
    parser.add_argument("--predictors", default=None,
                        help="calibrated predictors (bamboo calibrate --out FILE) for the predictor row instead of "
                             "random forced-k ones")
    parser.add_argument("--ffn-kernels", choices=["compact", "fixed-grid"], default=None,
                        help="BAMBOO_FFN_KERNELS for the bamboo rows (default: the library's, compact)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.15])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled", "exact", "predictor"],
                        choices=["eager", "compiled", "exact", "predictor", "threshold"])
    parser.add_argument("--json", default="benchmarks/results/decode_e2e.json")
    parser.add_argument("--plot", default="benchmarks/results/decode_e2e.png")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no run: merge these JSONs of earlier runs into --json (and --plot)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, eager backend, no CUDA graphs, tiny model unless --config/--pretrained: checks the "
                             "script; its times say nothing about a GPU")
    args = parser.parse_args()
    if args.merge:
        missing = [p for p in args.merge if not Path(p).is_file()]
        if missing:
            sys.exit(f"--merge: no such file: {', '.join(missing)}")
        return merge(args.merge, args.json, args.plot)
    if args.ffn_kernels:
        import os

        os.environ["BAMBOO_FFN_KERNELS"] = args.ffn_kernels  # read by the op at every call
    if args.predictors and not Path(args.predictors).is_file():
        sys.exit(f"--predictors: no such file: {args.predictors} (make one with `bamboo calibrate --out FILE`)")
    if args.smoke:
        from bamboo.kernels import cpu_crossover

        # the smoke checks the sparse path: on a CPU, bamboo.compile would leave FFNs this small dense
        with cpu_crossover.forced(1.0):
            return run(args)
    return run(args)


def run(args):
    if args.smoke:
        device, bandwidth, l2_bytes, compile_options = torch.device("cpu"), None, 0, dict(backend="eager")
        if args.config == "bamboo-7b":
            args.config = "tiny"
    elif not torch.cuda.is_available():
        sys.exit("decode_e2e.py needs an NVIDIA GPU (or --smoke for a CPU check of the script)")
    else:
        device, bandwidth = torch.device("cuda"), read_bandwidth()
        l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
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
    weights = args.pretrained and "trained weights" or "random weights"
    outside = outside_ffn_bytes(model)
    rows = []

    def write():
        data = dict(benchmark="decode_e2e", facts=device_facts(), config=args.config, smoke=args.smoke,
                    prompt=args.prompt, new_tokens=args.new, read_bandwidth=bandwidth, l2_bytes=l2_bytes,
                    outside_ffn_bytes=outside, rows=with_ratios(rows), command=" ".join(["python"] + sys.argv))
        write_json(args.json, data)  # after every row: a run stopped at a time limit keeps what it measured
        return data

    for batch in args.batch:
        prompt = torch.randint(3, config.vocab_size, (batch, args.prompt), device=device)
        inputs = ffn_inputs(model, prompt)
        fixed = outside + kv_cache_bytes(config, batch, args.prompt + args.new, 2)

        def record(variant, seconds, reads, note=""):
            if args.ffn_kernels == "fixed-grid" and variant.startswith("bamboo"):
                variant += " [fixed grid]"
            nbytes = fixed + reads.bytes
            tok_s = batch / seconds
            # a model that fits in L2 is bound by launches, not by memory: no DRAM floor for it
            floor = batch * bandwidth / nbytes if bandwidth and nbytes > l2_bytes else None
            if bandwidth and floor is None:
                note = f"{note}; " if note else ""
                note += f"{nbytes / 1e6:.0f} MB fits in the {l2_bytes / 1e6:.0f} MB L2: launch-bound, no DRAM floor"
            rows.append(dict(batch=batch, variant=variant, step_ms=seconds * 1e3, tok_s=tok_s, floor_tok_s=floor,
                             floor_share=tok_s / floor if floor else None, bytes_per_step=nbytes,
                             ffn_bytes_per_step=reads.bytes, ffn_rows=reads.describe(), note=note))
            data = write()
            print(table_of(data["rows"])[-1], flush=True)

        dense_reads = ffn_reads(inputs, "dense")
        with torch.no_grad():
            if "eager" in args.variants:
                record("dense eager", decode_seconds(model, prompt, args.new, args.repeats), dense_reads)
            if "compiled" in args.variants:
                compiled = bamboo.compile(model, sparsity="dense", dynamic=False, **compile_options)
                record("dense compiled (eager backend)" if args.smoke else "dense torch.compile + CUDA graphs",
                       decode_seconds(compiled, prompt, args.new, args.repeats), dense_reads)
                release(compiled)
            if "exact" in args.variants:
                compiled = bamboo.compile(model, sparsity="exact", dynamic=False, **compile_options)
                seconds = decode_seconds(compiled, prompt, args.new, args.repeats)
                if batch > max_sparse_rows():  # the op sends these rows to dense matmuls: say so, floor it dense
                    record(f"bamboo exact, dense FFN ({batch} rows > BAMBOO_SPARSE_MAX_ROWS={max_sparse_rows()})",
                           seconds, dense_reads, f"{weights}: the exact op runs dense matmuls at this batch")
                else:
                    reads = ffn_reads(inputs, "exact")
                    record("bamboo exact", seconds, reads, f"{weights}; {reads.describe()}")
                release(compiled)
            for variant, predictors, note in predictor_variants(args, model, inputs):
                compiled = bamboo.compile(model, sparsity="predictor", predictors=predictors, dynamic=False,
                                          **compile_options)
                reads = ffn_reads(inputs, "predictor", predictors=predictors)
                record(variant, decode_seconds(compiled, prompt, args.new, args.repeats), reads,
                       f"{note}; {reads.describe()}")
                release(compiled)
    data = write()
    print_table(HEADERS, table_of(data["rows"]))
    if args.plot:
        from benchmarks.plot_decode_e2e import plot

        plot(data, args.plot)


if __name__ == "__main__":
    main()
