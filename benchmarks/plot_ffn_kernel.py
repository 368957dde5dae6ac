"""PNG of benchmarks/ffn_kernel.py's JSON: time per layer against share of neurons, one panel per batch size.

    python benchmarks/plot_ffn_kernel.py benchmarks/results/ffn_kernel.json benchmarks/results/ffn_kernel.png
"""
from __future__ import annotations

import json
import sys


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.6), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == batch]
        dense = next(r for r in mine if r["variant"] == "dense")
        ax.axhline(dense["ms"], color="black", label="dense cuBLAS")
        for variant, style in (("gather", "s--"), ("predictor", "o-")):
            pts = sorted((r["neurons"], r["ms"], r["floor_ms"]) for r in mine if r["variant"] == variant)
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, label=variant)
            if variant == "predictor":
                ax.plot([p[0] * 100 for p in pts], [p[2] for p in pts], ":", color="gray", label="floor (predictor)")
        exact = next(r for r in mine if r["variant"] == "exact")
        ax.plot([exact["neurons"] * 100], [exact["ms"]], "r*", markersize=12, label="exact (random weights)")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("neurons computed (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per FFN layer")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Bamboo-7B FFN layer, bf16, {data['facts'].get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    plot(json.loads(open(sys.argv[1]).read()), sys.argv[2])
