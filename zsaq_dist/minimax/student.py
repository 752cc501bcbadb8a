"""Build the student (a fake-quantized copy of the teacher), freeze the teacher, and the student's AdamW + schedule."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from zsaq_dist.config import MethodCfg, QuantCfg
from zsaq_dist.errors import ConfigError
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


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's LayerNorm, RMSNorm or GroupNorm, or a class named ``*Norm``.

    By class name, as the quantization targets are (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...), never per
    architecture.
    """
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def _norm_tensors(model: nn.Module) -> list[nn.Parameter]:
    return _unique([p for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)])


def norm_params(student: nn.Module) -> list[nn.Parameter]:
    """The norm layers' parameters (weights, biases) that are trainable: none unless ``train_norms`` was asked."""
    return [p for p in _norm_tensors(student) if p.requires_grad]


def make_student(
    teacher: nn.Module,
    quant_cfg: QuantCfg,
    learnable_scales: bool = False,
    recompute: bool = False,
    train_norms: bool = False,
) -> nn.Module:
    """Deep copy of ``teacher``, prepared (RTN init); only quantized weights (and scales, and norms) are trainable.

    Embeddings, ignored layers (``lm_head``) and, unless ``train_norms``, the norm layers stay frozen
    at the teacher's values, so the student differs from the teacher exactly in the layers that are
    quantized (and the norms). ``recompute``: each QuantLinear recomputes its fake quantization in the
    backward (:class:`QuantLinear`).
    """
    return to_student(copy.deepcopy(teacher), quant_cfg, learnable_scales, recompute, train_norms=train_norms)


def to_student(
    model: nn.Module,
    quant_cfg: QuantCfg,
    learnable_scales: bool = False,
    recompute: bool = False,
    gather: Callable[[nn.Parameter], AbstractContextManager] | None = None,
    train_norms: bool = False,
) -> nn.Module:
    """Turn ``model`` (a fresh copy of the teacher's weights) into the student in place, as :func:`make_student`.

    ``gather``: see :func:`zsaq_dist.quant.prepare` (a student loaded already partitioned by ZeRO-3).
    """
    prepare(model, quant_cfg, learnable_scales=learnable_scales, gather=gather)
    for _, m in quant_modules(model):
        m.recompute = recompute
    return set_trainable(model, learnable_scales, train_norms)


def set_trainable(student: nn.Module, learnable_scales: bool, train_norms: bool = False) -> nn.Module:
    """Only the QuantLinear weights (and, if asked, their scales and the norm layers) require grad; eval mode."""
    student.requires_grad_(False)
    for _, m in quant_modules(student):
        m.weight.requires_grad_(True)
        m.weight_scale.requires_grad_(learnable_scales)
    if train_norms:
        norms = _norm_tensors(student)
        if not norms:
            raise ConfigError(
                "method.norm_lr > 0 trains the norm layers, but this model has none with parameters "
                "(LayerNorm, RMSNorm or a class named *Norm): set method.norm_lr: 0"
            )
        for p in norms:
            p.requires_grad_(True)
    return student.eval()


def make_optimizer(
    weights: list[nn.Parameter],
    scales: list[nn.Parameter],
    cfg: MethodCfg,
    norms: list[nn.Parameter] | None = None,
) -> torch.optim.AdamW:
    """AdamW: the weights at ``lr`` (with ``weight_decay``), the scales at ``scale_lr`` and the norms at ``norm_lr``.

    Neither the scales nor the norms decay. Group 0 is always the weights (:func:`make_student_scheduler`).
    """
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0})
    if norms:
        groups.append({"params": norms, "lr": cfg.norm_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def make_student_scheduler(optimizer: torch.optim.Optimizer, cfg: MethodCfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule of :func:`make_optimizer`'s groups over ``cfg.steps`` student steps.

    With ``scales_only_steps = K`` the weights group (group 0) stays at lr 0 for steps ``0..K-1``
    and runs its warm-up and decay over steps ``K..steps-1``; the scales and norms groups are
    scheduled from step 0. Holding the lr at 0 (rather than skipping optimizer calls) keeps every
    optimizer step, so DeepSpeed engines run it unchanged. AdamW at lr 0 leaves the weights
    bit-identical (decay factor ``1 - 0 * wd == 1``, update ``0 * m / sqrt(v)``) while their
    moments still accumulate.
    """
    k = cfg.scales_only_steps
    starts = [k] + [0] * (len(optimizer.param_groups) - 1) if k else None
    return make_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.schedule, starts)
