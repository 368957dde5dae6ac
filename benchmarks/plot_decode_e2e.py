"""PNG of benchmarks/decode_e2e.py's JSON: decode tokens/s of every variant beside its bandwidth floor, one panel
per batch size.

    python benchmarks/plot_decode_e2e.py benchmarks/results/decode_e2e.json benchmarks/results/decode_e2e.png
"""
from __future__ import annotations

import json
import sys


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == batch]
        names = [r["variant"] for r in mine]
        tok_s = [r.get("tok_s") or r["batch"] / r["ms"] * 1e3 for r in mine]
        floors = [r.get("floor_tok_s") or (r["batch"] * 1e3 / r["floor_ms"] if r.get("floor_ms") else 0) for r in mine]
        if any(floors):  # no floor without a bandwidth measurement (the CPU smoke run)
            ax.barh(names, floors, color="lightgray", label="bandwidth floor")
        ax.barh(names, tok_s, height=0.5, color="tab:blue", label="measured")
        for y, value in enumerate(tok_s):
            ax.text(value, y, f" {value:.0f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("decode tokens/s")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{data.get('config', '?')}, prompt {data.get('prompt')}, {data.get('new_tokens')} new tokens, "
                 f"{data['facts'].get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    plot(json.loads(open(sys.argv[1]).read()), sys.argv[2])
