"""One table over seeds: ``bench/quality.py`` runs that differ only in ``method.seed``, summarised per method.

    python bench/seeds.py --runs bench/results/seeds/quality_cpu-40steps-seed*.json \\
        --latent bench/results/seeds/quality_cpu-40steps-seed?.json bench/results/seeds/quality_cpu-40steps-seed?-baselines.json \\
        --out bench/results/quality_cpu-40steps-seeds.json
    python bench/seeds.py --again bench/results/quality_cpu-40steps-seeds.json --add NEW_RUN.json   # the same, plus a run

Each run's seed is read from its command (``--set method.seed=S``; the recipe's seed 0 when absent).
Rows are grouped by (setting, method) and labelled with where SAM perturbed: a row's own
``sam_space`` (written by ``bench/quality.py`` since that option exists), else ``quantized`` for
the ``zsaq sam=quantized`` row, else ``latent`` for the files passed to ``--latent`` (runs made
before ``method.sam_space`` existed, when SAM always perturbed the latent weights), else the current
default. Rows without SAM (``rho=0``, ``rtn``, the ``block-warmup`` row that runs no game step) carry no such
label. A row whose block warm-up moved its weights inside their bins (``block_warmup.margin`` > 0) and whose
name does not say so gets `` margin=M``; one trained on new seed sequences every pass
(``fresh_per_epoch``) gets `` fresh``. With ``--pool-label`` every trained row also gets its run's seed pool,
`` pool=N`` (``budget.num_sequences``; per pass with ``fresh``), so runs that differ in it are told apart; with
``--steps-label`` its game's length, `` steps=N`` (``budget.steps``), so one summary pairs a longer game with a shorter.
Each source names the machine that trained its run (``machine``; for a ``bench/reeval.py`` file, its source run's,
and ``scored_on``), and the summary's ``machine`` lists them all; ``--one-machine`` refuses a run from a second
machine, whose rounding (and at some seeds its teacher's seed sequences) differs.

Writes a ``quality``-style JSON (so ``bench/render.py`` shows it): one row per method with the mean
of ``ppl``, ``dppl``, ``kl``, ``top1``, ``seconds`` (and ``train_kl`` where every seed has it) over seeds,
``per_seed`` (Δppl per seed, as text) and each seed's Δppl and KL (``seeds``, ``seeds_kl``), and ``paired``: for
every pair of methods, the mean difference of Δppl over the seeds they share, how many seeds the first one wins
(ties count for neither) and the spread (``sd``) of the differences, the same for the KL to the teacher under
``kl``, and, where both rows' runs recorded the seed set they trained on (``seed_data.tokens_sha256``, in
``seed_sets`` per row), ``same_seed_set`` of ``seed_sets_recorded`` seeds;
its note lists the pairs with the default ``zsaq`` row (``--ref``: another row), each gap with its standard
error. A PNG next to it shows each seed's Δppl and the mean per method.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import statistics
import sys
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEANS = ("ppl", "dppl", "kl", "top1", "seconds")
NO_SAM = re.compile(r"\brho=0(?![.\d])")  # "zsaq rho=0" trains without SAM; "zsaq rho=0.01" does not


def seed_of(command: str) -> int:
    """The ``method.seed`` a quality.py command set (0, the recipe's, when it set none)."""
    m = re.search(r"method\.seed=(-?\d+)", command)
    return int(m.group(1)) if m else 0


def _quality_rows() -> dict[str, list[str]]:
    """``bench/quality.py``'s rows (name -> overrides), loaded from beside this file."""
    spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).with_name("quality.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ROWS


QUALITY_ROWS = _quality_rows()


def trains_end_to_end(method: str) -> bool:
    """Whether a quality.py row runs game steps (where SAM acts): not the warm-up alone, which sets 0 steps."""
    return "method.steps=0" not in QUALITY_ROWS.get(method, [])


def label(row: dict, latent_file: bool, default_space: str, pool: int | None = None, steps: int | None = None) -> str:
    """Method name with where its SAM perturbed, e.g. ``zsaq, SAM quantized``; rows without SAM as they are.

    ``pool``: the run's seed sequences, appended as `` pool=N`` to rows that train on them; ``steps`` likewise, its
    game steps as `` steps=N``.
    """
    method = name = row["method"]
    margin = (row.get("block_warmup") or {}).get("margin")
    if margin and "margin=" not in method:  # a run made while the warm-up's margin defaulted to it
        method = f"{method} margin={margin:g}"
    if row.get("fresh_per_epoch") and "fresh" not in method:
        method = f"{method} fresh"
    if pool is not None and not method.startswith(("rtn", "noise", "fp")):
        method = f"{method} pool={pool}"
    if steps is not None and not method.startswith(("rtn", "fp")):
        method = f"{method} steps={steps}"
    if method.startswith("rtn") or NO_SAM.search(method) or method == "fp" or not trains_end_to_end(name):
        return method
    if "sam=quantized" in method:
        space, method = "quantized", method.replace(" sam=quantized", "")
    else:
        space = row.get("sam_space") or ("latent" if latent_file else default_space)
    return f"{method}, SAM {space}"


def trained_on(result: dict, path: Path) -> str:
    """The machine that trained the run in ``result`` (read from ``path``).

    A ``bench/quality.py`` file's own ``machine``. A ``bench/reeval.py`` file records the machine that scored it, and
    its ``source`` the run it scored: that run's machine, named in ``source`` or read from the source's file.
    """
    source = result.get("source")
    if not source:
        return result["machine"]
    if source.get("machine"):
        return source["machine"]
    origin = ROOT / source["file"]
    if not origin.exists():
        raise SystemExit(f"{path} re-scores {source['file']}, which is missing: the machine that trained it is read "
                         "from there (restore the file, or leave the run out)")
    return json.loads(origin.read_text())["machine"]


def machines(sources: list[dict]) -> str:
    """The machines that trained a summary's runs, each once, in the order the runs came: ``"A; B"``."""
    return "; ".join(dict.fromkeys(s["machine"] for s in sources))


def summarise(
    runs: list[Path],
    latent: set[Path],
    default_space: str,
    pool_label: bool = False,
    steps_label: bool = False,
    one_machine: bool = False,
) -> dict:
    """Rows per (setting, label) over seeds, their pairs, and each run's source.

    ``one_machine``: every run must have trained on the first run's machine (another CPU rounds otherwise, and its
    teacher can sample other seed sequences), else ``SystemExit`` names the run and both machines.
    """
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    sources = []
    for path in runs:
        result = json.loads(path.read_text())
        seed = result["seed"] if "seed" in result else seed_of(result["command"])  # bench/reeval.py names it
        machine = trained_on(result, path)
        if one_machine and sources and machine != sources[0]["machine"]:
            raise SystemExit(f"{path} was trained on {machine}, but {sources[0]['file']} on {sources[0]['machine']}: "
                             "--one-machine takes the runs of one machine (leave it off to mix machines)")
        sources.append(
            {
                "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                "seed": seed,
                "command": result["command"],
                "date": result["date"],
                "machine": machine,
                **({"scored_on": result["machine"]} if result.get("source") else {}),
            }
        )
        pool = result["budget"]["num_sequences"] if pool_label else None
        steps = result["budget"]["steps"] if steps_label else None
        for row in result["rows"]:
            if row["method"] == "fp":
                continue
            key = (row["setting"], label(row, path.resolve() in latent, default_space, pool, steps))
            if seed in groups.setdefault(key, {}):
                raise SystemExit(f"{key} seed {seed} appears twice (again in {path}): pass each run once")
            groups[key][seed] = row
    rows = []
    for (setting, method), by_seed in groups.items():
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]
        row = {
            "setting": setting,
            "method": method,
            **{k: first.get(k) for k in ("bits", "group_size", "symmetric", "data")},
        }
        for k in MEANS:
            row[k] = statistics.fmean(by_seed[s][k] for s in seeds)
        row["peak_rss_mb"] = max(by_seed[s]["peak_rss_mb"] for s in seeds)
        if all(by_seed[s].get("train_kl") is not None for s in seeds):  # rows written since quality.py records it
            row["train_kl"] = statistics.fmean(by_seed[s]["train_kl"] for s in seeds)
        row["per_seed"] = " / ".join(f"{s}: {by_seed[s]['dppl']:+.3f}" for s in seeds)
        row["seeds"] = {str(s): by_seed[s]["dppl"] for s in seeds}
        row["seeds_kl"] = {str(s): by_seed[s]["kl"] for s in seeds}
        sets = {str(s): (by_seed[s].get("seed_data") or {}).get("tokens_sha256") for s in seeds}
        if any(sets.values()):  # runs written since the trainer records its seed set (None: one that did not)
            row["seed_sets"] = sets
        rows.append(row)
    rows.sort(key=lambda r: (r["setting"], r["dppl"]))
    paired = []
    for a, b in combinations(rows, 2):
        if a["setting"] != b["setting"]:
            continue
        shared = sorted(set(a["seeds"]) & set(b["seeds"]))
        if not shared:
            continue
        paired.append(
            {
                "setting": a["setting"],
                "a": a["method"],
                "b": b["method"],
                "seeds": len(shared),
                **differences(a["seeds"], b["seeds"], shared),
                "kl": differences(a["seeds_kl"], b["seeds_kl"], shared),
                **same_seed_sets(a, b, shared),
            }
        )
    return {"rows": rows, "paired": paired, "sources": sources}


