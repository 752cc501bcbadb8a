"""Turn bench/results/*.json into a Markdown "Results" section (RESULTS.md) and one PNG per table.

    python bench/render.py [--results bench/results] [--out bench/results/RESULTS.md]

Reads ``quality*.json`` (bench/quality.py, which draws its own PNG) and
``peers*.json`` (bench/peers.py, whose PNG is drawn here); each holds
``machine``, ``date``, ``command`` and ``rows`` with the keys of
:data:`COLUMNS` (plus optional ``setting`` and ``act_bits`` columns and a last ``threads`` column, shown when
a table has them: torch threads a row ran with; bench/seeds.py's Δppl per seed). Missing values print as "-".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TABLES = {"quality": "Quality: zsaq_dist methods", "peers": "Peers: HQQ, GPTQ, AWQ side by side"}
OPTIONAL = {"setting": "setting", "act_bits": "act bits"}  # shown only when some row has a value
TRAILING = {"threads": "threads", "per_seed": "Δppl per seed"}  # likewise, after the fixed columns
COLUMNS = ("method", "bits", "group_size", "symmetric", "data", "ppl", "dppl", "kl", "top1", "seconds", "peak_rss_mb")
HEADERS = ("method", "bits", "group", "sym", "data", "ppl", "Δppl", "KL", "top-1", "time (s)", "peak RSS (MB)")


def cell(key: str, value) -> str:
    """One table cell: fixed precision per column, "-" for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "symmetric":
        return "sym" if value else "asym"
    if key == "group_size":
        return f"g{value}"
    if key == "top1":
        return f"{100 * value:.2f}%"
    if key == "kl":
        return f"{value:.4f}"
    if key == "dppl":
        return f"{value:+.3f}"
    if key == "ppl":
        return f"{value:.3f}"
    if key in ("seconds", "peak_rss_mb"):
        return f"{value:.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    """A GitHub Markdown table of ``rows``."""
    extra = [k for k in OPTIONAL if any(r.get(k) is not None for r in rows)]
    tail = [k for k in TRAILING if any(r.get(k) is not None for r in rows)]
    keys = extra + list(COLUMNS) + tail
    headers = [OPTIONAL[k] for k in extra] + list(HEADERS) + [TRAILING[k] for k in tail]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(cell(k, r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def section(title: str, result: dict, png: str | None) -> str:
    """One table with its provenance (machine, date, command) and its plot."""
    parts = [
        f"### {title}",
        "",
        f"- machine: {result.get('machine', '-')}",
        f"- date: {result.get('date', '-')}",
        f"- command: `{result.get('command', '-')}`",
    ]
    if result.get("model"):
        parts.append(f"- model: {result['model']}")
    if result.get("budget"):
        parts.append("- budget: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items()))
    if result.get("versions"):
        parts.append("- versions: " + json.dumps(result["versions"], sort_keys=True))
    parts += ["", table(result["rows"])]
    if png:
        parts += ["", f"![{title}]({png})"]
    for note in result.get("notes", []):
        parts.append(f"\n{note}")
    return "\n".join(parts)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bar chart of KL(teacher || model) per row (log scale), one colour per bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("kl") and r.get("bits", 32) < 16]
    short = {"real-data calibration": "real data", "data-free (self-generated)": "self-generated", "none": "no data"}
    labels = [
        f"{r['method'].split(' (')[0]}\nW{r['bits']} {cell('symmetric', r.get('symmetric'))}\n"
        f"{short.get(r.get('data'), r.get('data', ''))}"
        for r in rows
    ]
    colours = {4: "tab:blue", 3: "tab:orange", 2: "tab:red", 8: "tab:green"}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r["kl"] for r in rows], color=[colours.get(r["bits"], "tab:gray") for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("KL(teacher || quantized) per token (lower is better)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: Path, with_png: bool = True) -> str:
    """The Markdown "Results" section for every known JSON in ``results``; draws the peers' PNGs."""
    out = ["## Results", ""]
    paths = [p for prefix in TABLES for p in sorted(results.glob(f"{prefix}*.json"))]
    for path in paths:
        prefix = next(k for k in TABLES if path.name.startswith(k))
        suffix = path.stem[len(prefix) :].lstrip("_")
        title = TABLES[prefix] + (f" ({suffix})" if suffix else "")
        result = json.loads(path.read_text())
        png = path.with_suffix(".png")
        if with_png and prefix == "peers":
            plot(result["rows"], png, title)
        link = png.name if png.is_file() else None
        out += [section(title, result, link), ""]
    if not paths:
        out.append(f"No results yet: run `python bench/peers.py` (writes {results}/peers.json).")
    return "\n".join(out).rstrip() + "\n"


