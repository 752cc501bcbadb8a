"""The block warm-up on Ray workers: its seconds at 1 and more workers, and that they all give one result.

    python bench/warmup_scale.py          # -> bench/results/warmup_scale.json + warmup_scale.png
    python bench/warmup_scale.py --workers 1 2 --stage 0
    python bench/warmup_scale.py --workers 1 2 4 --gpu --out bench/results/warmup_scale_gpu.json   # on GPUs
    python bench/warmup_scale.py --table bench/results/warmup_scale.json   # its Markdown table again

Each worker count runs ``zsaq quantize configs/bench-quality.yaml`` with the warm-up alone (``method.steps=0``,
its default 64 steps a layer at lr 3e-4) on the demo model, W4 g64 (asymmetric by default), the benchmark's
32 zero-shot seed sequences of 64 tokens in minibatches of 4, ``dist.launcher=ray`` with that many workers at
ZeRO stage ``--stage``, one thread each (``OMP_NUM_THREADS=1``). Since 2026-11-24 the warm-up is
data-parallel (``zsaq_dist.minimax.blockwise.Part``): each rank runs its share of every minibatch and the
ranks sum their errors and gradients; before, every rank ran all of it. It records the warm-up's seconds
(``block_warmup.total_seconds`` in ``zsaq_report.json``), the whole command's (Ray's start, the load and
the export included), each layer's error after its
warm-up, and how many exported tensors differ from the 1-worker checkpoint (and by how much at most).

Then the noise floor those differences are read against, in one process (``noise_floor``): layer 0's
warm-up on the same minibatches twice, the second time with the teacher's targets multiplied by
``1 + 1e-7 * N(0, 1)``, a perturbation the size of float32 rounding (which summing over ranks in
another order also is). Adam divides each gradient by its own running size, so a rounding-level change
of a near-zero gradient moves a weight by up to the full lr, and a weight on a rounding edge (the demo
teacher, dequantized from Q4_1, has tens of thousands) flips its code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import _probe  # bench/_probe.py, beside this script


def _run(workers: int, stage: int, symmetric: bool, gpu: bool, out: Path) -> dict:
    from zsaq_dist.io.demo import fetch_demo_model

    sets = {
        "model.path": str(fetch_demo_model(quiet=True)),
        "quant.weights.bits": "4",
        "quant.weights.group_size": "64",
        "quant.weights.symmetric": str(symmetric).lower(),
        "method.steps": "0",
        "method.seed_data.num_sequences": "32",
        "dist.launcher": "ray",
        "dist.num_workers": str(workers),
        "dist.zero_stage": str(stage),
        "dist.use_gpu": str(gpu).lower(),
        "output.dir": str(out),
    }
    cmd = ["zsaq", "quantize", str(_probe.ROOT / "configs" / "bench-quality.yaml")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=_probe.ROOT)
    wall = time.perf_counter() - t0
    report = json.loads((out / "zsaq_report.json").read_text())
    warm = report["history"]["block_warmup"]
    return {
        "workers": workers,
        "warmup_workers": warm.get("workers", 1),
        "warmup_seconds": round(warm["total_seconds"], 1),
        "run_seconds": round(wall, 1),
        "loss_after": [r.get("loss_after") for r in warm["layers"]],
        "kept": sum(bool(r.get("kept")) for r in warm["layers"]),
    }


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _diff(a: dict, b: dict) -> dict:
    """How many tensors of ``b`` differ from ``a`` (same names) and the largest difference of a float one."""
    differ, worst = 0, 0.0
    for k, v in a.items():
        w = b[k]
        if not (v.shape == w.shape and bool((v == w).all())):
            differ += 1
            if v.is_floating_point():
                worst = max(worst, float((v.float() - w.float()).abs().max()))
    return {"tensors": len(a), "differ": differ, "max_float_diff": worst}


def noise_floor(symmetric: bool) -> dict:
    """Layer 0's warm-up in one process, exact and with the targets perturbed at rounding level (docstring)."""
    import copy

    import torch

    from zsaq_dist.job import build_student, load_teacher
    from zsaq_dist.minimax.blockwise import decoder_layers, layer_targets, seed_batches, warm_layer
    from zsaq_dist.minimax.student import freeze
    from zsaq_dist.minimax.trainer import load_seed_ids

    torch.manual_seed(0)
    cfg = _probe.demo_config(symmetric, ["method.seed_data.num_sequences=32"])
    m = cfg.method
    teacher, tok = load_teacher(cfg, torch.device("cpu"))
    teacher = freeze(teacher)
    student = build_student(teacher, cfg)
    ids = load_seed_ids(teacher, None, tok, m)
    _, t_layers = decoder_layers(teacher)
    _, s_layers = decoder_layers(student)
    batches = seed_batches(teacher, t_layers, ids, m.batch_size)
    targets = layer_targets(t_layers[0], batches)
    runs = []
    for eps in (0.0, 1e-7):
        layer = copy.deepcopy(s_layers[0])
        tgt = [t * (1 + eps * torch.randn_like(t)) for t in targets] if eps else targets
        runs.append((warm_layer(layer, batches, tgt, m, m.learnable_scales), layer))
    (exact, a), (perturbed, b) = runs
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    return {
        "layer": 0,
        "target_perturbation": 1e-7,
        "loss_after_exact": exact["loss_after"],
        "loss_after_perturbed": perturbed["loss_after"],
        "rel_loss_diff": abs(perturbed["loss_after"] - exact["loss_after"]) / exact["loss_after"],
        "max_weight_diff": moved,
    }


