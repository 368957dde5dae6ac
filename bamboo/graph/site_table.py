"""A printable list of matched FFN sites."""
from __future__ import annotations

from typing import Optional


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class SiteTable(list):
    """The FFN sites of a model (FFNSite items); str() gives a table."""

    def __init__(self, sites=(), rejected=(), extra_columns: Optional[dict] = None):
        super().__init__(sites)
        self.rejected = list(rejected)
        self.extra_columns = extra_columns or {}

    def __str__(self) -> str:
        if not self:
            why = "".join(f"\n  {r.node} ({r.module or '?'}): {r.reason}" for r in self.rejected[:10])
            return "no ReLU-sparse FFN sites found" + (f"; candidates refused:{why}" if why else "")
        headers = ["#", "kind", "module", "hidden", "intermediate", "out", "dtype", "up act"]
        headers += list(self.extra_columns)
        rows = []
        for i, s in enumerate(self):
            module = "(root)" if s.module == "" else (s.module or "-")
            row = [i, s.kind, module, s.hidden_size, s.intermediate_size, s.out_features,
                   str(s.dtype).replace("torch.", ""), s.up_act if s.kind != "relu_mlp" else "-"]
            rows.append(row + [values[i] for values in self.extra_columns.values()])
        text = format_table(headers, rows)
        if self.rejected:
            text += f"\n{len(self.rejected)} candidate(s) refused:" + "".join(
                f"\n  {r.node} ({r.module or '?'}): {r.reason}" for r in self.rejected[:10])
        return text

    __repr__ = __str__
