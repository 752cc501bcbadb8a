"""``method.init_from``: the student starts bit-exactly from a compressed-tensors checkpoint's codes and scales."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2, save_tiny
from safetensors.torch import load_file, save_file

from zsaq_dist import job
from zsaq_dist.config import Config, validate
from zsaq_dist.errors import ConfigError
from zsaq_dist.io.export import export_checkpoint
from zsaq_dist.quant import prepare, quant_modules

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

W4 = {"weights": {"bits": 4, "group_size": 32}}
SCHEMES = {
    "w4g32-sym": W4,
    "w4g32-asym": {"weights": {"bits": 4, "group_size": 32, "symmetric": False}},
    "w3-channel-asym": {"weights": {"bits": 3, "group_size": None, "symmetric": False}},
    "w4a8": {**W4, "activations": {"bits": 8}},
    "w8a8": {"weights": {"bits": 8, "group_size": None}, "activations": {"bits": 8}},
}


def _cfg(model: str, out: Path, quant: dict, **method) -> Config:
    return validate(
        {
            "model": {"path": model},
            "quant": quant,
            "method": {"name": "rtn", **method},
            "dist": {"launcher": "local"},
            "output": {"dir": str(out)},
        }
    )


def _tensors(d: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _source(model_dir: str, out: Path, quant: dict, ignore: list[str] | None = None, norm: bool = False) -> str:
    """A checkpoint whose codes and scales are not what RTN of the teacher gives.

    Stand-in for GPTQ output: weights moved by about half a step, scales by +-20%; ``norm``: one norm
    rescaled too (AWQ folds its scales into the norms).
    """
    cfg = _cfg(model_dir, out, {**quant, "ignore": ignore or ["lm_head"]})
    teacher, _ = job.load_teacher(cfg, torch.device("cpu"))
    model = prepare(copy.deepcopy(teacher), cfg.quant)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, m in quant_modules(model):
            s = m.weight_scale.repeat_interleave(m.weight.shape[1] // m.weight_scale.shape[1], dim=1)
            m.weight += 0.5 * s * torch.randn(m.weight.shape, generator=g)
            m.weight_scale *= 0.8 + 0.4 * torch.rand(m.weight_scale.shape, generator=g)
        if norm:
            model.model.norm.weight.mul_(1.5)
    return export_checkpoint(model, None, cfg, {"method": "stand-in"}, progress=False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny(make_tiny_llama(seed=5), tmp_path_factory.mktemp("warm") / "llama")


@pytest.mark.parametrize("latent", ["teacher", "center", "nearest"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_rtn_from_a_checkpoint_exports_it_bit_for_bit(tmp_path, llama_dir, scheme, latent):
    quant = SCHEMES[scheme]
    src = _source(llama_dir, tmp_path / "src", quant, norm=latent == "center")
    rep = job.run_quantize(_cfg(llama_dir, tmp_path / "again", quant, init_from=src, init_latent=latent))
    assert rep["init_from"]["path"] == src and "not known" in rep["init_from"]["note"]
    a, b = _tensors(src), _tensors(rep["output"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the test can fail: RTN of the teacher is another checkpoint
    rtn = _tensors(job.run_quantize(_cfg(llama_dir, tmp_path / "rtn", quant))["output"])
    assert any(not torch.equal(a[k], rtn[k]) for k in a if k.endswith("weight_scale"))
    assert torch.equal(a["model.norm.weight"], rtn["model.norm.weight"]) == (latent != "center")


def test_latent_weights_sit_where_init_latent_says_with_the_checkpoints_codes(tmp_path, llama_dir):
    """teacher: the teacher's weight where it rounds to the code, else the centre; nearest: the point of
    the code's bin nearest the teacher; center: the centre. The codes are the checkpoint's in all three."""
    src = _source(llama_dir, tmp_path / "src", SCHEMES["w4g32-asym"])
    cfg = _cfg(llama_dir, tmp_path / "o", SCHEMES["w4g32-asym"], init_from=src)
    teacher, _ = job.load_teacher(cfg, torch.device("cpu"))

    def student(latent: str):
        return job.build_student(
            teacher, cfg.model_copy(update={"method": cfg.method.model_copy(update={"init_latent": latent})})
        )

    mods = {k: dict(quant_modules(student(k))) for k in ("teacher", "center", "nearest")}
    fp = dict(teacher.named_modules())
    kept = moved = 0
    for name, c in mods["center"].items():
        a, n = mods["teacher"][name], mods["nearest"][name]
        codes = c.int_weight()
        assert torch.equal(a.int_weight(), codes) and torch.equal(n.int_weight(), codes)
        t, wc, wa, wn = fp[name].weight, c.weight.detach(), a.weight.detach(), n.weight.detach()
        step = c.weight_scale.repeat_interleave(t.shape[1] // c.weight_scale.shape[1], dim=1)
        same = torch.isclose(wa, t, rtol=0, atol=0)
        assert torch.equal(wa[~same], wc[~same])  # teacher: the centre where the code was moved
        # nearest: the teacher's own weight where it rounds there (to within the margin kept from the edge) ...
        # (the outermost codes also take the clamped values beyond their bins: those come inside)
        inner = same & (codes > -8) & (codes < 7)
        assert ((wn - t).abs()[inner] <= 1e-3 * step[inner] + 1e-9).all()
        assert torch.allclose((wn - wc).abs()[~same], 0.5 * step[~same] * (1 - 2e-3), rtol=1e-4)  # ... else the edge
        assert ((wn - t).abs() <= (wc - t).abs() + 1e-7).all()  # never farther from the teacher than the centre
        kept, moved = kept + int(same.sum()), moved + int((~same).sum())
    assert kept > 0 and moved > 0


def test_teacher_latent_refuses_a_checkpoint_that_rescaled_other_tensors(tmp_path, llama_dir):
    src = _source(llama_dir, tmp_path / "src", W4, norm=True)
    with pytest.raises(ConfigError, match="method.init_latent: center"):
        job.run_quantize(_cfg(llama_dir, tmp_path / "o", W4, init_from=src))


def test_student_starts_where_the_checkpoint_is_and_trains_from_there(tmp_path):
    """Fake-quant logits of the initialised student equal the reloaded checkpoint's; a zsaq run moves on from it."""
    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    model_dir = save_tiny(make_tiny_qwen2(seed=2), tmp_path / "qwen2")  # q/k/v biases are copied too
    src = _source(model_dir, tmp_path / "src", W4)
    cfg = _cfg(model_dir, tmp_path / "o", W4, init_from=src)
    teacher, _ = job.load_teacher(cfg, torch.device("cpu"))
    student = job.build_student(teacher, cfg)
    reloaded, _ = load_model(ModelCfg(path=src))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reloaded(ids).logits, atol=1e-5, rtol=0)
    codes = {n: m.int_weight().clone() for n, m in quant_modules(student)}
    zsaq = cfg.model_copy(
        update={
            "method": cfg.method.model_copy(
                update={"name": "zsaq", "steps": 3, "batch_size": 2, "seq_len": 8, "lr": 1e-3}
            )
        }
    )
    zsaq.method.seed_data.num_sequences = 4
    zsaq.method.seed_data.cache_dir = str(tmp_path / "seed")
    zsaq.method.generator.noise_dim, zsaq.method.generator.hidden_dim = 8, 16
    hist = job.train_student(teacher, student, None, zsaq)
    assert len(hist["loss"]) == 3 and all(torch.isfinite(torch.tensor(hist["loss"])))
    moved = sum(int((m.int_weight() != codes[n]).sum()) for n, m in quant_modules(student))
    assert moved > 0


