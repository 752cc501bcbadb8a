"""The quickstart's first warm-up layer's error before any training, to the last digit: how this machine rounds.

A trained run reproduces bit for bit only where the floats round the same way: the same code, the same thread
count and the same CPU kernels (an AVX2 and an AVX512 machine sum the same matrix products in different
orders, and the game carries a last-digit difference into other codes and another perplexity). This runs the
quickstart recipe (``configs/quickstart.yaml``) in this process's interpreter with one warm-up step a layer,
one game step and 512 evaluation tokens (about a minute on 2 cores), with an empty seed cache, and reads layer
0's error of the RTN student against the teacher on the recipe's own seed sequences, measured before the
warm-up trains that layer. Two machines, or two code trees, that give the same number round the same way up to
there; where it differs, their quickstart numbers will differ too, and both are valid runs. The seed set's
hash (``seed_data``, from trees that record it) tells whether the difference began in the teacher's sampling.

    python bench/first_layer.py                        # this checkout -> bench/results/quickstart/first_layer-<commit>.json
    git worktree add /tmp/wt_old b6debb0 && python bench/first_layer.py --tree /tmp/wt_old   # another commit's code
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=str(ROOT), help="the checkout whose zsaq_dist code runs (default: this one)")
    p.add_argument("--out", help="default: bench/results/quickstart/first_layer-<the tree's commit>.json")
    args = p.parse_args()

    import torch

    from zsaq_dist.io.demo import fetch_demo_model
    from zsaq_dist.job import machine_line

    tree = Path(args.tree).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                            check=True).stdout.strip()
    # the code that runs is the tree's, not its commit's, where the two differ
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "zsaq_dist"], cwd=tree).returncode != 0:
        commit += "-dirty"
    demo = fetch_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        run = [sys.executable, "-m", "zsaq_dist.cli", "quantize", "configs/quickstart.yaml", "--local",
               "--set", f"model.path={demo}", "--set", f"output.dir={out}", "--set", "method.block_warmup_steps=1",
               "--set", "method.steps=1", "--set", "eval.max_tokens=512"]
        env = {**os.environ, "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        proc = subprocess.run(run, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"first_layer: the run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        report = json.loads((out / "zsaq_report.json").read_text())
    layers = report["history"]["block_warmup"]["layers"]
    result = {
        "machine": machine_line("cpu"),
        "date": dt.date.today().isoformat(),
        "command": shlex.join(["python", "bench/first_layer.py", *sys.argv[1:]]),
        "tree_commit": commit,
        "run": shlex.join(["python", *run[1:]]),
        "report_machine": report["machine"],
        # older trees do not report it; the run then had torch's default here, as this process has
        "threads": report["machine"].get("threads") or torch.get_num_threads(),
        # repr: every digit of the float, which is the point
        "layer0_error_before": repr(layers[0]["loss_before"]),
        "layer1_error_before": repr(layers[1]["loss_before"]),
        # the seed set it was measured on (its tokens' hash: sampling rounds too); null from trees before the record
        "seed_data": report["history"].get("seed_data"),
    }
    dest = Path(args.out or ROOT / "bench" / "results" / "quickstart" / f"first_layer-{commit}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{commit}: layer 0 error before training {result['layer0_error_before']} ({result['machine']}) -> {dest}")


if __name__ == "__main__":
    main()
