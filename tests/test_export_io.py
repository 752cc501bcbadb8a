"""Export I/O: atomic local output, cleanup on failure, fsspec (memory://) completion rule, sharding, multi-writer."""

from __future__ import annotations

import contextlib
import errno
import json
import secrets

import fsspec
import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from test_export import _logits, make_cfg
from transformers import AutoModelForCausalLM

import zsaq_dist.io.export as export_mod
from zsaq_dist.errors import ExportError
from zsaq_dist.io.export import export_checkpoint, module_tensors, write_metadata
from zsaq_dist.io.fs import is_complete, resolve
from zsaq_dist.io.manifest import verify_checkpoint, write_manifest
from zsaq_dist.io.shards import ShardWriter, finalize_shards, parse_size
from zsaq_dist.quant import prepare


def _prepared(cfg):
    model = make_tiny_llama()
    prepare(model, cfg.quant)
    return model


def _fail_on_call(n: int, exc: BaseException):
    """A compress_linear that raises ``exc`` on its n-th call (mid-way through the modules)."""
    real, calls = export_mod.compress_linear, {"n": 0}

    def fake(m, fmt):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(m, fmt)

    return fake


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, exc):
    cfg = make_cfg(tmp_path / "out", shard="10KB")
    model = _prepared(cfg)
    monkeypatch.setattr(export_mod, "compress_linear", _fail_on_call(9, exc))
    with pytest.raises(type(exc)):
        export_checkpoint(model, None, cfg, {}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_an_export_error(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "out")
    model = _prepared(cfg)
    monkeypatch.setattr(
        export_mod, "compress_linear", _fail_on_call(3, OSError(errno.ENOSPC, "No space left on device"))
    )
    with pytest.raises(ExportError, match="free space or choose another output.dir"):
        export_checkpoint(model, None, cfg, {}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_survives_a_failed_replace(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    cfg = make_cfg(out)
    model = _prepared(cfg)
    with pytest.raises(ExportError, match="overwrite"):
        export_checkpoint(model, None, cfg, {}, progress=False)
    cfg = make_cfg(out, overwrite=True)
    monkeypatch.setattr(export_mod, "write_manifest", lambda fs, d: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(model, None, cfg, {}, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "previous run"
    monkeypatch.undo()
    export_checkpoint(model, None, cfg, {"run": 2}, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not (out / "old.txt").exists()
    assert verify_checkpoint(str(out))["unlisted"] == []


def test_memory_fs_export_and_completion_rule(monkeypatch):
    uri = f"memory://zsaq-test-{secrets.token_hex(4)}/out"
    fs, path = resolve(uri)
    cfg = make_cfg(uri, shard="20KB")
    model = _prepared(cfg)
    try:
        assert export_checkpoint(model, None, cfg, {"ok": True}, progress=False) == uri
        assert is_complete(uri)
        result = verify_checkpoint(uri)
        index = json.loads(fs.cat_file(f"{path}/model.safetensors.index.json"))
        assert result["files"] == len(fs.ls(path)) - 1 and len(set(index["weight_map"].values())) > 1
        # a failed re-export (overwrite) removes everything it wrote and leaves no manifest
        cfg = make_cfg(uri, overwrite=True)
        monkeypatch.setattr(export_mod, "compress_linear", _fail_on_call(5, RuntimeError("boom")))
        with pytest.raises(RuntimeError):
            export_checkpoint(model, None, cfg, {}, progress=False)
        assert not fs.exists(path) and not is_complete(uri)
        # a crash that cannot clean up (killed process) leaves files but no manifest: incomplete
        monkeypatch.setattr(export_mod, "remove_tree", lambda fs, p: None)
        monkeypatch.setattr(export_mod, "compress_linear", _fail_on_call(5, RuntimeError("boom")))
        with pytest.raises(RuntimeError):
            export_checkpoint(model, None, make_cfg(uri, overwrite=True), {}, progress=False)
        assert fs.exists(path) and not is_complete(uri)
    finally:
        fs.rm(path.rsplit("/", 1)[0], recursive=True)


def test_file_uri_is_local_and_atomic(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/out"
    cfg = make_cfg(uri)
    model = _prepared(cfg)
    monkeypatch.setattr(export_mod, "write_manifest", lambda fs, d: (_ for _ in ()).throw(RuntimeError("late")))
    with pytest.raises(RuntimeError, match="late"):
        export_checkpoint(model, None, cfg, {}, progress=False)
    assert list(tmp_path.iterdir()) == []  # the tmp dir, not OUT, was being written
    monkeypatch.undo()
    assert export_checkpoint(model, None, cfg, {}, progress=False) == str(tmp_path / "out")
    assert is_complete(uri) and verify_checkpoint(uri)["files"] > 3


def test_sharding_index_and_reload(tmp_path):
    cfg = make_cfg(tmp_path / "out", shard="12KB")
    model = _prepared(cfg)
    ref = _logits(model)
    path = export_checkpoint(model, None, cfg, {}, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    total, seen = 0, {}
    for name in files:
        with safe_open(tmp_path / "out" / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                seen[key] = name
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"] and total == index["metadata"]["total_size"]
    assert not list((tmp_path / "out").glob("*.parts.json"))
    loaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(_logits(loaded), ref, atol=1e-5, rtol=0)


def test_two_writers_disjoint_modules_finalize(tmp_path):
    """The distributed layout: each rank writes its own parts; rank 0 numbers them and writes the index."""
    cfg = make_cfg(tmp_path / "out")
    model = _prepared(cfg)
    ref = _logits(model)
    fs, work = resolve(str(tmp_path / "out"))
    entered = []

    def gather(mod):  # records the collective each rank must enter for every module
        entered.append(mod)
        return contextlib.nullcontext()

    for rank in range(2):
        w = ShardWriter(fs, work, "8KB", prefix=f"rank{rank:05d}")
        for _, tensors in module_tensors(model, gather=gather, keep=lambda i, n, r=rank: i % 2 == r):
            w.add(tensors)
        w.close()
    assert len(entered) == 2 * len(list(model.modules()))
    finalize_shards(fs, work, [f"rank{r:05d}" for r in range(2)])
    write_metadata(fs, work, model, None, cfg, {})
    write_manifest(fs, work)
    loaded = AutoModelForCausalLM.from_pretrained(work)
    torch.testing.assert_close(_logits(loaded), ref, atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match="did not call close"):
        finalize_shards(fs, work, ["rank00007"])


def test_shard_writer_parts_respect_the_size_limit(tmp_path):
    """Modules fill a part up to max_shard_size; a module larger than it gets a part of its own, never split."""
    fs, work = resolve(str(tmp_path / "parts"))
    w = ShardWriter(fs, work, 100)
    for key, n in (("a", 10), ("b", 15), ("c", 40), ("d", 1)):  # fp32: 40, 60, 160, 4 bytes
        w.add({key: torch.zeros(n)})
    with pytest.raises(ExportError, match="written twice"):
        w.add({"a": torch.zeros(1)})
    parts = w.close()
    assert [p["keys"] for p in parts] == [["a", "b"], ["c"], ["d"]] and [p["size"] for p in parts] == [100, 160, 4]
    index = finalize_shards(fs, work)
    assert index["weight_map"] == {
        "a": "model-00001-of-00003.safetensors",
        "b": "model-00001-of-00003.safetensors",
        "c": "model-00002-of-00003.safetensors",
        "d": "model-00003-of-00003.safetensors",
    }


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size(1234) == 1234
    with pytest.raises(ExportError, match="'2GB'"):
        parse_size("two gigs")


def test_tokenizer_files_are_written(tmp_path):
    """A tokenizer object is saved through its own save_pretrained, locally and on memory://."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    for uri in (str(tmp_path / "out"), f"memory://zsaq-tok-{secrets.token_hex(4)}/out"):
        cfg = make_cfg(uri)
        export_checkpoint(_prepared(cfg), tok, cfg, {}, progress=False)
        fs, path = resolve(uri)
        assert fs.isfile(f"{path}/tokenizer.json")
        assert "tokenizer.json" in json.loads(fs.cat_file(f"{path}/manifest.json"))["files"]
        if isinstance(fs, fsspec.implementations.memory.MemoryFileSystem):
            fs.rm(path, recursive=True)
