"""Where zsaq stands on issue #3's targets: one generated table, from the committed summaries alone.

    python bench/standing.py                       # print the table
    python bench/standing.py --readme README.md    # also rewrite it between the README's standing markers

Each target of issue #3 ("Done when") is checked at the settings the issue names (those that name none at each
of the benchmark's four), on the newest summaries of the CPU benchmark (``bench/seeds.py`` over
``bench/quality.py`` runs, re-scored by ``bench/reeval.py``):

- ``ratio``: zsaq's mean perplexity increase over FP as a multiple of a reference row's (RTN); met at or
  below ``at_most``;
- ``below``: zsaq's mean increase against a reference row's (HQQ); met when lower, with the seeds at which
  it is lower;
- ``paired``: zsaq against an ablation or baseline over the seeds they share (``bench/paired.py``, the
  words the sections of ``bench/README.md`` use); ``met`` only when ahead by at least two standard errors,
  ``not shown`` when ahead on average but inside them, ``missed`` when not ahead on average, ``one seed``
  when only one seed is shared. Where the summary's checkpoints were scored again on tokens 4096-16384 the
  held-out text gets its own column.

:data:`TARGETS` names every file and row, so each cell can be traced to a JSON under ``bench/results/``;
nothing here is typed in by hand. A new summary becomes the evidence by changing its entry here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paired  # noqa: E402  (bench/paired.py, beside this file)
from render import replace_between  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN = "<!-- standing:begin (bench/standing.py --readme) -->"
END = "<!-- standing:end -->"


class Target(NamedTuple):
    """One claim of the issue at one setting.

    ``kind``: ``ratio``, ``below`` or ``paired`` (module docstring). ``summary``: the evidence file under the
    results folder; ``row``: zsaq's row in it. ``ref``: the other side: a row name of ``summary`` (``paired``,
    and ``ratio`` when the reference ran in the same runs) or ``(file, {key: value})`` selecting one row of
    another file (a peers table). ``held_out``: the same runs re-scored on held-out tokens (``paired`` only).
    """

    claim: str
    setting: str
    kind: str
    summary: str
    row: str
    ref: str | tuple[str, dict]
    at_most: float | None = None
    held_out: str | None = None
    note: str = ""
    key: str | None = None  # the summary's setting name (w4a8, ...), needed when it holds several


W4, W4_HELD = "quality_cpu-40steps-block-w4g64-asym-pool-seeds.json", \
    "quality_cpu-40steps-block-w4g64-asym-pool128-after4096-16384-seeds.json"
W3, W3_HELD = "quality_cpu-40steps-block-w3g64-pool-seeds.json", \
    "quality_cpu-40steps-block-w3g64-pool128-after4096-16384-seeds.json"
W4A8, W4A8_HELD = "quality_cpu-40steps-block-w4a8-pool-seeds.json", \
    "quality_cpu-40steps-block-w4a8-pool128-after4096-16384-seeds.json"
W4SYM, W4SYM_HELD = "quality_cpu-40steps-block-w4g64-pool-seeds.json", \
    "quality_cpu-40steps-block-w4g64-pool128-after4096-16384-seeds.json"
# the runs the AMD EPYC trained at W4 g64 asym (bench/seeds.py --one-machine): the default recipe and the norms' recipe,
# each with its ablations
W4_EPYC, W4_EPYC_HELD = "quality_cpu-40steps-block-w4g64-asym-epyc-pool-seeds.json", \
    "quality_cpu-40steps-block-w4g64-asym-epyc-pool128-after4096-16384-seeds.json"
# the default and its SAM ablation at 40 and 80 game steps, one summary with the game's length in the row names
W4_STEPS, W4_STEPS_HELD = "quality_cpu-block-w4g64-asym-pool128-steps-seeds.json", \
    "quality_cpu-block-w4g64-asym-pool128-steps-after4096-16384-seeds.json"
POOL = "pool=128, SAM quantized"
ZSAQ = f"zsaq block-warmup {POOL}"
ZSAQ_LR = f"zsaq block-warmup lr=2e-5 {POOL}"
NO_SAM = "zsaq block-warmup rho=0 pool=128"  # SAM's ablation: the same game with plain AdamW
RTN = {"method": "RTN (zsaq_dist)", "group_size": 64}
# a lever's zsaq against `self_sample` at the default recipe (the only self_sample where none ran with the lever)
VS_SELF_SAMPLE = (("beats `self_sample`", ", `self_sample` at the default", f"self_sample block-warmup {POOL}"),)
NOISE = "noise, SAM quantized"
# the paired targets at the default recipe: (claim, the other row, note)
DEFAULT_PAIRS = (
    ("beats `self_sample`", f"self_sample block-warmup {POOL}", ""),
    ("beats `noise`", NOISE, "`noise` uses no seed sequences, so no warm-up: 40 game steps from RTN"),
    ("SAM helps (`rho=0` worse)", NO_SAM, ""),
    ("the ascent helps (`ascent=false` worse)", f"zsaq block-warmup ascent=false {POOL}", ""))
# the settings, each with its summary and the summary of the same runs scored on held-out tokens
SETTINGS = (("W3 g64", W3, W3_HELD), ("W4A8", W4A8, W4A8_HELD), ("W4 g64 asym", W4, W4_HELD))
# with the benchmark's fourth setting, which the ratio and HQQ targets do not name: the paired targets name no setting
BENCH_SETTINGS = (*SETTINGS, ("W4 g64 sym", W4SYM, W4SYM_HELD))


def _peer(method: dict, bits: int, symmetric: bool) -> tuple[str, dict]:
    return "peers.json", {**method, "bits": bits, "symmetric": symmetric}


def _lever(
    label: str, row: str, note: str, pairs: tuple[tuple[str, str, str], ...], settings: tuple = SETTINGS
) -> list[Target]:
    """A lever's paired targets at ``settings`` (the issue's three): zsaq's ``row`` against each ``(claim, against, ref)``.

    The setting column reads ``"<setting>, <label><against>"``; ``note`` says the lever is not the default.
    """
    return [Target(claim, f"{s}, {label}{against}", "paired", f, row, ref, held_out=h, note=note)
            for s, f, h in settings for claim, against, ref in pairs]


NORMS_1E4 = f"zsaq block-warmup norm_lr=1e-4 {POOL}"  # the norms' lever, in three of the levers below


def _norms_note(lr: str) -> str:
    """The note of a norms lever's rows: not the default."""
    return f"training the norms at norm_lr {lr} is not the default (0: frozen)"


