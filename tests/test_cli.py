"""The `zsaq` command line end to end on a tiny model: quantize, verify, eval, and the errors users see."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama, save_tiny

from zsaq_dist.cli import main


def _recipe(tmp_path: Path, model_dir: str, **method) -> Path:
    cfg = {
        "model": {"path": model_dir},
        "quant": {"weights": {"bits": 4, "group_size": 32}},
        "method": {"name": "rtn", **method},
        "dist": {"launcher": "local"},
        "output": {"dir": str(tmp_path / "out")},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_quantize_verify_reload_rtn(tmp_path, capsys):
    model_dir = save_tiny(make_tiny_llama(), tmp_path / "m")
    assert main(["quantize", str(_recipe(tmp_path, model_dir))]) == 0
    out = tmp_path / "out"
    assert "done: rtn W4" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    report = json.loads((out / "zsaq_report.json").read_text())
    assert report["quantized_layers"] == 14 and report["real_data_used_for_training"] is False
    # float rounding, and so a trained run's exact numbers, depend on the CPU's kernels: the report names them
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["cpu"] and report["machine"]["threads"] == torch.get_num_threads()

    from transformers import AutoModelForCausalLM

    from zsaq_dist.config import QuantCfg
    from zsaq_dist.quant import prepare

    student = prepare(make_tiny_llama(), QuantCfg(weights={"bits": 4, "group_size": 32}))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, student(ids).logits, atol=1e-5, rtol=0)


def test_verify_names_a_flipped_byte(tmp_path, capsys):
    model_dir = save_tiny(make_tiny_llama(), tmp_path / "m")
    main(["quantize", str(_recipe(tmp_path, model_dir))])
    shard = tmp_path / "out" / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert "model-00001-of-00001.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.path=/nonexistent/model"], "does not exist"),
        (["quant.weights.group_size=48"], "not a multiple of group_size 48"),
        (["quant.weights.bits=9"], "use an integer from 2 to 8"),
        (["quant.targets=[Conv1d]"], "no Linear layers to quantize"),
        (["method.nme=zsaq"], "unknown key"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, overrides, message):
    model_dir = save_tiny(make_tiny_llama(), tmp_path / "m")
    args = ["quantize", str(_recipe(tmp_path, model_dir))] + sum((["--set", o] for o in overrides), [])
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    tail = err[err.rindex("error: "):]  # transformers' progress bars may come before it
    assert message in tail and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused(tmp_path, capsys):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    model_dir = save_tiny(model, tmp_path / "m")
    assert main(["quantize", str(_recipe(tmp_path, model_dir))]) == 2
    assert "model.layers.1.self_attn.o_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_seeds_writes_the_sequences_quantize_trains_on(tmp_path, capsys):
    """`zsaq seeds` writes the cached seed set (what training reads) as JSON lines; a rerun refuses to overwrite."""
    from test_load_fixtures import make_word_tokenizer

    from zsaq_dist.config import SeedDataCfg
    from zsaq_dist.data.seed import load_or_generate

    model_dir = save_tiny(make_tiny_llama(), tmp_path / "m")
    make_word_tokenizer().save_pretrained(model_dir)
    seed = {"num_sequences": 3, "cache_dir": str(tmp_path / "seed")}
    recipe = _recipe(tmp_path, model_dir, seq_len=10, seed=4, seed_data=seed)
    out = tmp_path / "seeds.jsonl"
    assert main(["seeds", str(recipe), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 seed sequences x 10 tokens" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    teacher, tok = load_model(ModelCfg(path=model_dir))
    ids = load_or_generate(teacher, SeedDataCfg(**seed), 10, 4, tok)  # from the cache `seeds` filled
    assert [r["input_ids"] for r in rows] == ids.tolist()
    assert f"tokens_sha256 {hashlib.sha256(ids.numpy().astype('int64').tobytes()).hexdigest()})" in printed
    assert all(r["attention_mask"] == [1] * 10 and isinstance(r["text"], str) for r in rows)
    assert main(["seeds", str(recipe), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["seeds", str(recipe), "--out", str(out), "--overwrite", "--set", "method.seed=5"]) == 0
    assert [json.loads(line)["input_ids"] for line in out.read_text().splitlines()] != ids.tolist()
