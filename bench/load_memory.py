"""Per-worker memory of loading teacher + student: whole-model load vs sharded load (ZeRO-3, CPU, gloo).

    python bench/load_memory.py          # -> bench/results/load_memory.json + load_memory.png
    python bench/load_memory.py --workers 2 --modes sharded   # a subset
    python bench/load_memory.py --layers 120 --workers 4 --out bench/results/load_memory_deep.json

For each worker count and load mode, every Ray worker loads the teacher and
builds the student exactly as ``zsaq quantize`` does (``zsaq_dist.dist.load``
with ``dist.sharded_load`` true or false, student at ZeRO-3), then wraps both
in their DeepSpeed engines. Per rank it records:

- ``load_peak_anon_mb``: peak anonymous resident memory while loading (sampled every 5 ms): the
  memory a worker must own. RSS also counts the memory-mapped safetensors pages, which are
  page cache shared by the workers of a node and reclaimable;
- ``load_peak_rss_mb``: peak RSS (``ru_maxrss``) once teacher and student are built;
- ``rss_anon_loaded_mb``: anonymous resident memory at that point (what stays);
- ``ready_peak_rss_mb``: peak RSS once both engines exist (training would start here);
- ``rss_anon_mb`` / ``rss_file_mb``: anonymous and file-backed resident memory once the engines exist
  (file-backed pages are the memory-mapped safetensors, shared and reclaimable);
- ``resident_numel``: parameter elements held whole after the load (0 for a partitioned parameter);
- ``load_s``: seconds to load teacher and student.

The process baseline (Python, torch, DeepSpeed, Ray worker) is measured first
as ``baseline_rss_mb``. Model: the demo model when fetched, else a random model
of SmolLM2-135M's shape (``bench/scale.py``); ``--layers N`` (N != 30) takes a random
model of that shape with N layers, to see how each mode grows with the model: a
whole load holds a whole student per worker, a sharded one holds 1/N of teacher
and student plus about two of its largest module (the 113 MiB embedding here)
in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class AnonPeak:
    """Samples this process's anonymous resident memory every 5 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def load_loop(config: dict) -> None:
    """One Ray worker: load as ``zsaq quantize`` does, build the engines, write this rank's JSON."""
    import torch

    bench = config.pop("bench")
    baseline = _peak_mb()
    from zsaq_dist.config import validate
    from zsaq_dist.dist import load as dload
    from zsaq_dist.dist.engines import setup_comm, teacher_engine, world
    from zsaq_dist.dist.game import DistGame
    from zsaq_dist.minimax.trainer import Inputs

    cfg = validate(config)
    setup_comm(False)
    import deepspeed  # noqa: F401  (imported before the baseline is final)

    baseline = _peak_mb()
    baseline_anon = _status_mb("RssAnon")
    sampler = AnonPeak()
    t0 = time.perf_counter()
    teacher, _ = dload.load_teacher(cfg)
    student = dload.build_student(cfg, teacher)
    load_s = time.perf_counter() - t0
    anon_peak = sampler.stop()
    load_peak = _peak_mb()
    anon_loaded = _status_mb("RssAnon")
    resident = dload.resident_numel(teacher, student)
    t_engine = teacher_engine(teacher, cfg)
    emb = t_engine.module.get_input_embeddings().weight
    with dload.gathered([emb]):
        torch.manual_seed(0)
        inp = Inputs(t_engine.module, "noise", cfg.method, None)
    DistGame(t_engine, student, inp, cfg)
    rank, size = world()
    out = {
        "rank": rank,
        "workers": size,
        "mode": bench["mode"],
        "baseline_rss_mb": baseline,
        "baseline_anon_mb": baseline_anon,
        "load_peak_anon_mb": anon_peak,
        "load_peak_rss_mb": load_peak,
        "ready_peak_rss_mb": _peak_mb(),
        "rss_anon_mb": _status_mb("RssAnon"),
        "rss_file_mb": _status_mb("RssFile"),
        "resident_numel": resident,
        "rss_anon_loaded_mb": anon_loaded,
        "load_s": round(load_s, 2),
    }
    Path(bench["dir"], f"{bench['mode']}-w{size}-r{rank}.json").write_text(json.dumps(out))


