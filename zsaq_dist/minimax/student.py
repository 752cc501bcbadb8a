"""Build the student (a fake-quantized copy of the teacher), freeze the teacher, and the student's AdamW + schedule."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from zsaq_dist.config import MethodCfg, QuantCfg
from zsaq_dist.optim.schedule import make_scheduler
from zsaq_dist.quant import prepare, quant_modules


def freeze(model: nn.Module) -> nn.Module:
    """No parameter of ``model`` takes a gradient; eval mode (no dropout). Used for the teacher."""
    model.requires_grad_(False)
    return model.eval()


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def student_params(student: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, scales) of the QuantLinear layers; scales only where they are trainable."""
    mods = [m for _, m in quant_modules(student)]
    weights = _unique([m.weight for m in mods])
    scales = _unique([m.weight_scale for m in mods if m.weight_scale.requires_grad])
    return weights, scales


def make_student(
    teacher: nn.Module, quant_cfg: QuantCfg, learnable_scales: bool = False, recompute: bool = False
) -> nn.Module:
    """Deep copy of ``teacher``, prepared (RTN init); only quantized weights (and scales) are trainable.

    Embeddings, norms and ignored layers (``lm_head``) stay frozen at the teacher's values, so
    the student differs from the teacher exactly in the layers that are quantized. ``recompute``:
    each QuantLinear recomputes its fake quantization in the backward (:class:`QuantLinear`).
    """
    return to_student(copy.deepcopy(teacher), quant_cfg, learnable_scales, recompute)


def to_student(
    model: nn.Module,
    quant_cfg: QuantCfg,
    learnable_scales: bool = False,
    recompute: bool = False,
    gather: Callable[[nn.Parameter], AbstractContextManager] | None = None,
) -> nn.Module:
    """Turn ``model`` (a fresh copy of the teacher's weights) into the student in place, as :func:`make_student`.

    ``gather``: see :func:`zsaq_dist.quant.prepare` (a student loaded already partitioned by ZeRO-3).
    """
    prepare(model, quant_cfg, learnable_scales=learnable_scales, gather=gather)
    for _, m in quant_modules(model):
        m.recompute = recompute
    return set_trainable(model, learnable_scales)


def set_trainable(student: nn.Module, learnable_scales: bool) -> nn.Module:
    """Only the QuantLinear weights (and, if learnable, their scales) require grad; eval mode."""
    student.requires_grad_(False)
    for _, m in quant_modules(student):
        m.weight.requires_grad_(True)
        m.weight_scale.requires_grad_(learnable_scales)
    return student.eval()


def make_optimizer(weights: list[nn.Parameter], scales: list[nn.Parameter], cfg: MethodCfg) -> torch.optim.AdamW:
    """AdamW with the weights at ``lr`` (with ``weight_decay``) and the scales at ``scale_lr`` (no decay)."""
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def make_student_scheduler(optimizer: torch.optim.Optimizer, cfg: MethodCfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule of :func:`make_optimizer`'s groups over ``cfg.steps`` student steps.

    With ``scales_only_steps = K`` the weights group (group 0) stays at lr 0 for steps ``0..K-1``
    and runs its warm-up and decay over steps ``K..steps-1``; the scales group is scheduled from
    step 0. Holding the lr at 0 (rather than skipping optimizer calls) keeps every optimizer step,
    so DeepSpeed engines run it unchanged. AdamW at lr 0 leaves the weights bit-identical (decay
    factor ``1 - 0 * wd == 1``, update ``0 * m / sqrt(v)``) while their moments still accumulate.
    """
    k = cfg.scales_only_steps
    starts = [k] + [0] * (len(optimizer.param_groups) - 1) if k else None
    return make_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.schedule, starts)
