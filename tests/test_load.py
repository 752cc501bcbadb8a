"""Model loading: local dirs, compressed-tensors checkpoints, and errors that name the fix (all offline)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, save_tiny
from test_load_fixtures import make_word_tokenizer

from zsaq_dist.config import DEMO_MODEL, ModelCfg
from zsaq_dist.errors import ModelLoadError
from zsaq_dist.io.load import load_model, resolve_model_path

X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def test_load_local_dir_matches_the_saved_model(tmp_path):
    ref = make_tiny_llama()
    d = save_tiny(ref, tmp_path / "m")
    model, tok = load_model(ModelCfg(path=d))
    assert not model.training
    assert tok is None  # the directory ships no tokenizer
    assert model.dtype == torch.float32
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)


def test_load_dtype_and_tokenizer(tmp_path):
    d = save_tiny(make_tiny_llama(), tmp_path / "m")
    make_word_tokenizer().save_pretrained(d)
    model, tok = load_model(ModelCfg(path=d, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    assert tok("a b", add_special_tokens=False)["input_ids"] == [3, 4]


def _expect(cfg_path: str, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelCfg(path=cfg_path))
    for frag in fragments:
        assert frag in str(info.value), str(info.value)


def test_missing_path(tmp_path):
    _expect(str(tmp_path / "nope"), "does not exist", "zsaq fetch-demo-model")


def test_dir_without_config(tmp_path):
    _expect(str(tmp_path), "no config.json")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    _expect(str(f), "not a .gguf")


def test_unknown_model_type(tmp_path):
    d = save_tiny(make_tiny_llama(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "no_such_arch_xyz"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    _expect(d, "model_type", "upgrade transformers")


def test_config_that_is_not_a_causal_lm(tmp_path):
    from safetensors.torch import save_file
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    _expect(str(tmp_path), "not a causal language model", "AutoModelForCausalLM")


def test_nan_weight_is_named(tmp_path):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    d = save_tiny(model, tmp_path / "m")
    _expect(d, "model.layers.1.mlp.down_proj.weight", "NaN")


def test_inf_weight_is_named(tmp_path):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("inf")
    _expect(save_tiny(model, tmp_path / "m"), "model.embed_tokens.weight", "Inf")


def test_bin_only_dir_is_refused(tmp_path):
    model = make_tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _expect(str(tmp_path), "pickle", "safetensors")


def test_unreachable_hub_id_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so 'org/name' cannot exist locally
    assert resolve_model_path("no-such-org/no-such-model") == "no-such-org/no-such-model"
    _expect("no-such-org/no-such-model", "hub", "local directory")


def test_demo_model_not_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSAQ_CACHE", str(tmp_path))
    _expect(DEMO_MODEL, "zsaq fetch-demo-model")
    with pytest.raises(ModelLoadError, match="only one"):
        resolve_model_path("demo:other")


def _compressed_checkpoint(path, act: bool):
    """A tiny llama quantized and compressed by compressed-tensors itself (llm-compressor's save path).

    Returns the directory and the logits of the fake-quantized model before compression.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = make_tiny_llama()
    if act:  # W8A8: per-channel int8 weights, dynamic per-token int8 activations
        w = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        a = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        scheme, fmt, group = (
            QuantizationScheme(targets=["Linear"], weights=w, input_activations=a),
            "int-quantized",
            None,
        )
    else:  # W4A16, groups of 16
        w = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
        scheme, fmt, group = QuantizationScheme(targets=["Linear"], weights=w), "pack-quantized", 16
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, qcfg)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and getattr(mod, "quantization_scheme", None) is not None:
            wt = mod.weight.data
            g = wt.reshape(wt.shape[0], -1, group) if group else wt.unsqueeze(1)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), w)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
            mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))
    ref = _logits(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return str(path), ref


@pytest.mark.parametrize("act", [False, True], ids=["w4g16-pack", "w8a8-int"])
def test_compressed_tensors_checkpoint_loads_for_eval(tmp_path, act):
    d, ref = _compressed_checkpoint(tmp_path / "ct", act)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    model, _ = load_model(ModelCfg(path=d))
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)
    assert (_logits(model) - _logits(make_tiny_llama())).abs().max() > 1e-3  # it is really quantized


def test_missing_weights_are_an_error_not_random_init(tmp_path):
    from conftest import make_tiny_llama
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    make_tiny_llama().save_pretrained(d)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.0.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks weights.*down_proj"):
        load_model(ModelCfg(path=str(d)))
