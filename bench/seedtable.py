"""Rows of a ``bench/seeds.py`` summary, seed by seed, as the Markdown table the sections of bench/README.md show.

    python bench/seedtable.py bench/results/quality_cpu-40steps-block-w4a8-pool-seeds.json \\
        'zsaq|zsaq block-warmup pool=128, SAM quantized' '`rho=0`|zsaq block-warmup rho=0 pool=128' --seeds 3 4 5

Each ROW is a method of the summary, or ``LABEL|METHOD`` to show it under another name (a Markdown cell cannot
hold ``|``, so the split is safe). One line per row: its Δppl at each seed shown (blank where it did not run),
their mean over those seeds, and the summary's KL and top-1, which are means over all of the row's seeds.
``--seeds`` picks the columns; by default every seed any of the rows ran. Nothing is computed here that the
summary does not hold, so a table pasted into a section can be checked against the summary by running this again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_row(arg: str) -> tuple[str, str]:
    """``LABEL|METHOD`` or ``METHOD`` (shown as it is) into ``(label, method)``."""
    label, sep, method = arg.partition("|")
    return (label, method) if sep else (arg, arg)


def table(summary: dict, rows: list[tuple[str, str]], seeds: list[str] | None = None) -> str:
    """The Markdown table of ``rows`` (``(label, method)``) at ``seeds`` (default: every seed they ran)."""
    by = {r["method"]: r for r in summary["rows"]}
    for _, method in rows:
        if method not in by:
            raise SystemExit(f"no row {method!r} in the summary; its rows: {sorted(by)}")
    if seeds is None:
        seeds = sorted({s for _, m in rows for s in by[m].get("seeds", {})}, key=int)
    lines = ["| rows | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean of the seeds shown | KL / top-1, mean over its seeds |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for label, method in rows:
        r = by[method]
        values = [r.get("seeds", {}).get(s) for s in seeds]
        shown = [v for v in values if v is not None]
        mean = f"{sum(shown) / len(shown):+.3f}" if shown else "-"
        cells = " | ".join(f"{v:+.3f}" if v is not None else "" for v in values)
        lines.append(f"| {label} | {cells} | {mean} | {r['kl']:.4f} / {100 * r['top1']:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary", type=Path, help="a bench/seeds.py summary JSON")
    p.add_argument("rows", nargs="+", help="METHOD or LABEL|METHOD")
    p.add_argument("--seeds", nargs="+", help="the seed columns (default: every seed the rows ran)")
    args = p.parse_args()
    print(table(json.loads(args.summary.read_text()), [parse_row(r) for r in args.rows], args.seeds))


if __name__ == "__main__":
    main()