def measure(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="zsaq-warmup-scale-") as tmp:
        first = None  # (row, tensors) of the first worker count: what the others are compared with
        for w in args.workers:
            row = _run(w, args.stage, args.symmetric, args.gpu, Path(tmp) / f"w{w}")
            tensors = _tensors(Path(tmp) / f"w{w}")
            first = first or (row, tensors)
            row["vs_workers"] = first[0]["workers"]
            row |= _diff(first[1], tensors)
            base = first[0]["loss_after"]
            row["max_rel_loss_diff"] = max(abs(a - b) / b for a, b in zip(row["loss_after"], base, strict=True))
            rows.append(row)
            print(f"{w} workers: warm-up {row['warmup_seconds']} s", flush=True)
    first = rows[0]["warmup_seconds"]
    for r in rows:
        r["speedup"] = round(first / r["warmup_seconds"], 2)
    return {"stage": args.stage, "rows": rows, "noise_floor": noise_floor(args.symmetric)}


def table(result: dict) -> str:
    lines = [
        f"ZeRO stage {result['stage']}, {result['setting']}; {result['machine']}, {result['date']}",
        "",
        "| workers | warm-up s | speedup | whole command s | layer errors vs first row (max rel.) | tensors differing |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['workers']} | {r['warmup_seconds']} | {r['speedup']}x | {r['run_seconds']} | "
            f"{r['max_rel_loss_diff']:.1e} | {r['differ']} of {r['tensors']} (max {r['max_float_diff']:.1e}) |"
        )
    nf = result["noise_floor"]
    lines += [
        "",
        f"Noise floor, one process: layer {nf['layer']}'s warm-up with its targets perturbed by "
        f"{nf['target_perturbation']:.0e} (relative): error after {nf['loss_after_exact']:.6f} -> "
        f"{nf['loss_after_perturbed']:.6f} ({nf['rel_loss_diff']:.1e} relative), weights moved by up to "
        f"{nf['max_weight_diff']:.1e}.",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(r["workers"]) for r in rows], [r["warmup_seconds"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i, r["warmup_seconds"], f"{r['speedup']}x", ha="center", va="bottom")
    ax.set_xlabel("Ray workers" + ("" if result["args"].get("gpu") else " (1 thread each)"))
    ax.set_ylabel("block warm-up, seconds")
    ax.set_title(f"Block warm-up, demo model, ZeRO-{result['stage']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument(
        "--gpu", action="store_true", help="one GPU per worker, nccl (dist.use_gpu); the noise floor stays on CPU"
    )
    _probe.main(p, "warmup_scale", measure, table, plot)