def differences(a: dict[str, float], b: dict[str, float], shared: list[str]) -> dict:
    """``a`` minus ``b`` over the ``shared`` seeds: the mean, the spread and how many seeds each side is lower at.

    ``sd`` is the spread of the paired differences over seeds (null with one seed): a mean gap smaller than its
    standard error (sd / sqrt(seeds)) is not told apart from 0 by these seeds.
    """
    diffs = [a[s] - b[s] for s in shared]
    return {
        "mean_a_minus_b": statistics.fmean(diffs),
        "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "a_wins": sum(d < 0 for d in diffs),
        "b_wins": sum(d > 0 for d in diffs),
    }


def same_seed_sets(a: dict, b: dict, shared: list[str]) -> dict[str, int]:
    """Of the shared seeds at which both rows recorded their seed set, how many had the same one.

    ``{}`` where none did. A pair is a control for the method only where the sets match: rows of another pool size
    train on others, and so can the same settings on another machine, whose rounding samples other tokens.
    """
    sa, sb = a.get("seed_sets") or {}, b.get("seed_sets") or {}
    known = [s for s in shared if sa.get(s) and sb.get(s)]
    if not known:
        return {}
    return {"seed_sets_recorded": len(known), "same_seed_set": sum(sa[s] == sb[s] for s in known)}


