"""Per-worker memory and step time of the distributed student step, ZeRO 0/2/3 x 1/2 workers (CPU, gloo).

    python bench/scale.py                       # -> bench/results/scale.json + scale.png
    python bench/scale.py --dtypes bfloat16 --stages 0 3 --workers 2   # a subset
    python bench/scale.py --dtypes float32 --stages 0 3 --workers 2 --recompute --out bench/results/scale_recompute.json

Model: the demo model (SmolLM2-135M-Instruct) when ``zsaq_dist.io.demo`` has
fetched it, else a random model of the same config shape (same memory and
FLOPs). Inputs are the ``noise`` method's random embeddings, so the numbers are
the student step alone (teacher forward + SAM or plain AdamW step).

Per worker it records the bytes of model and optimizer state it holds (student
parameters as held, fp32 master copies, AdamW moments, the teacher's ZeRO-3
partition), the peak RSS, and the median time of a SAM step (rho > 0) and of a
plain step (rho = 0), after two warm-up steps of each kind (the first steps pay
for lazy allocations and run 2-3x slower). Every config runs in fp32 and in bf16
mixed precision (bf16 parameters, fp32 master copies and moments: how DeepSpeed
is run on GPUs). In fp32, ZeRO 1-2 keep an fp32 master partition *besides* the
fp32 parameters, which ZeRO-0 does not need; ZeRO-3 would too (a DeepSpeed
device-comparison bug defeats its own same-dtype sharing) but
``share_fp32_masters`` lets it update the partitions in place, so its fp32
state tends to 1/2 of ZeRO-0's, as bf16's does. Targets: at
2 workers ZeRO-3 state <= 0.6x ZeRO-0's, and SAM step <= 2.3x plain step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE_TAG = {"float32": "fp32", "bfloat16": "bf16"}


def smollm2_shape_model(layers: int = 30):
    """A random LlamaForCausalLM with SmolLM2-135M's config (134.5M parameters at 30 layers, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def model_path(tmp: str) -> tuple[str, str]:
    """(path, what it is): the fetched demo model, else a saved random model of its shape."""
    from zsaq_dist.io.demo import demo_dir, is_complete

    d = demo_dir()
    if is_complete(d):
        return str(d), "SmolLM2-135M-Instruct (demo)"
    path = os.path.join(tmp, "smollm2-shape")
    smollm2_shape_model().save_pretrained(path)
    return path, "random model with SmolLM2-135M's config (demo not fetched)"


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def state_bytes(game) -> dict[str, int]:
    """Bytes of state this rank holds: student params, optimizer (fp32 masters + moments), teacher partition."""
    eng = game.student
    stage = eng.zero_optimization_stage()
    params = [p.ds_tensor if stage == 3 else p.data for p in eng.module.parameters()]
    base = getattr(eng.optimizer, "optimizer", eng.optimizer)  # the client AdamW inside DeepSpeed's wrapper
    # fp32 master copies: none for fp32 stage 0 (AdamW steps the model's own parameters, counted above),
    # the (unfused) FP16_Optimizer's fp32 groups for bf16 stage 0, the partitions for stages 1-3
    if stage == 0:
        masters = [t for g in getattr(eng.optimizer, "fp32_groups", []) for t in g]
    elif stage == 3:
        masters = eng.optimizer.fp32_partitioned_groups_flat
    else:
        masters = eng.optimizer.single_partition_of_fp32_groups
    # a master that shares its partition's storage (fp32 ZeRO-3, zsaq_dist.dist.engines.share_fp32_masters) is
    # counted once, with the parameters
    held = {t.untyped_storage().data_ptr() for t in params}
    masters = [t for t in masters if t.untyped_storage().data_ptr() not in held]
    moments = [t for s in base.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    teacher = [p.ds_tensor for p in game.teacher.module.parameters()]
    return {
        "student_params": _bytes(params),
        "optimizer": _bytes(masters) + _bytes(moments),
        "teacher_partition": _bytes(teacher),
    }


def _timed_steps(game, first: int, n: int) -> list[float]:
    times = []
    for step in range(first, first + n):
        t0 = time.perf_counter()
        game.step(step)
        times.append(time.perf_counter() - t0)
    return times


def bench_loop(config: dict) -> None:
    """One Ray worker: build the engines, time SAM then plain steps, write this rank's JSON."""
    from zsaq_dist import job
    from zsaq_dist.config import validate
    from zsaq_dist.dist.engines import setup_comm, world
    from zsaq_dist.dist.game import DistGame
    from zsaq_dist.minimax.student import freeze, make_student
    from zsaq_dist.minimax.trainer import Inputs

    bench = config.pop("bench")
    cfg = validate(config)
    setup_comm(False)
    teacher, _ = job.load_teacher(cfg, torch.device("cpu"))
    student = make_student(freeze(teacher), cfg.quant, cfg.method.learnable_scales, cfg.method.recompute_fake_quant)
    game = DistGame(teacher, student, Inputs(teacher, "noise", cfg.method, None), cfg)
    n, w = bench["steps"], bench["warmup"]
    sam = _timed_steps(game, 0, w + n)[w:]  # the first steps pay for lazy allocations
    metrics, _, _ = game.step(w + n)
    if not metrics.get("grad_norm", 0.0) > 0.0 or metrics["sam_loss"] == metrics["loss"]:
        raise RuntimeError(f"SAM did not perturb the student ({metrics}): the timing would be of a plain step")
    game.m = cfg.method.model_copy(update={"rho": 0.0})
    plain = _timed_steps(game, w + n + 1, w + n)[w:]
    rank, size = world()
    out = {
        "rank": rank,
        "workers": size,
        "zero_stage": cfg.dist.zero_stage,
        "dtype": cfg.model.dtype,
        **state_bytes(game),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sam_step_s": statistics.median(sam),
        "plain_step_s": statistics.median(plain),
    }
    Path(bench["dir"], f"{cfg.model.dtype}-z{cfg.dist.zero_stage}-w{size}-r{rank}.json").write_text(json.dumps(out))


def run_config(model: str, dtype: str, stage: int, workers: int, args, raw_dir: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = {
        "model": {"path": model, "dtype": dtype},
        "quant": {"weights": {"bits": 4, "group_size": 64}},
        "method": {
            "name": "noise",
            "steps": 100,
            "batch_size": args.batch,
            "seq_len": args.seq_len,
            "rho": 0.05,
            "recompute_fake_quant": args.recompute,
        },
        "dist": {"num_workers": workers, "zero_stage": stage},
        "output": {"dir": os.path.join(raw_dir, "unused")},
        "bench": {"steps": args.steps, "warmup": args.warmup, "dir": raw_dir},
    }
    TorchTrainer(
        bench_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"scale-{dtype}-z{stage}-w{workers}", storage_path=os.path.join(raw_dir, "ray")),
    ).fit()
    files = sorted(Path(raw_dir).glob(f"{dtype}-z{stage}-w{workers}-r*.json"))
    return [json.loads(f.read_text()) for f in files]


def summarize(rows: list[dict]) -> dict:
    """Per-config means over ranks, and the two target ratios per dtype."""
    by = {}
    for r in rows:
        by.setdefault((r.get("dtype", "float32"), r["zero_stage"], r["workers"]), []).append(r)
    table = {}
    for (dtype, stage, w), rs in sorted(by.items()):
        keys = [k for k in rs[0] if k not in ("rank", "workers", "zero_stage", "dtype")]
        mean = {k: statistics.mean(r[k] for r in rs) for k in keys}
        mean["state_total"] = mean["student_params"] + mean["optimizer"] + mean["teacher_partition"]
        mean["sam_over_plain"] = mean["sam_step_s"] / mean["plain_step_s"]
        table[f"{DTYPE_TAG[dtype]}-zero{stage}-w{w}"] = mean
    out: dict = {"per_config": table, "targets": {}}
    for dtype in sorted({d for d, _, _ in by}):
        tag = DTYPE_TAG[dtype]
        t: dict = {}
        z0, z3 = table.get(f"{tag}-zero0-w2"), table.get(f"{tag}-zero3-w2")
        if z0 and z3:
            t["zero3_over_zero0_state_w2"] = z3["state_total"] / z0["state_total"]
            t["zero3_over_zero0_student_state_w2"] = (z3["student_params"] + z3["optimizer"]) / (
                z0["student_params"] + z0["optimizer"]
            )
        t["max_sam_over_plain"] = max(v["sam_over_plain"] for k, v in table.items() if k.startswith(tag + "-"))
        out["targets"][dtype] = t
    return out


def plot(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    t = summary["per_config"]
    names = list(t)
    mb = 1 << 20
    fig = Figure(figsize=(max(11, 1.1 * len(names)), 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    bottom = [0.0] * len(names)
    for key in ("student_params", "optimizer", "teacher_partition"):
        vals = [t[n][key] / mb for n in names]
        ax1.bar(names, vals, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax1.plot(names, [t[n]["peak_rss"] / mb for n in names], "k^", label="peak RSS")
    ax1.set(ylabel="MiB per worker", title="state held per worker")
    ax1.legend(fontsize=8)
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], [t[n]["plain_step_s"] for n in names], 0.4, label="plain AdamW step")
    ax2.bar([i + 0.2 for i in x], [t[n]["sam_step_s"] for n in names], 0.4, label="SAM step")
    ax2.set_xticks(list(x), names)
    ax2.set(ylabel="seconds (median)", title="student step time")
    ax2.legend(fontsize=8)
    for a in (ax1, ax2):
        a.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_result(args: argparse.Namespace, script: str, model: str, rows: list[dict], extra: dict) -> Path:
    """Write ``args.out``: provenance (model, machine, date, command, args), the per-rank rows and ``extra``."""
    result = {
        "model": model,
        "device": "cpu (gloo)",
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": shlex.join(["python", script, *sys.argv[1:]]),
        "args": vars(args),
        "rows": rows,
        **extra,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPE_TAG))
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each kind (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind before them")
    ap.add_argument("--recompute", action="store_true", help="method.recompute_fake_quant: true")
    ap.add_argument("--batch", type=int, default=2, help="global batch")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = ap.parse_args()
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="zsaq-scale-") as tmp:
        model, what = model_path(tmp)
        ray.init(address="local", num_cpus=max(args.workers) + 1, include_dashboard=False)
        rows = []
        try:
            for dtype in args.dtypes:
                for stage in args.stages:
                    for w in args.workers:
                        t0 = time.time()
                        rows += run_config(model, dtype, stage, w, args, tmp)
                        print(f"{dtype} zero{stage} w{w}: {time.time() - t0:.0f} s", flush=True)
        finally:
            ray.shutdown()
    summary = summarize(rows)
    out = write_result(args, "bench/scale.py", what, rows, summary)
    plot(summary, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_config"}, indent=2))


if __name__ == "__main__":
    main()