TARGETS = [
    Target("at most half of RTN's increase", "W3 g64", "ratio", W3, ZSAQ, _peer(RTN, 3, True), at_most=0.5),
    Target("at most half of RTN's increase", "W4A8", "ratio", W4A8, ZSAQ, "rtn", at_most=0.5),
    Target("below calibration-free HQQ", "W4 g64 asym", "below", W4, ZSAQ,
           _peer({"method": "HQQ", "group_size": 64}, 4, False)),
    *(Target(claim, s, "paired", f, ZSAQ, ref, held_out=h, note=note)
      for claim, ref, note in DEFAULT_PAIRS for s, f, h in BENCH_SETTINGS),
    # the same three pairs at W4 g64 asym with every row trained on one CPU (bench/README.md, "The default recipe on
    # one machine"): the default's runs in the summaries above (2026-11-24 to 12-03) recorded no CPU
    *(Target(claim, "W4 g64 asym, one CPU", "paired", W4_EPYC, ZSAQ, ref, held_out=W4_EPYC_HELD,
             note="zsaq and the other row trained on the AMD EPYC (bench/seeds.py --one-machine)")
      for claim, ref, _ in DEFAULT_PAIRS if ref != NOISE),
    # not the default: the game's lr at 2e-5 instead of 5e-5 (bench/README.md, "A gentler game at W4", "... at
    # W4A8" and "... at W3")
    *_lever("zsaq at game lr 2e-5", ZSAQ_LR, "game lr 2e-5 is not the default (5e-5)", (
        ("beats `self_sample`", ", `self_sample` too", f"self_sample block-warmup lr=2e-5 {POOL}"),
        ("beats `self_sample`", ", `self_sample` at 5e-5", f"self_sample block-warmup {POOL}"),
        ("the ascent helps (`ascent=false` worse)", ", the ablation too", f"zsaq block-warmup ascent=false lr=2e-5 {POOL}"))),
    # not the default: SAM's radius at 0.02 instead of 0.05 (bench/README.md, "A smaller SAM radius after the
    # warm-up"), and from 0.1 to 0 by the cosine, the default's mean radius ("SAM's radius large early, none late")
    *(t for label, row, note in (
        ("SAM radius 0.02", "rho=0.02", "SAM radius 0.02 is not the default (0.05)"),
        ("SAM radius 0.1 to 0", "rho=0.1->0", "SAM radius from 0.1 to 0 (cosine) is not the default (0.05 throughout)"))
      for t in _lever(label, f"zsaq block-warmup {row} {POOL}", note, (("SAM helps (`rho=0` worse)", "", NO_SAM),))),
    # not the default: the game's first quarter trains only the scales, scale_lr 1e-5 (bench/README.md, "Only the
    # scales first"); its self_sample is the default's, as no self_sample row ran with the lever
    *_lever("zsaq scales first", f"zsaq block-warmup scales-first {POOL}",
            "the scales-only first quarter (scale_lr 1e-5) is not the default",
            VS_SELF_SAMPLE),
    # ... and the norms with them, norm_lr 1e-5, at W4 g64 asym only ("The scale lr alone, both W4 levers together,
    # and the norms")
    *_lever("zsaq scales first and norms", f"zsaq block-warmup scales-first norms {POOL}",
            "the scales-only first quarter with the norms trained (scale_lr and norm_lr 1e-5) is not the default",
            VS_SELF_SAMPLE,
            settings=SETTINGS[2:]),
    # ... and the norms alone over the default, norm_lr 1e-4 ("The norms alone at norm_lr 1e-4"), and at W4 g64 asym
    # against self_sample with the same norms ("The norms' fair pair, and ten times their lr") and against the two
    # ablations with them, all three trained on the EPYC ("SAM and the ascent on the norms' recipe on one machine")
    *_lever("zsaq norms 1e-4", NORMS_1E4, _norms_note("1e-4"), VS_SELF_SAMPLE),
    *_lever("zsaq norms 1e-4", NORMS_1E4, _norms_note("1e-4"),
            (("beats `self_sample`", ", `self_sample` with the same norms", f"self_sample block-warmup norm_lr=1e-4 {POOL}"),),
            settings=SETTINGS[2:]),
    *_lever("zsaq norms 1e-4", NORMS_1E4,
            _norms_note("1e-4") + "; zsaq and both ablations trained on one CPU (AMD EPYC; bench/seeds.py "
            "--one-machine)",
            (("SAM helps (`rho=0` worse)", ", the ablation too", "zsaq block-warmup rho=0 norm_lr=1e-4 pool=128"),
             ("the ascent helps (`ascent=false` worse)", ", the ablation too",
              f"zsaq block-warmup ascent=false norm_lr=1e-4 {POOL}")),
            settings=(("W4 g64 asym", W4_EPYC, W4_EPYC_HELD),)),
    # ... and the norms at norm_lr 1e-3, at W4 g64 asym only (the same section)
    *_lever("zsaq norms 1e-3", f"zsaq block-warmup norm_lr=1e-3 {POOL}", _norms_note("1e-3"), VS_SELF_SAMPLE,
            settings=SETTINGS[2:]),
    # not the CPU budget: a game twice as long (bench/README.md, "SAM in a longer game at W4 g64 asym")
    Target("SAM helps (`rho=0` worse)", "W4 g64 asym, 80 game steps", "paired", W4_STEPS,
           "zsaq block-warmup pool=128 steps=80, SAM quantized", "zsaq block-warmup rho=0 pool=128 steps=80",
           held_out=W4_STEPS_HELD, note="80 game steps (2.5 passes over the 128 sequences) is not the CPU budget (40)"),
]


