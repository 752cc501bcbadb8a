"""Scale and zero-point initialisation: min-max, or an MSE-optimal clip search."""

from __future__ import annotations

import torch

from zsaq_dist.quant.ste import fake_quant_weight, qrange


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out, inp = w.shape
    gs = inp if group_size is None else group_size
    return w.reshape(out, inp // gs, gs)  # (O, G, gs)


def _from_range(
    mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """compressed-tensors ``calculate_qparams`` for int types: 0 is always representable."""
    qmin, qmax = qrange(bits)
    mn = torch.clamp(mn, max=0)
    mx = torch.clamp(mx, min=0)
    if symmetric:
        scale = torch.maximum(mn.abs(), mx.abs()) / ((qmax - qmin) / 2)
        zp = None
    else:
        scale = (mx - mn) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    if not symmetric:
        zp = torch.round(torch.clamp(qmin - mn / scale, qmin, qmax)).to(torch.int8)
    return scale, zp


def minmax_qparams(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (O, G) and int8 zero point (O, G) or None, from each group's min and max."""
    wg = _groups(w.detach(), group_size)
    return _from_range(wg.amin(-1), wg.amax(-1), bits, symmetric)


@torch.no_grad()
def mse_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int = 80,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shrink each group's range by the factor in ``[1 - max_shrink, 1]`` minimising ``sum |w - w_hat|^norm``.

    The same search as the MSE observers of GPTQ and llm-compressor.
    """
    wg = _groups(w.detach(), group_size)
    mn, mx = wg.amin(-1), wg.amax(-1)
    best_scale, best_zp = _from_range(mn, mx, bits, symmetric)
    best_err = torch.full_like(best_scale, float("inf"))
    for i in range(grid):
        p = 1.0 - max_shrink * i / grid
        scale, zp = _from_range(p * mn, p * mx, bits, symmetric)
        err = (fake_quant_weight(w, scale, zp, bits) - w).abs().pow(norm)
        err = _groups(err, group_size).sum(-1)  # (O, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def init_qparams(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, observer: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch on the observer name of :class:`zsaq_dist.config.WeightQuantCfg`."""
    fn = {"minmax": minmax_qparams, "mse": mse_qparams}[observer]
    return fn(w, bits, group_size, symmetric)