def _ratio_lines(results: Path) -> list[str]:
    """Where zsaq stands: each method's perplexity increase as a multiple of RTN's in the same run.

    Runs with different evaluation budgets are only compared through this ratio, never by raw perplexity.
    """
    lines = []
    for path in sorted(results.glob("quality*.json")):
        rows = json.loads(path.read_text())["rows"]
        for setting in dict.fromkeys(r["setting"] for r in rows if r["method"] != "fp"):
            rs = {r["method"]: r for r in rows if r["setting"] == setting}
            if "rtn" not in rs:
                continue
            base = rs["rtn"]["dppl"]
            parts = [f"{m} {r['dppl']:+.2f} ({r['dppl'] / base:.2f}x)" for m, r in rs.items() if m != "rtn"]
            lines.append(f"- `{path.name}` {setting}: RTN {base:+.2f}; " + ", ".join(parts))
    for path in sorted(results.glob("peers*.json")):
        rows = json.loads(path.read_text())["rows"]
        rtn = {(r["bits"], r["group_size"], r["symmetric"]): r["dppl"] for r in rows if r["method"].startswith("RTN")}
        for r in rows:
            key = (r["bits"], r["group_size"], r["symmetric"])
            if r["method"].startswith(("RTN", "fp")) or key not in rtn:
                continue
            sym = "sym" if r["symmetric"] else "asym"
            lines.append(
                f"- `{path.name}` W{r['bits']} g{r['group_size']} {sym}: {r['method']} ({r['data']}) "
                f"{r['dppl']:+.2f} = {r['dppl'] / rtn[key]:.2f}x RTN {sym} ({rtn[key]:+.2f})"
            )
    return lines


def update_readme(readme: Path, results: Path) -> None:
    """Replace the text between the results markers of ``readme`` with the ratio summary of every run and a
    link to the full tables (``RESULTS.md`` in ``results``: the README holds no copy of them)."""
    tables = (results / "RESULTS.md").relative_to(readme.parent)
    body = "\n".join([
        "### Every benchmark run", "",
        "Perplexity increase over FP as a multiple of RTN's in the same run (lower is better; runs differ in "
        "evaluation budget, so compare ratios, not ppl):", "",
        *_ratio_lines(results), "",
        f"Each run's table, with its machine, date, command and plot: [`{tables}`]({tables}) (written by the same "
        "command).", ""])
    replace_between(readme, "<!-- results:begin (bench/render.py --readme) -->", "<!-- results:end -->", body)


def replace_between(path: Path, begin: str, end: str, body: str) -> None:
    """Put ``body`` between the marker lines ``begin`` and ``end`` of ``path`` (a generated part of a document)."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + body + rest[rest.index(end) :])


def main(argv: list[str] | None = None) -> None:
    """CLI: write the Markdown section (and PNGs) next to the JSON files."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--out", help="Markdown file (default: RESULTS.md in --results)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--readme", help="also rewrite the Results section of this README (between its markers)")
    args = p.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "RESULTS.md"
    out.write_text(render(results, with_png=not args.no_png))
    print(f"[render] wrote {out}")
    if args.readme:
        update_readme(Path(args.readme).resolve(), results.resolve())
        print(f"[render] updated {args.readme}")


if __name__ == "__main__":
    main()