def test_scheme_mismatch_names_the_quant_keys_to_set(tmp_path, llama_dir):
    src = _source(llama_dir, tmp_path / "src", SCHEMES["w4g32-asym"])
    with pytest.raises(ConfigError, match="quant.weights.symmetric: false") as e:
        job.run_quantize(_cfg(llama_dir, tmp_path / "o", W4, init_from=src))
    assert "quant.weights.group_size: 32" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_other_ignore_lists_are_refused(tmp_path, llama_dir):
    src = _source(llama_dir, tmp_path / "src", W4, ignore=["lm_head", "re:.*down_proj"])
    with pytest.raises(ConfigError, match="quant.ignore"):
        job.run_quantize(_cfg(llama_dir, tmp_path / "o", W4, init_from=src))


def test_a_dense_model_or_a_missing_dir_is_not_a_start(tmp_path, llama_dir):
    with pytest.raises(ConfigError, match="not a compressed-tensors checkpoint"):
        job.run_quantize(_cfg(llama_dir, tmp_path / "o", W4, init_from=llama_dir))
    with pytest.raises(ConfigError, match="has no config.json"):
        job.run_quantize(_cfg(llama_dir, tmp_path / "o", W4, init_from=str(tmp_path / "nowhere")))


def test_activation_ordered_groups_are_refused_and_trivial_ones_accepted(tmp_path, llama_dir):
    src = Path(_source(llama_dir, tmp_path / "src", W4))
    (shard,) = src.glob("*.safetensors")
    t = load_file(shard)
    name = "model.layers.0.mlp.up_proj"
    inp = int(t[f"{name}.weight_shape"][1])
    t[f"{name}.weight_g_idx"] = torch.arange(inp, dtype=torch.int32) // 32
    save_file(t, shard, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        d = json.loads(index.read_text())
        d["weight_map"][f"{name}.weight_g_idx"] = shard.name
        index.write_text(json.dumps(d))
    job.build_student(
        job.load_teacher(_cfg(llama_dir, tmp_path / "o", W4), torch.device("cpu"))[0],
        _cfg(llama_dir, tmp_path / "o", W4, init_from=str(src)),
    )
    t[f"{name}.weight_g_idx"] = torch.randperm(inp, generator=torch.Generator().manual_seed(0)).int() // 32
    save_file(t, shard, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="actorder"):
        job.run_quantize(_cfg(llama_dir, tmp_path / "o", W4, init_from=str(src)))
