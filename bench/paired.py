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
``--seeds 0 3 4 5`` pairs the rows over just those seeds, read again from the rows' per-seed values in the summary
(``seeds``, ``seeds_kl``) with ``bench/seeds.py``'s own arithmetic: a section's pair stays reproducible after its
summary gains seeds. Over every shared seed it is the summary's entry exactly; a seed either row did not run is an
error. ``--setting`` picks the setting when a summary holds several; ``--json`` prints the same as JSON.
``--metric kl`` pairs the rows' KL to the teacher instead (on the same tokens; lower is better, so "ahead" means a
lower KL), which moves less from seed to seed than the perplexity does; its line reads ``A against B in KL: ...``.
``--gain C D`` (with one ``B``) asks whether a change helps one method more than another: A's gain over B against
C's gain over D, per seed, over the seeds all four ran; its line reads ``A over B against C over D: ahead at W of N
seeds, by M ± SE``, ahead where A's gain is the larger (the norms for zsaq against the norms for ``self_sample``:
``A`` zsaq with them, ``B`` without, ``C`` and ``D`` likewise).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seeds as summaries  # noqa: E402  (bench/seeds.py, beside this file: the arithmetic of its pairs)

METRICS = {"dppl": 2, "kl": 4}  # what a pair can be read on, and the decimals its words give


def compare(
    summary: dict, a: str, b: str, setting: str | None = None, metric: str = "dppl", seeds: list[str] | None = None
) -> dict:
    """Row ``a`` against row ``b``: seeds, a's wins, ``mean`` (b minus a), its standard error and the verdict.

    ``metric``: ``dppl`` (the perplexity increase) or ``kl`` (the KL to the teacher on the same tokens).
    ``seeds``: pair over these seeds only, from the rows' per-seed values (default: the summary's entry, over every
    seed both rows ran).
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
    q = found[0] if seeds is None else over_seeds(summary, found[0], seeds)
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


def over_seeds(summary: dict, entry: dict, seeds: list[str]) -> dict:
    """The summary's pair ``entry`` computed again over ``seeds`` alone, as ``bench/seeds.py`` computes it."""
    by = {r["method"]: r for r in summary["rows"] if r["setting"] == entry["setting"]}
    ra, rb = by[entry["a"]], by[entry["b"]]
    require_seeds((ra, rb), seeds)
    shared = sorted(set(seeds))  # the order bench/seeds.py sums in, so all shared seeds give its entry bit for bit
    q = {
        "setting": entry["setting"],
        "a": entry["a"],
        "b": entry["b"],
        "seeds": len(shared),
        **summaries.differences(ra["seeds"], rb["seeds"], shared),
        **summaries.same_seed_sets(ra, rb, shared),
    }
    if "seeds_kl" in ra and "seeds_kl" in rb:  # summaries written before per-seed KL have none
        q["kl"] = summaries.differences(ra["seeds_kl"], rb["seeds_kl"], shared)
    return q


def require_seeds(rows, seeds: list[str]) -> None:
    """Stop, naming the row and the seed, where one of ``rows`` (summary rows) did not run one of ``seeds``."""
    for s in seeds:
        for r in rows:
            if s not in r["seeds"]:
                raise SystemExit(f"seed {s}: {r['method']!r} did not run it; its seeds: {', '.join(r['seeds'])}")


def gain(
    summary: dict, a: str, b: str, c: str, d: str, setting: str | None = None, metric: str = "dppl",
    seeds: list[str] | None = None,
) -> dict:
    """Row ``a``'s gain over ``b`` against ``c``'s over ``d``, seed by seed: does a change help one method more?

    Per seed, ``a - b`` and ``c - d`` (negative: the first row lower) become two rows of their own, paired as
    ``compare`` pairs rows: ``mean`` is (c - d) - (a - b), positive where a's gain over b is the larger, and the
    wins are the seeds at which it is. Over the seeds all four rows ran, or over ``seeds``.
    """
    if metric not in METRICS:
        raise SystemExit(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
    settings = {r["setting"] for r in summary["rows"] if r["method"] == a and setting in (None, r["setting"])}
    if len(settings) != 1:
        raise SystemExit(f"{a!r} is in {len(settings)} settings of the summary: pass --setting" if settings else
                         f"no row {a!r} in the summary")
    (setting,) = settings
    by = {r["method"]: r for r in summary["rows"] if r["setting"] == setting}
    for name in (b, c, d):
        if name not in by:
            raise SystemExit(f"no row {name!r} in the summary; its rows: {sorted(by)}")
    if seeds is None:
        seeds = sorted(set.intersection(*(set(by[n]["seeds"]) for n in (a, b, c, d))))
        if not seeds:
            raise SystemExit(f"{a!r}, {b!r}, {c!r} and {d!r} share no seed in the summary")
    require_seeds([by[n] for n in (a, b, c, d)], seeds)

    def minus(x: str, y: str) -> dict:
        row = {"setting": setting, "method": f"{x} over {y}",
               "seeds": {s: by[x]["seeds"][s] - by[y]["seeds"][s] for s in seeds}}
        if "seeds_kl" in by[x] and "seeds_kl" in by[y]:
            row["seeds_kl"] = {s: by[x]["seeds_kl"][s] - by[y]["seeds_kl"][s] for s in seeds}
        return row

    first, second = minus(a, b), minus(c, d)
    two = {"rows": [first, second], "paired": [{"setting": setting, "a": first["method"], "b": second["method"]}]}
    return compare(two, first["method"], second["method"], setting, metric, seeds)


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
    p.add_argument("--seeds", nargs="+", help="pair over these seeds only (default: every seed both rows ran)")
    p.add_argument("--gain", nargs=2, metavar=("C", "D"),
                   help="A's gain over B (one B) against C's gain over D, seed by seed")
    p.add_argument("--json", action="store_true", help="print JSON instead of sentences")
    p.add_argument("--metric", choices=list(METRICS), default="dppl",
                   help="pair the perplexity increase (default) or the KL to the teacher")
    args = p.parse_args()
    summary = json.loads(args.summary.read_text())
    if args.gain and len(args.b) != 1:
        raise SystemExit("--gain C D compares A's gain over one row B with C's over D: pass one B")
    if args.gain:
        found = [gain(summary, args.a, args.b[0], *args.gain, args.setting, args.metric, args.seeds)]
    else:
        found = [compare(summary, args.a, b, args.setting, args.metric, args.seeds) for b in args.b]
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
