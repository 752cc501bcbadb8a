"""Two-phase API: ``prepare(model, quant_cfg)`` swaps targeted Linears for QuantLinear; ``convert`` freezes them.

Modules are selected by class name, exact module name, or ``re:`` regex on the
module name (the compressed-tensors convention), never per architecture.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from zsaq_dist.config import QuantCfg
from zsaq_dist.errors import ModelLoadError
from zsaq_dist.quant.linear import QuantLinear


def matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """True if ``module`` (called ``name``) matches a class name, a module name, or a ``re:`` pattern."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.match(pat[3:], name):
                return True
        elif pat == name or pat == type(module).__name__:
            return True
    return False


def find_targets(model: nn.Module, targets: list[str], ignore: list[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules selected by ``targets`` and not by ``ignore``, in model order."""
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, QuantLinear):
            continue
        if matches(name, mod, targets) and not matches(name, mod, ignore):
            found.append((name, mod))
    return found


def _check_group(name: str, lin: nn.Linear, group_size: int | None) -> None:
    if group_size is not None and lin.in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if lin.in_features % g == 0]
        hint = f"e.g. group_size: {max(divisors)}" if divisors else "e.g. group_size: null (per-channel)"
        raise ModelLoadError(
            f"layer {name} has input dimension {lin.in_features}, not a multiple of group_size {group_size}: "
            f"use a group size that divides every targeted layer ({hint}), or add the layer to quant.ignore"
        )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare(
    model: nn.Module,
    cfg: QuantCfg,
    learnable_scales: bool = False,
    gather: Callable[[nn.Parameter], AbstractContextManager] | None = None,
) -> nn.Module:
    """Swap every targeted Linear of ``model`` (in place) for a :class:`QuantLinear` initialised by RTN.

    ``gather(weight)``: a context in which a partitioned weight holds its full value (the dist layer
    passes ZeRO-3's ``GatheredParameters``), entered around each layer's scale initialisation; one
    layer is whole at a time.
    """
    targets = find_targets(model, cfg.targets, cfg.ignore)
    if not targets:
        raise ModelLoadError(
            f"no nn.Linear in {type(model).__name__} matches targets={cfg.targets} minus ignore={cfg.ignore}: "
            "this architecture has no Linear layers to quantize, or quant.targets needs a class name "
            "or 're:' pattern that selects them"
        )
    w = cfg.weights
    act_bits = cfg.activations.bits if cfg.activations is not None else None
    for name, lin in targets:
        _check_group(name, lin, w.group_size)
    for name, lin in targets:
        with gather(lin.weight) if gather is not None else nullcontext():
            q = QuantLinear.from_linear(lin, w.bits, w.group_size, w.symmetric, act_bits, w.observer, learnable_scales)
        _set_submodule(model, name, q)
    return model


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """The QuantLinear modules of ``model`` with their names."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Freeze: write each QuantLinear's dequantized weight into ``weight`` and stop training its scales.

    The forward of the converted model equals the prepared model's forward, without
    re-quantizing the weights every call; export reads the same integer codes.
    """
    for _, mod in quant_modules(model):
        if not mod.frozen:
            mod.weight.data.copy_(mod.quantized_weight())
            mod.frozen = True
        mod.weight.requires_grad_(False)
        mod.weight_scale.requires_grad_(False)
    return model
