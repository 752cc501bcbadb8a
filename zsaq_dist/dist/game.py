"""The SAM-SGA game on DeepSpeed engines: the single-process ``minimax`` step with dist mechanics.

Student step ``k`` uses global samples ``[k*B, (k+1)*B)`` exactly as
``minimax.trainer``; rank ``r`` of ``N`` takes the slice ``[r*B/N, (r+1)*B/N)``.
Every loss is a mean over this rank's slice and DeepSpeed (student) or an
all-reduce (generator) averages the gradients, which gives the gradient of the
global mean: the trajectory does not depend on ``N``. The generator is
replicated; every rank applies the same averaged gradient.
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import nn

from zsaq_dist.config import Config
from zsaq_dist.dist import sam as dsam
from zsaq_dist.dist.engines import micro_batch, student_engine, teacher_engine, world
from zsaq_dist.minimax.generator import STREAM_GENERATOR, STREAM_GM
from zsaq_dist.minimax.step import (
    generator_ascent_step,
    generator_objective,
    sam_student_step,
    student_loss,
    teacher_targets,
)
from zsaq_dist.minimax.student import make_optimizer, make_student_scheduler, norm_params, student_params
from zsaq_dist.minimax.trainer import Inputs, batch_indices, generator_optimizer
from zsaq_dist.optim.schedule import rho_at
from zsaq_dist.quant import quant_modules


def _is_engine(model) -> bool:
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def local_indices(step: int, cfg: Config) -> range:
    """This rank's global sample numbers at student step ``step``."""
    rank, n = world()
    idx = batch_indices(step, cfg.method.batch_size)
    mb = micro_batch(cfg, n)
    return idx[rank * mb : (rank + 1) * mb]


def average_grads(params: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of a replicated module."""
    _, n = world()
    if n == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(n)


def gather_samples(t: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B/N,) of every rank, concatenated in rank order: the global batch's (B,), on CPU."""
    t = t.detach().to("cpu", torch.float64)
    _, n = world()
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def average_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean of per-rank metrics over ranks (each rank's value is a mean over its equal-sized slice)."""
    _, n = world()
    if n == 1 or not metrics:
        return metrics
    keys = sorted(k for k in metrics if k != "grad_norm")  # the SAM norm is already global
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {**metrics, **{k: float(v) / n for k, v in zip(keys, t.tolist(), strict=True)}}


class DistGame:
    """Engines, optimizers and inputs of one worker; :meth:`step` is one SAM-SGA student step."""

    def __init__(self, teacher, student: nn.Module, inp: Inputs, cfg: Config, universal: bool = False):
        """``teacher``: its ZeRO-3 engine (:func:`teacher_engine`), or the module to wrap in one here.

        ``universal``: the student engine will resume from a universal checkpoint (another worker count).
        """
        m = self.m = cfg.method
        self.cfg, self.inp = cfg, inp
        weights, scales = student_params(student)
        opt = make_optimizer(weights, scales, m, norm_params(student))
        sched = make_student_scheduler(opt, m)  # per-group lr: DeepSpeed steps it (scales_only_steps)
        self.student = student_engine(student, opt, sched, cfg, universal)
        self.teacher = teacher if _is_engine(teacher) else teacher_engine(teacher, cfg)
        # SAM moves the weights only, as the trainer does: the latent ones, or after the quantizer
        if m.sam_space == "quantized":
            self.mech = dsam.quantized_mechanics(self.student, weights, [q for _, q in quant_modules(student)])
        else:
            self.mech = dsam.mechanics(self.student, weights)
        self.every = m.generator.student_steps_per_generator_step
        self.ascent = inp.generator is not None and m.ascent
        self.g_opt = self.g_sched = None
        if self.ascent:
            self.g_opt, self.g_sched = generator_optimizer(inp.generator, m)

    def generator_step(self, step: int, idx: range) -> dict[str, float]:
        """One ascent step of the replicated generator on this rank's slice, gradients averaged."""
        inp, m = self.inp, self.m
        e = inp.seed_embeds(idx, step)
        z = inp.noise(step, idx, STREAM_GENERATOR, e)
        xi = inp.noise(step, idx, STREAM_GM, e) if m.generator.lambda_gm > 0 else None

        def objective():  # the engines' modules: an engine forward reserves backward for engine.backward
            return generator_objective(self.teacher.module, self.student.module, inp.generator, z, e, m, xi)

        params = list(inp.generator.parameters())
        metrics = generator_ascent_step(objective, params, self.g_opt, m.grad_clip, reduce_grads=average_grads)
        self.g_sched.step()
        return average_metrics(metrics)

    def step(self, step: int) -> tuple[dict[str, float], dict[str, float] | None, float]:
        """Student step ``step``: (global student metrics with ``rho``, generator metrics or None, weights lr)."""
        m = self.m
        idx = local_indices(step, self.cfg)
        self.inp.begin_step(step)
        gen = self.generator_step(step, idx) if self.ascent and step % self.every == 0 else None
        x = self.inp.student_batch(step, idx)
        target = teacher_targets(self.teacher, x, m)
        lr = self.student.get_lr()[0]
        rho = rho_at(step, m.steps, m.rho, m.rho_final)

        picker = self.inp.picker if self.inp.picker is not None and self.inp.picker.hardness > 0 else None
        per_sample: list[torch.Tensor] | None = [] if picker is not None else None  # each sample's KL, for it

        def loss_fn():
            return student_loss(self.student, x, target, m, per_sample)

        metrics = sam_student_step(loss_fn, self.mech, rho, m.adaptive_sam, dsam.group(self.student))
        if picker is not None:  # every rank records the whole global batch's KLs (at w, not at w + e)
            idx_global = batch_indices(step, m.batch_size)
            picker.observe(picker.rows(step, idx_global), gather_samples(per_sample[0]))
        return {**average_metrics(metrics), "rho": rho}, gen, lr  # rho: same on every rank, not averaged
