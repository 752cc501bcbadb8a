"""Score the checkpoints of finished ``bench/quality.py`` runs again, on more of the development text.

    python bench/reeval.py --eval-tokens 12288 --results bench/results/reeval-w4 --jobs 2 \\
        --runs bench/results/pool-w4/quality_cpu-40steps-block-w4g64-asym-pool128-*seed?.json

A run's quantized rows were scored on its first ``eval_tokens`` tokens (4096 on the CPU). Whether a gap of
a few tenths of perplexity between two rows is a property of the students or of those tokens is a question
for more text. ``bench/quality.py`` leaves each row's checkpoint in ``bench/.work/<tag><setting>-<row>``;
this script checks that the checkpoint is the run's (its ``zsaq_report.json`` config must have the run's
seed, seed pool, steps, method and weight scheme: a later run with the same tag would have replaced it) and
evaluates it with ``zsaq eval --reference TEACHER`` on the first ``--eval-tokens`` tokens (the teacher too,
for the FP perplexity). Each evaluation's log is kept in ``bench/.work/reeval/``; a killed run started again
reuses the evaluations it finished.

The evaluation windows are non-overlapping, so the first ``eval_tokens`` tokens of the longer evaluation are
the run's own windows, and its metrics are token-weighted means. That makes the tokens after them a second,
held-out text whose metrics follow exactly from the two evaluations' sums:

    nll_new = (nll_N * tokens_N - nll_n * tokens_n) / (tokens_N - tokens_n)     (kl and top1 alike)

For each run two quality-style files are written to ``--results``, with the run's rows (their training
fields kept) and ``seed`` (the run's ``method.seed``, for ``bench/seeds.py``):

- ``<name>_eval<N>.json``: ppl, Δppl, kl and top-1 on the first N tokens;
- ``<name>_after<n>-<N>.json``: the same on tokens n..N only, the text the run was not scored on.

Every trained row here used zero real data; the text is read for evaluation only.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.util
import json
import math
import os
import re
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from seeds import seed_of  # noqa: E402


def _quality():
    """``bench/quality.py`` as a module: its rows, settings, work folder and evaluation call."""
    spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).with_name("quality.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Q = _quality()


def checkpoint_dir(result: dict, row: dict) -> Path:
    """Where ``bench/quality.py`` left ``row``'s checkpoint: ``WORK / (tag + row_name(...))``, as its ``run_row``."""
    tag = re.search(r"--tag[ =](\S+)", result["command"])
    tag = shlex.split(tag.group(1))[0] if tag else ""
    return Q.WORK / (tag + Q.row_name(row["setting"], row["method"]))


def _expected_overrides(result: dict, row: dict) -> dict[str, str]:
    """The row's own ``method.*`` / ``quant.*`` overrides (``key=value``) that are plain values, with the
    budget's substitutions: what its checkpoint's config must show."""
    overrides = Q.row_overrides(row["method"], result["budget"]["steps"], result.get("block_steps", 64))
    out = {}
    for o in Q.SETTINGS[row["setting"]] + overrides:
        key, _, val = o.partition("=")
        if "{" not in val and key != "method.init_from":  # a mapping, or a path the run resolved
            out[key] = val
    return out


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _same(value, text: str) -> bool:
    if isinstance(value, bool):
        return str(value).lower() == text.lower()
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value) == text


def check_checkpoint(path: Path, result: dict, row: dict) -> None:
    """Raise ``SystemExit`` naming the mismatch unless ``path`` holds ``row``'s checkpoint from ``result``'s run."""
    report_file = path / "zsaq_report.json"
    if not report_file.is_file():
        raise SystemExit(f"{path}: no zsaq_report.json; run the row again with bench/quality.py ({result['command']})")
    cfg = json.loads(report_file.read_text())["config"]
    budget = result["budget"]
    want = {
        "method.seed": str(seed_of(result["command"])),
        "method.seed_data.num_sequences": str(budget["num_sequences"]),
        "method.batch_size": str(budget["batch_size"]),
        "method.seq_len": str(budget["seq_len"]),
    }
    own = _expected_overrides(result, row)
    want.update({"method.steps": str(budget["steps"])} | own)  # the row's own steps win (the warm-up alone: 0)
    for key, val in want.items():
        have = _get(cfg, key)
        if not _same(have, val):
            raise SystemExit(
                f"{path} is not the checkpoint of {row['method']} in `{result['command']}`: its config "
                f"has {key}={have!r}, the run {val}. Run that row again with bench/quality.py"
            )


def held_out(long: dict, short: dict) -> dict:
    """Metrics on the tokens ``long`` scored past ``short``'s (both token-weighted means over aligned windows)."""
    n_long, n_short = long["tokens"], short["tokens"]
    if n_long <= n_short:
        raise SystemExit(f"--eval-tokens must exceed the run's own ({n_short} predictions scored already)")
    out = {"tokens": n_long - n_short}
    nll = (long["nll"] * n_long - short["nll"] * n_short) / out["tokens"]
    out["ppl"], out["nll"] = math.exp(nll), nll
    for k in ("kl", "top1"):
        if k in long:
            out[k] = (long[k] * n_long - short[k] * n_short) / out["tokens"]
    return out


def cached(log: Path, model: str, written: Path, seq_len: int) -> dict | None:
    """The evaluation of ``model`` in windows of ``seq_len`` that ``log`` holds, if it finished after ``written``
    was (a killed run then resumes with the evaluations it finished; a checkpoint written again since is scored
    again)."""
    if not log.is_file() or log.stat().st_mtime < written.stat().st_mtime:
        return None
    _, sep, out = log.read_text().rpartition("\n--- stdout ---\n")
    try:
        ev = json.loads(out[out.index("{") :]) if sep else None
    except ValueError:
        return None
    return ev if ev and ev.get("model") == model and ev.get("seq_len") == seq_len and "tokens" in ev else None


