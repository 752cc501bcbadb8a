"""Exactness of the quant core against compressed-tensors, STE gradients, prepare/convert."""

from __future__ import annotations

import copy

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams
from conftest import make_tiny_llama, make_tiny_qwen2

from zsaq_dist.config import QuantCfg
from zsaq_dist.errors import ModelLoadError
from zsaq_dist.quant import (
    QuantLinear,
    convert,
    fake_quant_act_per_token,
    fake_quant_weight,
    minmax_qparams,
    mse_qparams,
    prepare,
    quant_modules,
)


def _ct_args(bits, group, sym):
    strat = "channel" if group is None else "group"
    return QuantizationArgs(num_bits=bits, group_size=group, symmetric=sym, strategy=strat)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group,sym", [(32, True), (32, False), (None, True), (None, False)])
def test_qparams_and_fake_quant_match_compressed_tensors(bits, group, sym):
    torch.manual_seed(bits)
    w = torch.randn(48, 96)
    scale, zp = minmax_qparams(w, bits, group, sym)
    args = _ct_args(bits, group, sym)
    gs = 96 if group is None else group
    wg = w.reshape(48, 96 // gs, gs)
    ct_scale, ct_zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    torch.testing.assert_close(scale, ct_scale, rtol=0, atol=0)
    if not sym:
        assert torch.equal(zp, ct_zp.to(torch.int8))
    ct_q = quantize(w, ct_scale, None if sym else ct_zp, args, dtype=torch.int8)
    ours = fake_quant_weight(w, scale, zp, bits)
    ref = dequantize(ct_q, ct_scale, None if sym else ct_zp, args)
    assert torch.equal(ours, ref)


def test_act_quant_matches_compressed_tensors_dynamic_token():
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * 3
    args = QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True)
    mod = torch.nn.Linear(64, 8)
    mod.quantization_status = QuantizationStatus.FROZEN
    ref = forward_quantize(mod, x, "input", args)
    assert torch.equal(fake_quant_act_per_token(x, 8), ref)


def test_ste_gradients_are_identity_inside_and_lsq_for_scale():
    w = torch.tensor([[0.1, -0.5, 2.0, 0.3]], requires_grad=True)
    s = torch.tensor([[0.1]], requires_grad=True)
    out = fake_quant_weight(w, s, None, 4)  # range [-8, 7] * 0.1 -> 2.0 is clipped
    out.sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    q = torch.clamp(torch.round(w.detach() / s.detach()), -8, 7)
    inside = (w.detach() / s.detach()).abs() <= 7
    lsq = torch.where(inside, q - w.detach() / s.detach(), q)
    torch.testing.assert_close(s.grad, lsq.sum().reshape(1, 1))


def test_mse_observer_never_worse_than_minmax():
    torch.manual_seed(1)
    w = torch.randn(64, 128) * torch.rand(64, 1)
    w[0, 0] = 25.0  # an outlier the clip search should cut
    for sym in (True, False):
        s0, z0 = minmax_qparams(w, 3, 64, sym)
        s1, z1 = mse_qparams(w, 3, 64, sym)
        e0 = (fake_quant_weight(w, s0, z0, 3) - w).pow(2).sum()
        e1 = (fake_quant_weight(w, s1, z1, 3) - w).pow(2).sum()
        assert e1 < e0


def test_prepare_keeps_parameters_and_state_dict_keys(tiny_llama):
    before = {n: p for n, p in tiny_llama.named_parameters()}
    keys = set(tiny_llama.state_dict())
    prepare(tiny_llama, QuantCfg(weights={"bits": 4, "group_size": 32}))
    mods = dict(quant_modules(tiny_llama))
    assert len(mods) == 2 * 7 and "lm_head" not in mods
    for name, m in mods.items():
        assert m.weight is before[f"{name}.weight"]
    new_keys = set(tiny_llama.state_dict()) - keys
    assert new_keys == {f"{n}.weight_scale" for n in mods}


def test_targets_ignore_by_class_name_and_regex(tiny_llama):
    cfg = QuantCfg(weights={"group_size": 32}, targets=["re:.*mlp\\..*"], ignore=["lm_head", "model.layers.1.mlp.down_proj"])
    prepare(tiny_llama, cfg)
    names = [n for n, _ in quant_modules(tiny_llama)]
    assert names == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_bad_group_size_and_no_targets_are_clear_errors(tiny_llama):
    with pytest.raises(ModelLoadError, match="not a multiple of group_size 48"):
        prepare(copy.deepcopy(tiny_llama), QuantCfg(weights={"group_size": 48}))
    with pytest.raises(ModelLoadError, match="no Linear layers to quantize"):
        prepare(tiny_llama, QuantCfg(targets=["Conv1d"]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "quant",
    [
        {"weights": {"bits": 4, "group_size": 32}},
        {"weights": {"bits": 3, "group_size": 16, "symmetric": False}},
        {"weights": {"bits": 8, "group_size": None}, "activations": {"bits": 8}},
    ],
)
def test_prepare_vs_convert_same_logits(seed, quant):
    model = make_tiny_qwen2(seed) if seed % 2 else make_tiny_llama(seed)
    prepare(model, QuantCfg(**quant))
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a = model(ids).logits
        codes = {n: m.int_weight() for n, m in quant_modules(model)}
        convert(model)
        b = model(ids).logits
    assert torch.equal(a, b)
    for n, m in quant_modules(model):
        assert torch.equal(m.int_weight(), codes[n])


def test_learnable_scales_get_gradients(tiny_llama):
    prepare(tiny_llama, QuantCfg(weights={"group_size": 32}), learnable_scales=True)
    tiny_llama(torch.randint(0, 128, (1, 8))).logits.sum().backward()
    m = next(m for _, m in quant_modules(tiny_llama))
    assert isinstance(m, QuantLinear) and m.weight_scale.grad is not None and m.weight.grad is not None
