"""Sharpness-aware minimization as two explicit steps: ``perturb`` then ``restore``.

Modelled on davda54/sam: with ``g`` the gradient at ``w``,

    e = rho * g / (||g|| + 1e-12)                      (SAM)
    e = rho * w^2 * g / (||w * g|| + 1e-12)            (adaptive SAM, ASAM)

``||.||`` is the 2-norm over **all** tensors passed in. With a
``torch.distributed`` process group the local sum of squares is all-reduced
first, so ranks holding disjoint partitions of the gradient (DeepSpeed ZeRO)
get the norm of the full gradient. Each rank then perturbs only its own
tensors, keeps an exact copy of them, and :func:`restore` copies that back
bit for bit (no ``w + e - e`` drift).

The core works on parallel lists ``(tensors, grads)`` because the tensor to
perturb is not always the Parameter that holds ``.grad``: under ZeRO-3 it is
``p.ds_tensor`` and the gradient is ``deepspeed.utils.safe_get_local_grad(p)``.
:func:`perturb` is the convenience wrapper for ordinary parameters.
No deepspeed or ray import here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

EPS = 1e-12


@dataclass
class SamState:
    """What :func:`restore` needs: each perturbed tensor and an exact copy of its old value."""

    tensors: list[torch.Tensor] = field(default_factory=list)
    saved: list[torch.Tensor] = field(default_factory=list)
    norm: float = 0.0


def _pairs(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]):
    if len(tensors) != len(grads):
        raise ValueError(f"perturb_tensors got {len(tensors)} tensors but {len(grads)} grads: pass parallel lists")
    return [(t, g) for t, g in zip(tensors, grads, strict=True) if g is not None]


def _sq_sum(pairs, adaptive: bool, device: torch.device | None) -> torch.Tensor:
    """Local sum of squares of ``g`` (or ``|w| * g`` when adaptive), accumulated in float32."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for t, g in pairs:
        v = g.float() * t.float().abs() if adaptive else g.float()
        total = total + v.pow(2).sum().to(total.device)
    return total


def global_norm(
    tensors: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    adaptive: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """2-norm of ``grads`` (``|w| * g`` when adaptive) over all tensors and, with ``group``, all its ranks."""
    pairs = _pairs(tensors, grads)
    device = pairs[0][1].device if pairs else (tensors[0].device if tensors else None)
    sq = _sq_sum(pairs, adaptive, device)
    if group is not None:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return sq.sqrt()


def grad_norm(params: Iterable[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global 2-norm of the ``.grad`` of ordinary parameters (params without a grad are skipped)."""
    ps = list(params)
    return global_norm(ps, [p.grad for p in ps], group=group)


@torch.no_grad()
def perturb_tensors(
    tensors: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    rho: float,
    adaptive: bool = False,
    group: dist.ProcessGroup | None = None,
    keep: bool = True,
) -> SamState:
    """Move each tensor to ``w + e`` in place (tensors whose grad is None stay); return the restore state.

    Every rank of ``group`` must call this (the norm is a collective). ``keep=False`` keeps no copy
    (:func:`restore` then leaves the tensors as they are): for tensors that are dropped after the
    second pass, such as the zero deltas SAM adds after the quantizer.
    """
    pairs = _pairs(tensors, grads)
    norm = global_norm([t for t, _ in pairs], [g for _, g in pairs], adaptive, group)
    state = SamState(norm=float(norm))
    scale = rho / (norm + EPS)  # 0-d tensor: no host sync per tensor
    for t, g in pairs:
        if keep:
            state.tensors.append(t)
            state.saved.append(t.detach().clone())
        e = g.float() * scale.to(g.device)
        if adaptive:
            e = e * t.float().pow(2)
        t.add_(e.to(t.dtype))
    return state


def perturb(
    params: Iterable[torch.Tensor],
    rho: float,
    adaptive: bool = False,
    group: dist.ProcessGroup | None = None,
) -> SamState:
    """:func:`perturb_tensors` for ordinary parameters, using their ``.grad``."""
    ps = list(params)
    return perturb_tensors(ps, [p.grad for p in ps], rho, adaptive, group)


@torch.no_grad()
def restore(state: SamState) -> None:
    """Copy the saved tensors back: every perturbed tensor is bit-identical to before :func:`perturb`."""
    for t, old in zip(state.tensors, state.saved, strict=True):
        t.copy_(old)
    state.saved.clear()