def predictions(tokens: int, seq_len: int) -> int:
    """How many predictions ``zsaq eval`` makes on ``tokens`` tokens in windows of ``seq_len`` (see
    ``zsaq_dist.eval.metrics.windows``)."""
    full, rest = divmod(tokens, seq_len)
    return full * (seq_len - 1) + (rest - 1 if rest >= 2 else 0)


def source_record(path: Path, res: dict) -> dict:
    """What a re-scored file says of the run it scored: its file, command, date and the machine that trained it
    (the file's own ``machine`` is the one that scored it; ``bench/seeds.py`` reads this one)."""
    return {"file": str(path), "command": res["command"], "date": res["date"], "machine": res["machine"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="bench/quality.py result files")
    p.add_argument("--eval-tokens", type=int, required=True, help="score the first N tokens (more than the runs')")
    p.add_argument("--results", required=True, help="folder of the files written")
    p.add_argument("--jobs", type=int, default=1, help="evaluations side by side, one thread each when > 1")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()

    runs = [(Path(r), json.loads(Path(r).read_text())) for r in args.runs]
    seq_lens = {res["budget"]["eval_seq_len"] for _, res in runs}
    shas = {res["eval_text"]["tokens_sha256"] for _, res in runs}
    if len(seq_lens) > 1 or len(shas) > 1:
        raise SystemExit(
            f"the runs scored different windows or tokens (eval_seq_len {seq_lens}, "
            f"{len(shas)} token hashes): pass runs of one evaluation budget"
        )
    ev_args = argparse.Namespace(eval_seq_len=seq_lens.pop(), eval_tokens=args.eval_tokens, device=args.device)
    jobs = []
    for path, res in runs:
        if res["budget"]["eval_tokens"] >= args.eval_tokens:
            raise SystemExit(
                f"{path} was scored on {res['budget']['eval_tokens']} tokens already: give --eval-tokens more than that"
            )
        for row in res["rows"]:
            if row["method"] != "fp":
                ckpt = checkpoint_dir(res, row)
                check_checkpoint(ckpt, res, row)
                jobs.append((path, row["setting"], row["method"], ckpt))

    from zsaq_dist.io.demo import fetch_demo_model
    from zsaq_dist.job import machine_line

    teacher = str(fetch_demo_model())
    logs = Q.WORK / "reeval"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"teacher (FP) on {args.eval_tokens} tokens ...", flush=True)
    log = logs / f"fp-{args.eval_tokens}.log"
    fp = cached(log, teacher, Path(teacher) / "config.json", ev_args.eval_seq_len) or Q._eval(
        teacher, teacher, ev_args, log
    )
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # each evaluation subprocess: one torch thread, side by side

    def score(job: tuple) -> tuple:
        path, setting, method, ckpt = job
        log = logs / f"{ckpt.name}-{args.eval_tokens}.log"
        ev = cached(log, str(ckpt), ckpt / "zsaq_report.json", ev_args.eval_seq_len) or Q._eval(
            str(ckpt), teacher, ev_args, log
        )
        print(f"{path.name} [{setting}] {method}: ppl {ev['ppl']:.3f} on {ev['tokens']} predictions", flush=True)
        return job, ev

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        scored = {(j[0], j[1], j[2]): ev for j, ev in pool.map(score, jobs)}

    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/reeval.py", *sys.argv[1:]])
    for path, res in runs:
        n = predictions(res["budget"]["eval_tokens"], res["budget"]["eval_seq_len"])
        fp_short = {"tokens": n, "nll": math.log(next(r["ppl"] for r in res["rows"] if r["method"] == "fp"))}
        fp_after = held_out(fp, fp_short)
        parts = {f"eval{args.eval_tokens}": [], f"after{res['budget']['eval_tokens']}-{args.eval_tokens}": []}
        for row in res["rows"]:
            full = fp if row["method"] == "fp" else scored[(path, row["setting"], row["method"])]
            short = {"tokens": n, "nll": math.log(row["ppl"]), "kl": row["kl"], "top1": row["top1"]}
            after = fp_after if row["method"] == "fp" else held_out(full, short)
            for (_part, rows), ev, fp_ev in zip(parts.items(), (full, after), (fp, fp_after), strict=True):
                new = copy.deepcopy(row)
                new["ppl"], new["dppl"] = ev["ppl"], ev["ppl"] - fp_ev["ppl"]
                if row["method"] != "fp":
                    new["kl"], new["top1"] = ev["kl"], ev["top1"]
                rows.append(new)
        for part, rows in parts.items():
            lo, _, hi = part.removeprefix("after").removeprefix("eval").rpartition("-")
            out = {
                "machine": machine_line(args.device),
                "date": dt.date.today().isoformat(),
                "command": command,
                "seed": seed_of(res["command"]),
                "source": source_record(path, res),
                "teacher": res["teacher"],
                "budget": {**res["budget"], "eval_tokens": int(hi), **({"eval_from_token": int(lo)} if lo else {})},
                "eval_text": {
                    "text": fp["text"],
                    "tokens_sha256": fp["tokens_sha256"],
                    **({"scored": f"tokens {lo}..{hi}, after the {lo} the run was scored on"} if lo else {}),
                },
                **({"block_steps": res["block_steps"]} if "block_steps" in res else {}),
                "rows": rows,
                "failed": [],
            }
            name = path.stem + f"_{part}.json"
            (out_dir / name).write_text(json.dumps(out, indent=2) + "\n")
            print(f"wrote {out_dir / name}", flush=True)


if __name__ == "__main__":
    main()
