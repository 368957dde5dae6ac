"""A printable list of matched FFN sites."""
from __future__ import annotations

from typing import Optional


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_rejections(rejected, limit: int = 10) -> str:
    """'candidates refused:' and one line per refused candidate, or '' when there are none."""
    if not rejected:
        return ""
    lines = "".join(f"\n  {r.node} ({r.module or '?'}): {r.reason}" for r in rejected[:limit])
    more = f"\n  ... and {len(rejected) - limit} more" if len(rejected) > limit else ""
    return f"{len(rejected)} candidate(s) refused:{lines}{more}"


class SiteTable(list):
    """The FFN sites of a model (FFNSite items); str() gives a table."""

    def __init__(self, sites=(), rejected=(), extra_columns: Optional[dict] = None):
        super().__init__(sites)
        self.rejected = list(rejected)
        self.extra_columns = extra_columns or {}

    def __str__(self) -> str:
        if not self:
            return "no ReLU-sparse FFN sites found" + (f"; {describe_rejections(self.rejected)}" if self.rejected else "")
        headers = ["#", "kind", "module", "hidden", "intermediate", "out", "dtype", "up act"]
        headers += list(self.extra_columns)
        rows = []
        for i, s in enumerate(self):
            row = [i, s.kind, s.name, s.hidden_size, s.intermediate_size, s.out_features,
                   str(s.dtype).replace("torch.", ""), s.up_act if s.kind != "relu_mlp" else "-"]
            rows.append(row + [values[i] for values in self.extra_columns.values()])
        text = format_table(headers, rows)
        if self.rejected:
            text += "\n" + describe_rejections(self.rejected)
        return text

    __repr__ = __str__
