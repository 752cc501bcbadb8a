"""Per-worker memory and step time of the distributed student step, ZeRO 0/2/3 x 1/2 workers (CPU, gloo).

    python bench/scale.py                       # -> bench/results/scale.json + scale.png

Model: the demo model (SmolLM2-135M-Instruct) when ``zsaq_dist.io.demo`` has
fetched it, else a random model of the same config shape (same memory and
FLOPs). Inputs are the ``noise`` method's random embeddings, so the numbers are
the student step alone (teacher forward + SAM or plain AdamW step).

Per worker it records the bytes of model and optimizer state it holds (student
parameters as held, fp32 master copies, AdamW moments, the teacher's ZeRO-3
partition), the peak RSS, and the median time of a SAM step (rho > 0) and of a
plain step (rho = 0). Targets: at 2 workers ZeRO-3 state <= 0.6x ZeRO-0's, and
SAM step <= 2.3x plain step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def smollm2_shape_model():
    """A random LlamaForCausalLM with SmolLM2-135M's config (134.5M parameters, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
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
    base = eng.optimizer.optimizer if stage else eng.optimizer  # the client AdamW inside ZeRO's wrapper
    # fp32 master partitions (stage 0 steps the model's own parameters, counted above)
    masters = {0: [], 3: getattr(eng.optimizer, "fp32_partitioned_groups_flat", [])}.get(
        stage, getattr(eng.optimizer, "single_partition_of_fp32_groups", [])
    )
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
    student = make_student(freeze(teacher), cfg.quant, cfg.method.learnable_scales)
    game = DistGame(teacher, student, Inputs(teacher, "noise", cfg.method, None), cfg)
    n = bench["steps"]
    sam = _timed_steps(game, 0, n + 1)[1:]  # the first step pays for lazy allocations
    game.m = cfg.method.model_copy(update={"rho": 0.0})
    plain = _timed_steps(game, n + 1, n + 1)[1:]
    rank, size = world()
    out = {
        "rank": rank,
        "workers": size,
        "zero_stage": cfg.dist.zero_stage,
        **state_bytes(game),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sam_step_s": statistics.median(sam),
        "plain_step_s": statistics.median(plain),
    }
    Path(bench["dir"], f"z{cfg.dist.zero_stage}-w{size}-r{rank}.json").write_text(json.dumps(out))


def run_config(model: str, stage: int, workers: int, args, raw_dir: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = {
        "model": {"path": model},
        "quant": {"weights": {"bits": 4, "group_size": 64}},
        "method": {"name": "noise", "steps": 100, "batch_size": args.batch, "seq_len": args.seq_len, "rho": 0.05},
        "dist": {"num_workers": workers, "zero_stage": stage},
        "output": {"dir": os.path.join(raw_dir, "unused")},
        "bench": {"steps": args.steps, "dir": raw_dir},
    }
    TorchTrainer(
        bench_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"scale-z{stage}-w{workers}", storage_path=os.path.join(raw_dir, "ray")),
    ).fit()
    files = sorted(Path(raw_dir).glob(f"z{stage}-w{workers}-r*.json"))
    return [json.loads(f.read_text()) for f in files]


def summarize(rows: list[dict]) -> dict:
    """Per-config means over ranks, and the two target ratios."""
    by = {}
    for r in rows:
        by.setdefault((r["zero_stage"], r["workers"]), []).append(r)
    table = {}
    for (stage, w), rs in sorted(by.items()):
        mean = {k: statistics.mean(r[k] for r in rs) for k in rs[0] if k not in ("rank", "workers", "zero_stage")}
        mean["state_total"] = mean["student_params"] + mean["optimizer"] + mean["teacher_partition"]
        mean["sam_over_plain"] = mean["sam_step_s"] / mean["plain_step_s"]
        table[f"zero{stage}-w{w}"] = mean
    out = {"per_config": table}
    z0, z3 = table.get("zero0-w2"), table.get("zero3-w2")
    if z0 and z3:
        out["zero3_over_zero0_state_w2"] = z3["state_total"] / z0["state_total"]
        out["zero3_over_zero0_student_state_w2"] = (z3["student_params"] + z3["optimizer"]) / (
            z0["student_params"] + z0["optimizer"]
        )
    out["max_sam_over_plain"] = max(v["sam_over_plain"] for v in table.values())
    return out


def plot(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    t = summary["per_config"]
    names = list(t)
    mb = 1 << 20
    fig = Figure(figsize=(11, 4))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each kind (after one warm-up)")
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
            for stage in args.stages:
                for w in args.workers:
                    t0 = time.time()
                    rows += run_config(model, stage, w, args, tmp)
                    print(f"zero{stage} w{w}: {time.time() - t0:.0f} s", flush=True)
        finally:
            ray.shutdown()
    summary = summarize(rows)
    result = {"model": what, "device": "cpu (gloo)", "cpus": os.cpu_count(), "args": vars(args), "rows": rows}
    result.update(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_config"}, indent=2))


if __name__ == "__main__":
    main()