def notes(paired: list[dict], ref: str) -> list[str]:
    """One line per setting: every row paired with ``ref`` (the default method) over their shared seeds."""
    lines = []
    for setting in dict.fromkeys(q["setting"] for q in paired):
        pairs = [q for q in paired if q["setting"] == setting and ref in (q["a"], q["b"])]
        if not pairs:
            continue
        parts = []
        for q in pairs:
            other, sign = (q["b"], -1) if q["a"] == ref else (q["a"], 1)
            wins = q["b_wins"] if q["a"] == ref else q["a_wins"]
            se = f" ± {q['sd'] / q['seeds'] ** 0.5:.3f}" if q.get("sd") is not None else ""
            parts.append(f"{other} {sign * q['mean_a_minus_b']:+.3f}{se} (better at {wins} of {q['seeds']} seeds)")
        lines.append(
            f"{setting}: paired over seeds against `{ref}`, in Δppl, mean ± standard error over seeds "
            "(negative: the other row is better): " + "; ".join(parts)
        )
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in result["rows"]))
    width = max(max(6, 1.3 * sum(r["setting"] == s for r in result["rows"])) for s in settings)
    fig, axes = plt.subplots(len(settings), 1, figsize=(width, 4.5 * len(settings)), squeeze=False)
    for ax, setting in zip(axes[:, 0], settings, strict=True):
        # one panel per setting; a row far above the others (RTN at W3) would flatten the rest, so it is
        # drawn but left out of the y range and its mean written on its bar
        rows = [r for r in result["rows"] if r["setting"] == setting]
        trained = [r for r in rows if not r["method"].startswith("rtn")] or rows
        lo = min(min(r["seeds"].values()) for r in trained)
        hi = max(max(r["seeds"].values()) for r in trained)
        top = hi + 0.25 * (hi - lo + 1e-9)
        for i, r in enumerate(rows):
            vals = list(r["seeds"].values())
            ax.bar(i, min(r["dppl"], top), color="tab:blue", alpha=0.35)
            ax.scatter([i] * len(vals), [min(v, top) for v in vals], color="tab:blue", s=14, zorder=3)
            if r["dppl"] > top:
                ax.text(i, top, f"{r['dppl']:+.2f}", ha="center", va="top", fontsize=7)
        ax.set_xticks(range(len(rows)), [r["method"].replace(", ", "\n") for r in rows], fontsize=7)
        ax.set_ylim(lo - 0.25 * (hi - lo + 1e-9), top)
        ax.set_ylabel("Δppl over FP (dots: seeds, bar: mean)", fontsize=8)
        ax.set_title(f"{setting}: {len(result['sources'])} runs, seeds "
                     f"{sorted({s['seed'] for s in result['sources']})}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", help="bench/quality.py result files")
    p.add_argument("--latent", nargs="*", default=[], help="runs made before method.sam_space existed")
    p.add_argument("--out")
    p.add_argument("--ref", help="the row the note pairs every other row with (default: the default zsaq row)")
    p.add_argument("--pool-label", action="store_true", help="label every trained row with its run's seed pool")
    p.add_argument("--steps-label", action="store_true", help="label every trained row with its run's game steps")
    p.add_argument("--one-machine", action="store_true",
                   help="refuse runs trained on another machine than the first run's (their rounding differs)")
    p.add_argument("--again", type=Path, metavar="SUMMARY",
                   help="write SUMMARY again with the command stored in it (its --runs, --latent, --out, ...)")
    p.add_argument("--add", nargs="+", default=[], metavar="RUN",
                   help="with --again: runs to add to its --runs (a run it already has is not added twice)")
    return p