def _load(results: Path, name: str) -> dict:
    path = results / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: a target of bench/standing.py names it (TARGETS)")
    return json.loads(path.read_text())


def _row(rows: list[dict], select: dict, where: str) -> dict:
    found = [r for r in rows if all(r.get(k) == v for k, v in select.items())]
    if len(found) != 1:
        raise SystemExit(f"{where}: {len(found)} rows match {select}; a target must select exactly one")
    return found[0]


def _paired_cell(summary: dict, t: Target) -> tuple[str, dict]:
    c = paired.compare(summary, t.row, t.ref, t.key)
    return f"{paired.words(c)} ({c['verdict']})", c


def _status(c: dict) -> str:
    """``met`` only when ahead by two standard errors; ahead on average alone is ``not shown``."""
    if c["verdict"] == "ahead":
        return "met"
    if c["verdict"] == "one seed":
        return "one seed"
    return "not shown" if c["mean"] > 0 else "missed"


def check(t: Target, results: Path) -> dict:
    """The target's cells: ``first`` (on the runs' own 4096 tokens), ``held_out`` (or None) and ``status``."""
    summary = _load(results, t.summary)
    if t.kind == "paired":
        first, c = _paired_cell(summary, t)
        held = _paired_cell(_load(results, t.held_out), t)[0] if t.held_out else None
        return {"first": first, "held_out": held, "status": _status(c)}
    select = {"method": t.row, **({"setting": t.key} if t.key else {})}
    zsaq = _row(summary["rows"], select, t.summary)
    if isinstance(t.ref, str):
        ref, ref_name = _row(summary["rows"], {"method": t.ref}, t.summary), t.ref
    else:
        ref, ref_name = _row(_load(results, t.ref[0])["rows"], t.ref[1], t.ref[0]), t.ref[1]["method"]
    seeds = zsaq.get("seeds") or {}
    n = len(seeds) or 1
    mean = f"zsaq {zsaq['dppl']:+.3f} (mean of {n} seed{'s' if n > 1 else ''})"
    if t.kind == "ratio":
        ratio = zsaq["dppl"] / ref["dppl"]
        met = ratio <= t.at_most
        return {"first": f"{mean} against {ref_name} {ref['dppl']:+.3f}: {ratio:.2f}x", "held_out": None,
                "status": "met" if met else "missed"}
    if t.kind == "below":
        lower = sum(v < ref["dppl"] for v in seeds.values())
        at = f", lower at {lower} of {n} seeds" if seeds else ""
        return {"first": f"{mean} against {ref_name} {ref['dppl']:+.3f}{at}", "held_out": None,
                "status": "met" if zsaq["dppl"] < ref["dppl"] else "missed"}
    raise SystemExit(f"target {t.claim!r}: unknown kind {t.kind!r} (ratio, below or paired)")


def table(results: Path = RESULTS) -> str:
    """The Markdown table of every target, with its source file."""
    lines = ["| target | setting | on the runs' 4096 tokens | held out (tokens 4096-16384) | status | source |",
             "|---|---|---|---|---|---|"]
    for t in TARGETS:
        c = check(t, results)
        source = f"`{t.summary}`" + (f"; {t.note}" if t.note else "")
        lines.append(f"| {t.claim} | {t.setting} | {c['first']} | {c['held_out'] or '-'} | **{c['status']}** "
                     f"| {source} |")
    return "\n".join(lines)


def update_readme(readme: Path, results: Path = RESULTS) -> str:
    """Replace the text between the standing markers of ``readme`` with the table; return the table."""
    text = table(results)
    replace_between(readme, BEGIN, END, text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the summaries (default: %(default)s)")
    p.add_argument("--readme", type=Path, help="also rewrite the table between this README's standing markers")
    args = p.parse_args()
    print(update_readme(args.readme, args.results) if args.readme else table(args.results))


if __name__ == "__main__":
    main()