def run_config(model: str, mode: str, workers: int, raw_dir: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = {
        "model": {"path": model},
        "quant": {"weights": {"bits": 4, "group_size": 64}},
        "method": {"name": "noise", "steps": 1, "batch_size": workers, "seq_len": 8},
        "dist": {"num_workers": workers, "zero_stage": 3, "sharded_load": mode == "sharded"},
        "output": {"dir": os.path.join(raw_dir, "unused")},
        "bench": {"mode": mode, "dir": raw_dir},
    }
    TorchTrainer(
        load_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"load-{mode}-w{workers}", storage_path=os.path.join(raw_dir, "ray")),
    ).fit()
    return [json.loads(f.read_text()) for f in sorted(Path(raw_dir).glob(f"{mode}-w{workers}-r*.json"))]


def summarize(rows: list[dict]) -> dict:
    """Per (mode, workers): the mean and the max over ranks of each measure."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(f"{r['mode']}-w{r['workers']}", []).append(r)
    table = {}
    for key, rs in by.items():
        measures = [k for k in rs[0] if k not in ("rank", "workers", "mode")]
        table[key] = {f"{k}_mean": statistics.mean(r[k] for r in rs) for k in measures}
        table[key].update({f"{k}_max": max(r[k] for r in rs) for k in measures})
    return table


def plot(table: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(table)
    x = range(len(names))
    fig = Figure(figsize=(max(8, 1.3 * len(names)), 4.2))
    ax = fig.subplots()
    ax.bar([i - 0.27 for i in x], [table[n]["load_peak_rss_mb_max"] for n in names], 0.27, label="peak RSS, load")
    ax.bar(list(x), [table[n]["load_peak_anon_mb_max"] for n in names], 0.27, label="peak anonymous, load")
    ax.bar([i + 0.27 for i in x], [table[n]["rss_anon_mb_max"] for n in names], 0.27, label="anonymous, engines built")
    ax.plot(list(x), [table[n]["baseline_anon_mb_max"] for n in names], "k_", ms=30, label="process baseline (anon)")
    ax.set_xticks(list(x), names)
    ax.set(ylabel="MiB, max over ranks", title="per-worker memory of loading teacher + student (ZeRO-3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["whole", "sharded"], choices=["whole", "sharded"])
    ap.add_argument("--layers", type=int, default=30, help="30: the demo model (if fetched); else a random one")
    ap.add_argument("--out", default=str(RESULTS / "load_memory.json"))
    args = ap.parse_args()
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import model_path, smollm2_shape_model, write_result

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="zsaq-load-") as tmp:
        if args.layers == 30:
            model, what = model_path(tmp)
        else:
            model, what = os.path.join(tmp, "deep"), f"random model with SmolLM2-135M's config and {args.layers} layers"
            smollm2_shape_model(args.layers).save_pretrained(model)
        ray.init(address="local", num_cpus=max(args.workers) + 1, include_dashboard=False)
        rows = []
        try:
            for w in args.workers:
                for mode in args.modes:
                    t0 = time.time()
                    rows += run_config(model, mode, w, tmp)
                    print(f"{mode} w{w}: {time.time() - t0:.0f} s", flush=True)
        finally:
            ray.shutdown()
    table = summarize(rows)
    out = write_result(args, "bench/load_memory.py", what, rows, {"per_config": table})
    plot(table, out.with_suffix(".png"))
    for k, v in table.items():
        keys = ("load_peak_anon_mb_max", "load_peak_rss_mb_max", "rss_anon_mb_max", "resident_numel_max", "load_s_max")
        print(k, {m: v[m] for m in keys})


if __name__ == "__main__":
    main()
