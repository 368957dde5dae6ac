"""What sparsity costs in quality, on bamboo's own trained dReLU model (austen-small) and its held-out novel.

    python benchmarks/quality.py --json benchmarks/results/quality.json --plot benchmarks/results/quality.png

Rows: dense; exact mode (bamboo.compile, must equal dense); predictor mode at several target recalls (the
predictors are calibrated once on the training novels, thresholds re-chosen per recall); the oracle that keeps
each token's top-k neurons by |activation| at several densities. Perplexity is measured as decode sees it:
every token selects its own neurons (a decode step computes one row, so the op's union over rows is that
token's set). Also: greedy generation through the compiled predictor-mode model against dense.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bamboo  # noqa: E402
from bamboo.calibrate import calibrate, set_thresholds  # noqa: E402
from bamboo.calibrate.corpus import load_processed, random_batches, sequential_batches  # noqa: E402
from bamboo.models import BambooForCausalLM, pretrained_path  # noqa: E402
from bamboo.models.modeling import BambooMLP  # noqa: E402
from benchmarks.common import device_facts, print_table, write_json  # noqa: E402


def perplexity(model, windows) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows:
            logits = model(batch[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


class PerTokenMask:
    """Forward hooks that make every BambooMLP compute only the neurons a rule keeps for each token; records
    the share of neurons computed."""

    def __init__(self, model, keep):
        self.model, self.keep, self.kept, self.total = model, keep, 0, 0

    def __enter__(self):
        def hook(module, args, output):
            x = args[0]
            h = module.act_fn(module.gate_proj(x)) * module.act_fn(module.up_proj(x))
            mask = self.keep(module, x, h)
            self.kept += int(mask.sum())
            self.total += mask.numel()
            return module.down_proj(h * mask)

        self.handles = [(name, m.register_forward_hook(hook)) for name, m in self.model.named_modules()
                        if isinstance(m, BambooMLP)]
        return self

    def __exit__(self, *exc):
        for _, h in self.handles:
            h.remove()

    @property
    def density(self):
        return self.kept / max(self.total, 1)


def predictor_rule(predictors, names):
    def keep(module, x, h):
        p = predictors[names[module]]
        return (p.scores(x.reshape(-1, x.shape[-1]).float()).reshape(*h.shape) > p.threshold).to(h.dtype)
    return keep


def oracle_rule(fraction):
    def keep(module, x, h):
        k = max(1, int(round(fraction * h.shape[-1])))
        idx = h.abs().topk(k, dim=-1).indices
        return torch.zeros_like(h).scatter_(-1, idx, 1.0)
    return keep


def greedy_agreement(model, compiled, prompts, new_tokens):
    same, prefix = 0, 0
    for prompt in prompts:
        a = model.generate(prompt[None], max_new_tokens=new_tokens, eos_token_id=None)[0, prompt.numel():]
        b = compiled.generate(prompt[None], max_new_tokens=new_tokens, eos_token_id=None)[0, prompt.numel():]
        same += int((a == b).sum())
        diverge = (a != b).nonzero()
        prefix += int(diverge[0]) if diverge.numel() else new_tokens
    return same / (len(prompts) * new_tokens), prefix / len(prompts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=96, help="validation windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration-batches", type=int, default=64)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--recalls", type=float, nargs="+", default=[0.90, 0.95, 0.98, 0.99, 0.995])
    parser.add_argument("--oracle", type=float, nargs="+", default=[0.03, 0.05, 0.08, 0.10, 0.15, 0.20])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--predictors-out", default=None, help="also save the calibrated predictors here")
    parser.add_argument("--json", default="benchmarks/results/quality.json")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = BambooForCausalLM.from_pretrained(pretrained_path("austen-small"), dtype=torch.float32)
    train, valid, provenance = load_processed()
    windows = list(sequential_batches(valid, 16, args.seq_len + 1, limit=math.ceil(args.windows / 16)))
    names = {m: n for n, m in model.named_modules() if isinstance(m, BambooMLP)}
    rows, table = [], []

    def record(variant, density, ppl, note=""):
        rows.append(dict(variant=variant, density=density, ppl=ppl, ppl_vs_dense=ppl / dense_ppl - 1, note=note))
        table.append([variant, f"{density:.1%}", f"{ppl:.3f}", f"{ppl / dense_ppl - 1:+.2%}", note])

    dense_ppl = perplexity(model, windows)
    record("dense", 1.0, dense_ppl)
    exact_ppl = perplexity(bamboo.compile(model, sparsity="exact"), windows)
    with PerTokenMask(model, lambda module, x, h: (h != 0).to(h.dtype)) as exact_mask:
        exact_token_ppl = perplexity(model, windows)
    record("exact (bamboo.compile)", 1.0, exact_ppl, "must equal dense")
    record("exact, per token", exact_mask.density, exact_token_ppl, "neurons with a nonzero product")

    start = time.time()
    batches = random_batches(train, 8, args.seq_len, seed=1)
    calibration = [next(batches) for _ in range(args.calibration_batches)]
    predictors = calibrate(model, calibration, rank=args.rank, target_recall=args.recalls[-1], epochs=args.epochs,
                           progress=False)
    calibrate_seconds = time.time() - start
    held = [next(batches) for _ in range(8)]  # fresh training-split batches for the thresholds
    chosen = None
    for recall in args.recalls:
        tuned = set_thresholds(model, predictors, held, recall)
        with PerTokenMask(model, predictor_rule(tuned, names)) as mask:
            ppl = perplexity(model, windows)
        record(f"predictor, recall {recall}", mask.density, ppl, f"rank {args.rank}")
        if ppl / dense_ppl - 1 <= 0.01 and (chosen is None or mask.density < chosen[1]):
            chosen = (recall, mask.density, tuned)
    for fraction in args.oracle:
        with PerTokenMask(model, oracle_rule(fraction)) as mask:
            ppl = perplexity(model, windows)
        record(f"oracle top-{fraction:.0%} by |h|", mask.density, ppl)

    agreement = None
    if chosen is not None:
        if args.predictors_out:
            chosen[2].save(args.predictors_out)
        compiled = bamboo.compile(model, sparsity="predictor", predictors=chosen[2])
        prompts = [valid[i:i + 32] for i in torch.randint(0, valid.numel() - 64, (args.prompts,)).tolist()]
        match, prefix = greedy_agreement(model, compiled, prompts, args.new_tokens)
        agreement = dict(recall=chosen[0], density=chosen[1], token_match=match, mean_matching_prefix=prefix)

    print_table(["variant", "neurons per token", "val ppl", "vs dense", "note"], table)
    print(f"\npredictor calibration: {calibrate_seconds:.0f} s on {args.calibration_batches} batches of 8x{args.seq_len}")
    print(str(predictors))
    if agreement:
        print(f"\ngreedy generation, compiled predictor mode (recall {agreement['recall']}, "
              f"{agreement['density']:.1%} of neurons) against dense, {args.prompts} prompts x {args.new_tokens} tokens: "
              f"{agreement['token_match']:.1%} of tokens equal, first difference after "
              f"{agreement['mean_matching_prefix']:.1f} tokens on average")
    data = dict(benchmark="quality", facts=device_facts(), model="austen-small", data=provenance["source"],
                validation=provenance["validation"], windows=len(windows) * 16, seq_len=args.seq_len,
                rows=rows, predictors=predictors.to_json(), calibration_seconds=calibrate_seconds,
                generation=agreement, command=" ".join(["python"] + sys.argv))
    write_json(args.json, data)
    if args.plot:
        plot(data, args.plot)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    dense = next(r for r in rows if r["variant"] == "dense")["ppl"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(dense, color="black", label="dense")
    ax.axhline(dense * 1.01, color="black", linestyle=":", label="dense +1%")
    for prefix, style in (("predictor", "o-"), ("oracle", "s--")):
        pts = sorted((r["density"] * 100, r["ppl"]) for r in rows if r["variant"].startswith(prefix))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=prefix)
    exact = next(r for r in rows if r["variant"] == "exact, per token")
    ax.plot([exact["density"] * 100], [exact["ppl"]], "r*", markersize=12, label="exact (nonzero neurons)")
    ax.set_xlabel("neurons computed per token (%)")
    ax.set_ylabel("validation perplexity")
    ax.set_ylim(dense * 0.98, dense * 1.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("austen-small on Persuasion")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
