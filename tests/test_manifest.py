"""manifest.json: verify catches a flipped byte, a missing file, a missing manifest; unlisted files are reported."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_llama
from test_export import make_cfg

from zsaq_dist.errors import VerifyError
from zsaq_dist.io.export import export_checkpoint
from zsaq_dist.io.fs import is_complete
from zsaq_dist.io.manifest import verify_checkpoint
from zsaq_dist.quant import prepare


@pytest.fixture
def ckpt(tmp_path):
    cfg = make_cfg(tmp_path / "out", shard="20KB")
    model = make_tiny_llama()
    prepare(model, cfg.quant)
    return export_checkpoint(model, None, cfg, {"x": 1}, progress=False)


def test_manifest_lists_every_other_file(ckpt, tmp_path):
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    result = verify_checkpoint(ckpt)
    assert result["files"] == len(on_disk) and result["bytes"] == sum((out / n).stat().st_size for n in on_disk)


def test_flipped_byte_is_caught(ckpt, tmp_path):
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=f"{shard.name} does not match its sha256.*re-export"):
        verify_checkpoint(ckpt)


def test_missing_file_is_caught(ckpt, tmp_path):
    (tmp_path / "out" / "model.safetensors.index.json").unlink()
    with pytest.raises(VerifyError, match="model.safetensors.index.json is missing"):
        verify_checkpoint(ckpt)


def test_truncated_file_is_caught(ckpt, tmp_path):
    cfg_file = tmp_path / "out" / "config.json"
    cfg_file.write_bytes(cfg_file.read_bytes()[:-10])
    with pytest.raises(VerifyError, match="config.json has"):
        verify_checkpoint(ckpt)


def test_missing_manifest_means_incomplete(ckpt, tmp_path):
    assert is_complete(ckpt)
    (tmp_path / "out" / "manifest.json").unlink()
    assert not is_complete(ckpt)
    with pytest.raises(VerifyError, match="did not finish"):
        verify_checkpoint(ckpt)


def test_unlisted_files_reported_and_strict(ckpt, tmp_path):
    (tmp_path / "out" / "README.md").write_text("added later")
    assert verify_checkpoint(ckpt)["unlisted"] == ["README.md"]
    with pytest.raises(VerifyError, match="README.md is not in the manifest"):
        verify_checkpoint(ckpt, strict=True)
