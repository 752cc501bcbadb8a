"""Two rows of a ``bench/seeds.py`` summary side by side, paired over the seeds they share, in words.

    python bench/paired.py bench/results/quality_cpu-40steps-block-w4g64-asym-pool-seeds.json \\
        'zsaq block-warmup pool=128, SAM quantized' 'self_sample block-warmup pool=128, SAM quantized'

prints one line per row after the first (``B``), for the first (``A``):

    A against B: ahead at W of N seeds, by M ± SE (level)

``M`` is B's mean Δppl minus A's over their shared seeds (positive: A has the lower perplexity increase), ``W``
the seeds at which A is lower, ``SE`` the standard error of ``M`` over those seeds (the spread of the paired
differences / sqrt(N)), and the verdict ``ahead`` or ``behind`` when ``|M|`` is at least two standard errors,
else ``level``. The numbers are the summary's own ``paired`` entries (written by ``bench/seeds.py``), only turned
round to A's side; the sentences about seeds in ``bench/README.md`` and the README are these lines.
Where both rows' runs recorded the seed set they trained on, the line ends ``; the same seed set at K of M seeds``:
a gap at a seed where the sets differ is the data's as much as the method's.
``--setting`` picks the setting when a summary holds several; ``--json`` prints the same as JSON.
``--metric kl`` pairs the rows' KL to the teacher instead (on the same tokens; lower is better, so "ahead" means a
lower KL), which moves less from seed to seed than the perplexity does; its line reads ``A against B in KL: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METRICS = {"dppl": 2, "kl": 4}  # what a pair can be read on, and the decimals its words give


def compare(summary: dict, a: str, b: str, setting: str | None = None, metric: str = "dppl") -> dict:
    """Row ``a`` against row ``b``: seeds, a's wins, ``mean`` (b minus a), its standard error and the verdict.

    ``metric``: ``dppl`` (the perplexity increase) or ``kl`` (the KL to the teacher on the same tokens).
    """
    if metric not in METRICS:
        raise SystemExit(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
    methods = {r["method"] for r in summary["rows"] if setting in (None, r["setting"])}
    for name in (a, b):
        if name not in methods:
            raise SystemExit(f"no row {name!r} in the summary; its rows: {sorted(methods)}")
    found = [q for q in summary["paired"] if {q["a"], q["b"]} == {a, b} and setting in (None, q["setting"])]
    if not found:
        raise SystemExit(f"{a!r} and {b!r} share no seed in the summary")
    if len(found) > 1:
        raise SystemExit(f"{a!r} and {b!r} are paired in several settings; pass --setting")
    q = found[0]
    if metric == "kl":
        if "kl" not in q:
            raise SystemExit("the summary predates per-seed KL: write it again with python bench/seeds.py --again SUMMARY")
        q = {**q, **q["kl"]}
    flip = q["a"] == a  # the entry holds a minus b; the mean here is b minus a
    mean = -q["mean_a_minus_b"] if flip else q["mean_a_minus_b"]
    se = q["sd"] / math.sqrt(q["seeds"]) if q["sd"] is not None else None
    if se is None:
        verdict = "one seed"
    elif abs(mean) < 2 * se:
        verdict = "level"
    else:
        verdict = "ahead" if mean > 0 else "behind"
    return {
        "setting": q["setting"], "a": a, "b": b, "metric": metric, "seeds": q["seeds"],
        "a_wins": q["a_wins"] if flip else q["b_wins"], "mean": mean, "se": se, "verdict": verdict,
        **{k: q[k] for k in ("seed_sets_recorded", "same_seed_set") if k in q},
    }


def words(c: dict) -> str:
    """``ahead at W of N seeds, by M ± SE`` (``... but behind on average, by ...`` when the mean is against A).

    Δppl to two decimals, KL to four.
    """
    digits = METRICS[c.get("metric", "dppl")]
    se = f" ± {c['se']:.{digits}f}" if c["se"] is not None else ""
    head = f"ahead at {c['a_wins']} of {c['seeds']} seeds"
    if c["mean"] >= 0:
        return f"{head}, by {c['mean']:.{digits}f}{se}"
    return f"{head} but behind on average, by {-c['mean']:.{digits}f}{se}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary", type=Path, help="a bench/seeds.py summary JSON")
    p.add_argument("a", help="the row to describe")
    p.add_argument("b", nargs="+", help="the rows to pair it with")
    p.add_argument("--setting", help="the setting (needed when the rows are paired in several)")
    p.add_argument("--json", action="store_true", help="print JSON instead of sentences")
    p.add_argument("--metric", choices=list(METRICS), default="dppl",
                   help="pair the perplexity increase (default) or the KL to the teacher")
    args = p.parse_args()
    summary = json.loads(args.summary.read_text())
    found = [compare(summary, args.a, b, args.setting, args.metric) for b in args.b]
    if args.json:
        print(json.dumps(found, indent=1))
        return
    unit = " in KL" if args.metric == "kl" else ""
    for c in found:
        print(f"{c['a']} against {c['b']}{unit}: {words(c)} ({c['verdict']}){seed_sets(c)}")


def seed_sets(c: dict) -> str:
    """``; the same seed set at K of M seeds`` where the runs recorded theirs (M: seeds at which both did), else ''."""
    if "seed_sets_recorded" not in c:
        return ""
    return f"; the same seed set at {c['same_seed_set']} of {c['seed_sets_recorded']} seeds"


if __name__ == "__main__":
    main()
