"""Straight-through fake quantization.

Numerics follow compressed-tensors (the format's reference) so that a
fake-quant forward equals the forward of the exported checkpoint reloaded by
transformers or vLLM:

    q     = round(clamp(x / s + zp, qmin, qmax))
    x_hat = (q - zp) * s

Rounding is straight-through: round forward, identity backward, so inside the
clip range d x_hat / d x = 1 and d x_hat / d s = q - x / s (LSQ); outside it
the clamp gives d x_hat / d x = 0 and d x_hat / d s = q - zp.
"""

from __future__ import annotations

import torch


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even forward, identity backward."""
    return _RoundSTE.apply(x)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-wide value: (-2^(b-1), 2^(b-1) - 1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _grouped(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out, inp = w.shape
    groups = scale.shape[1]
    return w.reshape(out, groups, inp // groups)  # (O, G, I/G)


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Integer codes of ``w`` (O, I) for ``scale`` (O, G) as float tensor (O, I); differentiable (STE)."""
    qmin, qmax = qrange(bits)
    scaled = _grouped(w, scale) / scale.unsqueeze(-1)  # (O, G, I/G)
    if zero_point is not None:
        scaled = scaled + zero_point.unsqueeze(-1).to(w.dtype)
    q = round_ste(torch.clamp(scaled, qmin, qmax))
    return q.reshape(w.shape)


def fake_quant_weight(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Quantize-dequantize ``w`` (O, I) with per-group ``scale`` (O, G) and optional integer ``zero_point`` (O, G)."""
    return dequantize_codes(quantize_weight(w, scale, zero_point, bits), scale, zero_point)


def into_bins(
    w: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    margin: float,
    bits: int | None = None,
) -> torch.Tensor:
    """``w`` (O, I) moved into the rounding bins of codes ``q`` (O, I), ``margin`` steps inside their edges.

    A weight already that far inside keeps its exact value. With ``bits``, the outer edges of the lowest and
    highest codes stay open: a weight clipped to ``qmin`` or ``qmax`` keeps its value on that side.
    """
    u = _grouped(w, scale) / scale.unsqueeze(-1)
    z = 0 if zero_point is None else zero_point.unsqueeze(-1).to(scale.dtype)
    u = u + z
    qg = _grouped(q, scale).to(scale.dtype)
    lo, hi = qg - 0.5 + margin, qg + 0.5 - margin
    if bits is not None:
        qmin, qmax = qrange(bits)
        lo = torch.where(qg <= qmin, -torch.inf, lo)
        hi = torch.where(qg >= qmax, torch.inf, hi)
    inside = torch.clamp(u, lo, hi)
    moved = ((inside - z) * scale.unsqueeze(-1)).reshape(w.shape)
    return torch.where((inside == u).reshape(w.shape), w, moved.to(w.dtype))


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """``(q - zp) * s`` of integer codes ``q`` (O, I) per group of ``scale`` (O, G), in ``scale``'s dtype."""
    qg = _grouped(q, scale).to(scale.dtype)  # (O, G, I/G)
    if zero_point is not None:
        qg = qg - zero_point.unsqueeze(-1).to(scale.dtype)
    return (qg * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quant_act_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token quantize-dequantize of activations ``x`` (..., C).

    Scale per token = absmax / ((qmax - qmin) / 2), as compressed-tensors computes
    dynamic token scales; the scale carries no gradient.
    """
    qmin, qmax = qrange(bits)
    with torch.no_grad():
        amax = x.abs().amax(dim=-1, keepdim=True)  # (..., 1)
        scale = amax / ((qmax - qmin) / 2)
        scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    q = round_ste(torch.clamp(x / scale, qmin, qmax))
    return q.to(scale.dtype) * scale