def again_argv(summary: Path, add: list[str]) -> list[str]:
    """The arguments of the command stored in ``summary`` (a bench/seeds.py output), with ``add`` appended to its
    ``--runs``: the summary written again, with new runs, and a full command stored for the next time."""
    words = shlex.split(json.loads(summary.read_text())["command"])
    if words[:2] != ["python", "bench/seeds.py"]:
        raise SystemExit(f"{summary} was not written by bench/seeds.py (its command: {' '.join(words[:3])} ...)")
    ns = parser().parse_args(words[2:])
    runs = ns.runs + [r for r in add if r not in ns.runs]
    argv = ["--runs", *runs] + (["--latent", *ns.latent] if ns.latent else []) + ["--out", ns.out]
    argv += (["--ref", ns.ref] if ns.ref else []) + (["--pool-label"] if ns.pool_label else [])
    return argv + (["--steps-label"] if ns.steps_label else []) + (["--one-machine"] if ns.one_machine else [])


def main(argv: list[str] | None = None) -> None:
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.again:
        if args.runs or args.out:
            p.error("--again takes the summary's own --runs and --out (add runs with --add)")
        argv = again_argv(args.again, args.add)
        args = p.parse_args(argv)
    elif args.add:
        p.error("--add goes with --again")
    if not (args.runs and args.out):
        p.error("--runs and --out are required (or --again SUMMARY)")
    from zsaq_dist.config import MethodCfg

    runs = [Path(r).resolve() for r in args.runs]
    latent = {Path(r).resolve() for r in args.latent}
    result = summarise(runs, latent, MethodCfg().sam_space, args.pool_label, args.steps_label, args.one_machine)
    first = json.loads(runs[0].read_text())
    # what the row names carry instead
    labelled = ({"num_sequences"} if args.pool_label else set()) | ({"steps"} if args.steps_label else set())
    budget = {k: v for k, v in (first.get("budget") or {}).items() if k not in labelled}
    result = {
        "machine": machines(result["sources"]),  # every machine that trained a run, not just the first run's
        "date": max(s["date"] for s in result["sources"]),
        "command": shlex.join(["python", "bench/seeds.py", *argv]),
        "budget": budget or None,
        **result,
    }
    result["notes"] = notes(result["paired"], args.ref or f"zsaq, SAM {MethodCfg().sam_space}")
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and .png")


if __name__ == "__main__":
    main()
