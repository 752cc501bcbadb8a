"""Export exactness: packed tensors equal compressed-tensors' compressors; reloaded logits equal fake-quant logits."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from conftest import make_tiny_llama, make_tiny_qwen2
from torch import nn
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from zsaq_dist.config import Config
from zsaq_dist.errors import ExportError
from zsaq_dist.io.compress import compress_linear, quantization_config
from zsaq_dist.io.export import export_checkpoint
from zsaq_dist.quant import QuantLinear, convert, prepare, quant_modules

# CompressedTensorsConfig(dequantize=True) passed to from_pretrained warns that the checkpoint's config is kept
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


def make_cfg(out, bits=4, group=32, sym=True, act=False, shard="2GB", overwrite=False) -> Config:
    return Config.model_validate(
        {
            "model": {"path": "unused"},
            "quant": {
                "weights": {"bits": bits, "group_size": group, "symmetric": sym},
                "activations": {"bits": 8} if act else None,
            },
            "output": {"dir": str(out), "max_shard_size": shard, "overwrite": overwrite},
        }
    )


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(_ids()).logits


def _scheme(m: QuantLinear) -> QuantizationScheme:
    strat = "channel" if m.group_size is None else "group"
    w = QuantizationArgs(num_bits=m.bits, symmetric=m.symmetric, strategy=strat, group_size=m.group_size)
    a = None if m.act_bits is None else QuantizationArgs(num_bits=8, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=w, input_activations=a)


def _quant_linear(out_f, in_f, bits, group, sym, seed=0, act=None) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    return QuantLinear.from_linear(lin, bits, group, sym, act_bits=act)


def _ct_state(m: QuantLinear) -> dict[str, torch.Tensor]:
    sd = {"weight": m.weight.detach(), "weight_scale": m.weight_scale.detach(), "bias": m.bias.detach()}
    if m.weight_zero_point is not None:
        sd["weight_zero_point"] = m.weight_zero_point
    return sd


@pytest.mark.parametrize(
    "bits,group,sym", [(4, 32, True), (4, 32, False), (8, None, True), (3, None, False), (2, 64, True)]
)
def test_packed_equals_compressed_tensors_compressor(bits, group, sym):
    m = _quant_linear(96, 128, bits, group, sym)
    ours = compress_linear(m, "pack-quantized")
    ref = PackedQuantizationCompressor.compress(_ct_state(m), _scheme(m))
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        assert torch.equal(ours[k], ref[k]), k


def test_int_quantized_equals_compressed_tensors_compressor():
    m = _quant_linear(96, 128, 8, None, True, act=8)
    ours = compress_linear(m, "int-quantized")
    ref = IntQuantizationCompressor.compress(_ct_state(m), _scheme(m))
    assert set(ours) == set(ref) == {"weight", "weight_scale", "bias"}
    assert ours["weight"].dtype == torch.int8 and ours["weight_scale"].shape == (96, 1)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_int_quantized_rejects_grouped_weights():
    with pytest.raises(ExportError, match="pack-quantized"):
        compress_linear(_quant_linear(8, 64, 4, 32, True), "int-quantized")


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_odd_shape(bits):
    """830 x 545 (545 = 5 * 109): groups of 109 symmetric, per-channel asymmetric; decompressed by compressed-tensors."""
    for group, sym in ((109, True), (None, False)):
        m = _quant_linear(830, 545, bits, group, sym, seed=bits)
        c = compress_linear(m, "pack-quantized")
        assert c["weight_shape"].tolist() == [830, 545]
        assert torch.equal(unpack_from_int32(c["weight_packed"], bits, torch.Size([830, 545])), m.int_weight())
        back = PackedQuantizationCompressor.decompress(c, _scheme(m))
        assert torch.equal(back["weight"], m.quantized_weight().detach())


def test_quantization_config_is_valid_and_ignores_unquantized():
    model = make_tiny_llama(tie=True)
    prepare(model, make_cfg("/unused", act=True).quant)
    qc = quantization_config(model)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    parsed = QuantizationConfig.model_validate(qc)
    g = parsed.config_groups["group_0"]
    assert g.targets == ["Linear"] and g.weights.group_size == 32 and g.weights.strategy == "group"
    a = g.input_activations
    assert (a.num_bits, a.strategy, a.dynamic, a.symmetric) == (8, "token", True, True)


def _export_and_load(tmp_path, model, cfg_kw, dequantize=False):
    cfg = make_cfg(tmp_path / "out", **cfg_kw)
    prepare(model, cfg.quant)
    g = torch.Generator().manual_seed(2)
    for _, m in quant_modules(model):  # stand-in for trained (LSQ) scales: not the RTN ones
        m.weight_scale.data *= 0.8 + 0.4 * torch.rand(m.weight_scale.shape, generator=g).to(m.weight_scale.dtype)
    ref = _logits(model)
    path = export_checkpoint(model, None, cfg, {"method": "rtn"}, progress=False)
    qcfg = CompressedTensorsConfig(dequantize=True) if dequantize else None
    kw = {"quantization_config": qcfg} if qcfg else {}
    loaded = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    return path, ref, loaded


@pytest.mark.parametrize(
    "make,cfg_kw",
    [
        (make_tiny_llama, {"bits": 4, "group": 32}),
        (make_tiny_qwen2, {"bits": 4, "group": 32}),  # q/k/v biases
        (make_tiny_llama, {"bits": 8, "group": None}),
        (make_tiny_llama, {"bits": 4, "group": 32, "act": True}),  # W4A8
        (lambda: make_tiny_llama(tie=True), {"bits": 3, "group": 64, "shard": "20KB"}),
    ],
)
def test_reloaded_logits_equal_fake_quant(tmp_path, make, cfg_kw):
    path, ref, loaded = _export_and_load(tmp_path, make(), cfg_kw)
    torch.testing.assert_close(_logits(loaded), ref, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "out" / "zsaq_report.json").read_text()) == {"method": "rtn"}
    assert path == str(tmp_path / "out")


def test_tied_embeddings_written_once_like_save_pretrained(tmp_path):
    plain = make_tiny_llama(tie=True)
    plain.save_pretrained(tmp_path / "plain")
    from safetensors import safe_open

    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        plain_keys = set(f.keys())
    model = make_tiny_llama(tie=True)
    _export_and_load(tmp_path, model, {"bits": 4, "group": 32})
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    quant = {n for n, _ in quant_modules(model)}
    expected = {k for k in plain_keys if k.rpartition(".")[0] not in quant}
    expected |= {f"{n}.{s}" for n in quant for s in ("weight_packed", "weight_scale", "weight_shape")}
    assert set(index["weight_map"]) == expected
    assert "lm_head.weight" not in index["weight_map"]


def test_asymmetric_zero_points_load_with_dequantize(tmp_path):
    """transformers' default loader rejects packed zero points; its dequantize=True loader (and vLLM) read them."""
    _, ref, loaded = _export_and_load(tmp_path, make_tiny_llama(), {"bits": 4, "group": 32, "sym": False}, True)
    torch.testing.assert_close(_logits(loaded), ref, atol=1e-5, rtol=0)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] is False
    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    ours, _ = load_model(ModelCfg(path=str(tmp_path / "out")))  # what `zsaq eval` uses: picks the dequantize route
    torch.testing.assert_close(_logits(ours), ref, atol=1e-5, rtol=0)


def test_w8a8_reload_applies_dynamic_activation_quant(tmp_path):
    """transformers' default (compressed) loader runs compressed-tensors' forward: int8 per-token inputs included."""
    path, ref, loaded = _export_and_load(tmp_path, make_tiny_llama(), {"bits": 8, "group": None, "act": True})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "int-quantized"
    torch.testing.assert_close(_logits(loaded), ref, atol=1e-5, rtol=0)
    dense = AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert (_logits(dense) - ref).abs().max() > 1e-4  # weight-only reload differs: the activations matter


def test_bf16_model_exports_exactly(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "plain")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16).eval()
    path, ref, loaded = _export_and_load(tmp_path, model, {"bits": 4, "group": 32})
    assert loaded.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(_logits(loaded), ref, atol=0, rtol=0)


def test_converted_model_exports_the_same_codes():
    """convert() writes the dequantized weight back; re-quantizing it gives the same integer codes."""
    m = _quant_linear(64, 128, 3, 32, False)
    before = compress_linear(m, "pack-quantized")
    convert(m)
    after = compress_linear(m, "pack-quantized")
    for k in before:
        assert torch.equal(before[k], after[k]), k
