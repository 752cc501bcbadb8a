"""Schedules: the learning rate (linear warm-up, then cosine decay to zero, or constant), and the radii
of SAM and of the generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total: int, warmup: int = 0, kind: str = "cosine") -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``.

    warm-up: (step + 1) / (warmup + 1), so the first step already moves;
    cosine:  0.5 * (1 + cos(pi * t)), t = progress after warm-up in [0, 1).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r}: use 'cosine' or 'constant'")
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def delayed_lr_factor(step: int, start: int, total: int, warmup: int = 0, kind: str = "cosine") -> float:
    """0 before step ``start``; from there :func:`lr_factor` over the remaining ``total - start`` steps.

    A group that starts late gets its whole warm-up and decay, not the tail of one begun at step 0.
    """
    if step < start:
        return 0.0
    return lr_factor(step - start, total - start, warmup, kind)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total: int,
    warmup: int = 0,
    kind: str = "cosine",
    starts: Sequence[int] | None = None,
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every param group (call ``.step()`` after each optimizer step).

    ``starts[i]`` holds param group ``i`` at lr 0 until that optimizer step (:func:`delayed_lr_factor`);
    default: every group starts at step 0.
    """
    if starts is None:
        return LambdaLR(optimizer, partial(lr_factor, total=total, warmup=warmup, kind=kind))
    if len(starts) != len(optimizer.param_groups):
        raise ValueError(f"make_scheduler got {len(starts)} starts for {len(optimizer.param_groups)} param groups")
    fns = [partial(delayed_lr_factor, start=s, total=total, warmup=warmup, kind=kind) for s in starts]
    return LambdaLR(optimizer, fns)


def rho_at(step: int, steps: int, rho: float, rho_final: float | None = None) -> float:
    """SAM radius at student step ``step`` (0-based) of ``steps``: cosine from ``rho`` to ``rho_final``.

    The generator's radius follows the same schedule (``generator.radius`` to ``generator.radius_final``).

    ``rho`` exactly at step 0, ``rho_final`` exactly at step ``steps - 1``:
    ``rho * c + rho_final * (1 - c)``, ``c = 0.5 * (1 + cos(pi * step / (steps - 1)))``.
    ``rho_final`` None or equal to ``rho``, or ``steps <= 1``: the constant ``rho`` (no arithmetic on it).
    """
    if rho_final is None or rho_final == rho or steps <= 1:
        return rho
    t = min(1.0, max(0.0, step / (steps - 1)))
    c = 0.5 * (1.0 + math.cos(math.pi * t))
    return rho * c + rho_final * (1.0 - c)
