"""``QuantLinear``: an ``nn.Linear`` whose forward fake-quantizes its weight (and optionally its input).

It re-uses the original ``weight`` Parameter object (peft's ``_replace_module``
habit), so state-dict keys and optimizer/DeepSpeed bookkeeping are unchanged;
the quantizer state uses the compressed-tensors names ``weight_scale`` and
``weight_zero_point`` so that export is a lookup.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zsaq_dist.quant.qparams import init_qparams
from zsaq_dist.quant.ste import fake_quant_act_per_token, fake_quant_weight, into_bins, quantize_weight


class QuantLinear(nn.Linear):
    """Linear layer with straight-through fake quantization of its weight.

    Attributes:
        bits, group_size, symmetric: the weight quantizer.
        act_bits: bits of the dynamic per-token input quantizer, or None.
        weight_scale: (out, groups) Parameter; trainable when ``learnable_scales``.
        weight_zero_point: (out, groups) int8 buffer (asymmetric only), else None.
        frozen: after :func:`zsaq_dist.quant.convert`, ``weight`` already holds its
            dequantized value and the forward skips the weight quantizer.
        recompute: when training, keep only the input for the backward and recompute the
            fake quantization there (``torch.utils.checkpoint``): the weight-sized
            intermediates (scaled weight, codes, dequantized weight) are not held from the
            forward to the backward. Same numbers, more compute.
        sam_delta: None, or a weight-shaped tensor (or a callable returning one: a delta
            gathered from ZeRO-3 partitions at each use) added *after* fake quantization: SAM's
            perturbation of the quantized weight (``method.sam_space: quantized``), set and
            cleared around SAM's second pass. Not a buffer: never saved or exported.
    """

    sam_delta: torch.Tensor | Callable[[], torch.Tensor] | None = None

    def __init__(self, *args, **kwargs):  # pragma: no cover - always built by from_linear
        raise TypeError("build QuantLinear with QuantLinear.from_linear(linear, ...)")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int,
        group_size: int | None,
        symmetric: bool = True,
        act_bits: int | None = None,
        observer: str = "minmax",
        learnable_scales: bool = False,
    ) -> QuantLinear:
        """Wrap ``linear`` (sharing its weight and bias Parameters) with scales initialised by ``observer``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.bits, new.group_size, new.symmetric, new.act_bits = bits, group_size, symmetric, act_bits
        new.frozen = False
        new.recompute = False
        scale, zp = init_qparams(linear.weight.detach(), bits, group_size, symmetric, observer)
        new.weight_scale = nn.Parameter(scale.to(linear.weight.dtype), requires_grad=learnable_scales)
        new.register_buffer("weight_zero_point", zp)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """Quantize-dequantized weight (O, I), differentiable through the STE."""
        if self.frozen:
            return self.weight
        w = fake_quant_weight(self.weight, self.weight_scale, self.weight_zero_point, self.bits)
        if self.sam_delta is None:
            return w
        return w + (self.sam_delta() if callable(self.sam_delta) else self.sam_delta)

    @torch.no_grad()
    def int_weight(self) -> torch.Tensor:
        """Integer codes (O, I) as int8, exactly what the export packs."""
        return quantize_weight(self.weight, self.weight_scale, self.weight_zero_point, self.bits).to(torch.int8)

    @torch.no_grad()
    def settle(self, margin: float) -> int:
        """Move the trained weight at least ``margin`` steps inside its rounding bins, its codes unchanged.

        A weight within ``d`` of a bin's edge flips its code, a whole quantization step, at any step of ``d``
        toward that edge; Adam moves every weight by about ``lr`` at its first steps, whatever its gradient.
        Moving the weights inside keeps the quantized weight bit for bit; a weight that would not round back
        (float rounding) keeps its value. Saturated weights (clipped to the lowest or highest code) stay
        where they are. Returns how many weights moved.
        """
        codes = quantize_weight(self.weight, self.weight_scale, self.weight_zero_point, self.bits)
        w = into_bins(self.weight, codes, self.weight_scale, self.weight_zero_point, margin, self.bits)
        same = quantize_weight(w, self.weight_scale, self.weight_zero_point, self.bits) == codes
        w = torch.where(same, w, self.weight)
        moved = int((w != self.weight).sum())
        self.weight.copy_(w)
        return moved

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.recompute and not self.frozen and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = fake_quant_act_per_token(x, self.act_bits)
        return F.linear(x, self.quantized_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (drops any activation quantizer)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.quantized_weight().detach().clone(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:  # noqa: D102
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        a = f", a{self.act_bits}" if self.act_bits else ""
        sym = "sym" if self.symmetric else "asym"
        return f"{super().extra_repr()}, w{self.bits} {g} {sym}{a}"
