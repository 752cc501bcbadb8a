"""``train_loop(config)``: what every Ray Train worker runs (Ray's DeepSpeed fine-tuning layout).

Load the teacher partitioned and build the student (RTN; partitioned at ZeRO-3,
:mod:`zsaq_dist.dist.load`), wrap the teacher in its ZeRO-3 engine, make the
seed sequences (all ranks together) and the generator, wrap the student,
resume from ``ray.train.get_checkpoint()``, run the SAM-SGA steps with a
checkpoint every ``dist.checkpoint_every``, then export in parallel. Rank 0
logs and writes the report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from zsaq_dist import job
from zsaq_dist.config import Config, validate
from zsaq_dist.data.seed import seed_identity
from zsaq_dist.dist import checkpoint
from zsaq_dist.dist import load as dload
from zsaq_dist.dist import sam as dsam
from zsaq_dist.dist.engines import all_gather, broadcast, setup_comm, teacher_engine, world
from zsaq_dist.dist.export import export_parallel
from zsaq_dist.dist.game import DistGame
from zsaq_dist.minimax.blockwise import Part, block_warmup
from zsaq_dist.minimax.trainer import Inputs, new_history, record_step, load_seed_ids, resolve_mode

log = logging.getLogger("zsaq.dist")
FAIL_MARKER = "fault_injected"
KILL_DELAY_S = 5.0


def _maybe_fail(cfg: Config, step: int) -> None:
    """Fault injection for tests: the last rank exits hard at ``dist.fail_at_step``, once per storage path."""
    rank, n = world()
    if cfg.dist.fail_at_step != step or rank != n - 1:
        return
    marker = Path(cfg.dist.storage_path or ".") / FAIL_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker {rank} killed at step {step}\n")
    # Ray Train's controller collects reported checkpoints when it polls the workers (every 2 s by
    # default); dying before that poll loses the last one and the run restarts from the one before.
    time.sleep(KILL_DELAY_S)
    os._exit(1)


def _inputs(teacher, tokenizer, cfg: Config) -> Inputs:
    """Seed sequences and the generator; ``teacher`` is the ZeRO-3 teacher engine's module (partitioned).

    Seeds come from the optional seed model (rank 0, broadcast) or from the teacher, all ranks together
    (:func:`zsaq_dist.dist.load.seed_ids_together`); the noise mode's embedding statistics need the whole
    embedding table, gathered for that moment.
    """
    m = cfg.method
    mode = resolve_mode(m)
    rank, _ = world()
    seed_ids = None
    if mode != "noise" and m.seed_data.seed_model is not None:
        seed_model = job.load_seed_model(cfg, job.device_for(cfg)) if rank == 0 else None
        seed_ids = broadcast(load_seed_ids(None, seed_model, tokenizer, m) if rank == 0 else None)
    elif mode != "noise":
        seed_ids = dload.seed_ids_together(teacher, tokenizer, cfg, dload.fingerprint(teacher))
    emb = teacher.get_input_embeddings().weight
    with dload.gathered([emb]) if mode == "noise" else contextlib.nullcontext():
        torch.manual_seed(m.seed)  # the generator's initial weights, identical on every rank
        return Inputs(teacher, mode, m, seed_ids)


def _block_warmup(teacher, student, inp: Inputs, cfg: Config) -> dict[str, Any]:
    """The block warm-up, data-parallel over the ranks (:func:`zsaq_dist.minimax.blockwise.block_warmup`).

    Each rank runs its share of every minibatch's rows through the teacher's layers (collectives under
    ZeRO-3: every rank makes the same calls) and the student layer; the squared errors and the gradients
    are summed over the ranks (:class:`~zsaq_dist.minimax.blockwise.Part`), so every rank takes the
    single process's steps. A ZeRO-3 student's layer is gathered for its turn and re-partitioned from
    rank 0's values, a replicated one (stages 0-2) is broadcast from rank 0 after each layer, so the
    engines start from identical weights whatever the hardware's nondeterminism.
    """
    import torch.distributed as tdist

    rank, n = world()
    layer_ctx = sync = part = None
    if n > 1:
        part = Part(rank, n, lambda t: tdist.all_reduce(t, op=tdist.ReduceOp.SUM))
    if dload.is_partitioned(next(student.parameters())):
        layer_ctx = lambda layer: dload.gathered_for_writing(list(layer.parameters()))  # noqa: E731
    elif n > 1:

        def sync(layer):
            for p in layer.parameters():
                tdist.broadcast(p.data, src=0)

    def on_layer(i: int, row: dict) -> None:
        if rank == 0 and "loss_before" in row:
            log.info("block warm-up layer %d: error %.5f -> %.5f%s (%.1fs)", i, row["loss_before"],
                     row["loss_after"], "" if row["kept"] else ", worse: put back", row["seconds"])

    m = cfg.method
    return block_warmup(teacher, student, inp.seed_ids, m, m.learnable_scales, False, on_layer, layer_ctx, sync, part)


def _train(game: DistGame, cfg: Config, start: int, hist: dict | None, warmup: dict | None) -> dict[str, Any]:
    """Student steps ``start..steps-1``, appended to ``hist`` (restored from the checkpoint, or new)."""
    m, rank = cfg.method, world()[0]
    hist = hist or {"mode": game.inp.mode, "method": m.name, **new_history(), "grad_norm": []}
    if warmup is not None:
        hist["block_warmup"] = warmup
    if game.inp.seed_ids is not None:
        hist["seed_data"] = seed_identity(game.inp.seed_ids)
    t_start = time.perf_counter()
    for step in range(start, m.steps):
        _maybe_fail(cfg, step)
        t0 = time.perf_counter()
        metrics, gen, lr = game.step(step)
        secs = time.perf_counter() - t0
        record_step(hist, step, metrics, gen, lr, secs)
        hist["grad_norm"].append(metrics.get("grad_norm"))
        if rank == 0 and step % m.log_every == 0:
            log.info("step %d loss %.5f kl %.5f %.2fs", step, metrics["loss"], metrics["kl"], secs)
        every = cfg.dist.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < m.steps:
            checkpoint.report(game, step + 1, cfg.hash(), {"step": step, **metrics}, hist)
    hist["total_seconds"] = hist.get("total_seconds", 0.0) + time.perf_counter() - t_start
    return hist


def _dist_summary(game: DistGame, cfg: Config, start: int) -> dict[str, Any]:
    """Workers, stage, resume point, and the parameter elements each rank holds (student and teacher)."""
    teacher_local = sum(p.ds_tensor.numel() for p in game.teacher.module.parameters())
    return {
        "num_workers": world()[1],
        "zero_stage": cfg.dist.zero_stage,
        "resumed_from_step": start,
        "threads_per_worker": torch.get_num_threads(),
        "student_numel": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in game.student.module.parameters()
        ),
        "student_partition_numel": all_gather(dsam.partition_numel(game.student)),
        "teacher_numel": sum(p.ds_numel for p in game.teacher.module.parameters()),
        "teacher_partition_numel": all_gather(teacher_local),
    }


def train_loop(config: dict[str, Any]) -> None:
    """One worker: validate ``config`` again, train, export; every rank must run it."""
    import ray.train

    cfg = validate(config, "(sent to the Ray worker)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    setup_comm(cfg.dist.use_gpu)
    t0 = time.perf_counter()
    report = job.base_report(cfg)
    teacher, tokenizer = dload.load_teacher(cfg)
    student = dload.build_student(cfg, teacher)
    report.update(job.quant_summary(student))
    load = {
        "teacher_sharded": dload.is_partitioned(next(teacher.parameters())),
        "student_sharded": dload.is_partitioned(next(student.parameters())),
        # per rank, after loading teacher and student: parameter elements held whole, peak memory
        "resident_numel": all_gather(dload.resident_numel(teacher, student)),
        "peak_rss_mb": all_gather(dload.peak_rss_mb()),
    }
    t_engine = teacher_engine(teacher, cfg)  # partitions a teacher that was loaded whole
    inp = _inputs(t_engine.module, tokenizer, cfg)
    saved = checkpoint.restored()  # Ray Train's checkpoint of this run, if it restarts or is rerun
    warmup = None  # a restored checkpoint holds the warmed student (and the warm-up's record in its history)
    if cfg.method.trains and cfg.method.block_warmup_steps > 0 and saved is None:
        warmup = _block_warmup(t_engine.module, student, inp, cfg)
    game = DistGame(t_engine, student, inp, cfg, universal=checkpoint.needs_universal(saved, cfg))
    start, hist = checkpoint.resume(game, cfg.hash(), saved)
    report["load_seconds"] = round(time.perf_counter() - t0, 2)
    report["dist"] = {**_dist_summary(game, cfg, start), "load": load}
    if cfg.method.trains:
        report["history"] = _train(game, cfg, start, hist, warmup)
    if cfg.eval is not None:
        # every rank runs the same forwards: under ZeRO-3 each one is a collective
        t2 = time.perf_counter()
        report["eval"] = job.evaluate_in_memory(game.teacher.module, game.student.module, tokenizer, cfg)
        report["eval_seconds"] = round(time.perf_counter() - t2, 2)
    t1 = time.perf_counter()
    report["output"] = cfg.output.dir
    curves = job.curves_png(report.get("history", {})) if world()[0] == 0 else {}
    export_parallel(game.student.module, tokenizer, cfg, report, extra_files=curves)
    report["export_seconds"] = round(time.perf_counter() - t1, 2)
    losses = report.get("history", {}).get("loss") or [None]  # none: no game step (rtn, or the warm-up alone)
    final = {"done": 1.0, "loss": losses[-1] or 0.0}
    ray.train.report(final)
