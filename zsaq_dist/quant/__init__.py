"""Fake quantization with a straight-through estimator (plain torch; no deepspeed or ray)."""

from zsaq_dist.quant.linear import QuantLinear
from zsaq_dist.quant.prepare import convert, find_targets, matches, prepare, quant_modules
from zsaq_dist.quant.qparams import init_qparams, minmax_qparams, mse_qparams
from zsaq_dist.quant.ste import fake_quant_act_per_token, fake_quant_weight, qrange, quantize_weight, round_ste

__all__ = [
    "QuantLinear",
    "convert",
    "fake_quant_act_per_token",
    "fake_quant_weight",
    "find_targets",
    "init_qparams",
    "matches",
    "minmax_qparams",
    "mse_qparams",
    "prepare",
    "qrange",
    "quant_modules",
    "quantize_weight",
    "round_ste",
]
