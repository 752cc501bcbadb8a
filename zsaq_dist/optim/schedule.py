"""Learning-rate schedules: linear warm-up, then cosine decay to zero (or constant)."""

from __future__ import annotations

import math
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


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0, kind: str = "cosine") -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every param group (call ``.step()`` after each optimizer step)."""
    return LambdaLR(optimizer, partial(lr_factor, total=total, warmup=warmup, kind=kind))
