"""An aligned text table of evaluation rows (teacher vs quantized students)."""

from __future__ import annotations

import math

COLUMNS = ("name", "ppl", "dppl", "kl", "top1")


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "top1" and isinstance(value, float):
        return f"{100 * value:.2f}%"
    if key == "kl" and isinstance(value, float):
        return f"{value:.5f}"
    if key == "dppl" and isinstance(value, float):
        return f"{value:+.3f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Rows as ``name | ppl | dppl | kl | top1``, columns padded to align; a missing value prints ``-``.

    ``dppl`` (perplexity increase over the first row, usually the teacher) is
    computed when a row has ``ppl`` but no ``dppl``.
    """
    base = rows[0].get("ppl") if rows else None
    table = [list(columns)]
    for row in rows:
        row = dict(row)
        if "dppl" not in row and base is not None and row.get("ppl") is not None:
            row["dppl"] = row["ppl"] - base
        table.append([_cell(c, row.get(c)) for c in columns])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        # the name column is left-aligned, numbers right-aligned
        return " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])
