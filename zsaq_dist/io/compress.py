"""QuantLinear -> compressed-tensors tensors and ``quantization_config``.

The tensors are packed with compressed-tensors' own ``pack_to_int32`` and the
config is built from its pydantic classes, so the checkpoint is valid by
construction and equal to what ``PackedQuantizationCompressor.compress`` /
``IntQuantizationCompressor.compress`` write for the same weight, scale and
zero point (tests/test_export.py checks it).

    pack-quantized : weight_packed int32 (O, ceil(I*b/32)), weight_scale (O, G),
                     weight_shape int64 [O, I], weight_zero_point int32 packed along dim 0
                     (asymmetric only), bias
    int-quantized  : weight int8 (O, I), weight_scale (O, 1), bias
"""

from __future__ import annotations

from typing import Any

import compressed_tensors
import torch
from compressed_tensors.base import (
    COMPRESSION_VERSION_NAME,
    QUANTIZATION_METHOD,
    QUANTIZATION_METHOD_NAME,
    SPARSITY_CONFIG_NAME,
    TRANSFORM_CONFIG_NAME,
)
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from torch import nn

from zsaq_dist.errors import ExportError
from zsaq_dist.quant import QuantLinear, quant_modules

FORMATS = ("pack-quantized", "int-quantized")


@torch.no_grad()
def compress_linear(m: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """Compressed tensors of one QuantLinear, keyed by local name (``weight_packed``, ``weight_scale``, ...)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not supported: use one of {FORMATS}")
    q = m.int_weight()  # (O, I) int8 codes in [qmin, qmax]
    scale = m.weight_scale.detach().to(m.weight.dtype).contiguous()  # (O, G)
    if fmt == "int-quantized":
        if m.bits != 8 or m.group_size is not None or not m.symmetric:
            raise ExportError(
                f"int-quantized holds symmetric 8-bit per-channel weights, not w{m.bits} "
                f"g{m.group_size} sym={m.symmetric}: use format pack-quantized (weight-only)"
            )
        out = {"weight": q.contiguous(), "weight_scale": scale}
    else:
        out = {
            "weight_packed": pack_to_int32(q, m.bits),
            "weight_scale": scale,
            "weight_shape": torch.tensor(q.shape, dtype=torch.int64),
        }
        if not m.symmetric:
            # compressed-tensors packs group/channel zero points along the output dim
            out["weight_zero_point"] = pack_to_int32(m.weight_zero_point.to(torch.int8), m.bits, packed_dim=0)
    if m.bias is not None:
        out["bias"] = m.bias.detach().contiguous()
    return out


def _scheme_key(m: QuantLinear) -> tuple:
    return (m.bits, m.group_size, m.symmetric, m.act_bits)


def model_format(model: nn.Module) -> str:
    """The single compressed-tensors format of ``model``'s QuantLinears (W8A8 -> int-quantized)."""
    keys = {_scheme_key(m) for _, m in quant_modules(model)}
    if not keys:
        raise ExportError(
            "the model has no QuantLinear layers: prepare it with zsaq_dist.quant.prepare(model, cfg.quant) "
            "before exporting"
        )
    if len(keys) > 1:
        raise ExportError(
            f"the QuantLinear layers use {len(keys)} different schemes {sorted(keys, key=str)}: "
            "export one scheme per model (prepare the whole model with one quant config)"
        )
    bits, group, sym, act = keys.pop()
    return "int-quantized" if act is not None and bits == 8 and group is None and sym else "pack-quantized"


def unquantized_linears(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` left in full precision: the compressed-tensors ``ignore`` list."""
    return [
        name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear)
    ]


def quantization_config(model: nn.Module, observer: str = "minmax") -> dict[str, Any]:
    """``quantization_config`` for ``config.json``: one group targeting ``Linear``, the rest in ``ignore``.

    ``targets=["Linear"]`` plus the exact names of the unquantized Linears is how
    llm-compressor describes a model, and what transformers and vLLM match on.
    """
    fmt = model_format(model)
    m = next(mod for _, mod in quant_modules(model))
    weights = QuantizationArgs(
        num_bits=m.bits,
        type="int",
        symmetric=m.symmetric,
        strategy="channel" if m.group_size is None else "group",
        group_size=m.group_size,
        dynamic=False,
        observer=observer,
    )
    acts = None
    if m.act_bits is not None:
        acts = QuantizationArgs(num_bits=m.act_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts, format=fmt)
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=unquantized_linears(model),
    )
    # the same layout as compressed-tensors' ModelCompressor.update_config (what llm-compressor writes)
    return {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
        **qc.model_dump(mode="json", exclude={"quant_method"}),
    }
