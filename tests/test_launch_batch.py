"""launch/batch_quantize.py: which models are pending, and a real batch run with `zsaq quantize`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import fsspec
import pytest
from conftest import make_tiny_llama, save_tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import batch_quantize as bq  # noqa: E402

RTN_CONFIG = """\
model: {path: REPLACE}
quant: {weights: {bits: 4, group_size: 32, symmetric: true}}
method: {name: rtn}
dist: {launcher: local}
output: {dir: REPLACE}
"""


def _hf_dir(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")


def test_find_pending_local(tmp_path):
    _hf_dir(tmp_path / "A")
    _hf_dir(tmp_path / "B")
    _hf_dir(tmp_path / "B-w4g64")  # already done
    _hf_dir(tmp_path / "E-w4g64.tmp-1234")  # an export in progress is neither a model nor done
    (tmp_path / "C.gguf").write_bytes(b"GGUF")
    (tmp_path / "D").mkdir()  # no config.json: not a model
    (tmp_path / "notes.txt").write_text("x")
    got = bq.find_pending(str(tmp_path), "-w4g64")
    assert got == [
        bq.Pending(f"{tmp_path}/A", f"{tmp_path}/A-w4g64"),
        bq.Pending(f"{tmp_path}/C.gguf", f"{tmp_path}/C-w4g64"),
    ]


def test_find_pending_fsspec_uris():
    """Roots can be fsspec URIs (s3://, gs://...): here the in-memory filesystem."""
    fs = fsspec.filesystem("memory")
    fs.pipe(
        {"/zsaq-src/M1/config.json": b"{}", "/zsaq-src/M2/config.json": b"{}", "/zsaq-dst/M2-w4/config.json": b"{}"}
    )
    try:
        got = bq.find_pending("memory://zsaq-src", "-w4", out_root="memory://zsaq-dst")
        assert got == [bq.Pending("memory://zsaq-src/M1", "memory://zsaq-dst/M1-w4")]
        assert bq.find_pending("memory://zsaq-nothing-here", "-w4") == []
    finally:
        fs.rm("/zsaq-src", recursive=True)
        fs.rm("/zsaq-dst", recursive=True)


def test_empty_suffix_is_refused(tmp_path, capsys):
    assert bq.main(["--models", str(tmp_path), "--config", "c.yaml", "--suffix="]) == 2
    assert "suffix must be non-empty" in capsys.readouterr().err


def test_overrides_follow_the_paths():
    item = bq.Pending("/m/X", "/m/X-w4")
    cmd = bq.quantize_command("zsaq", "cfg.yaml", item, ["dist.num_workers=2"])
    assert cmd == [
        "zsaq",
        "quantize",
        "cfg.yaml",
        "--set",
        "model.path=/m/X",
        "--set",
        "output.dir=/m/X-w4",
        "--set",
        "dist.num_workers=2",
    ]


def test_dry_run_lists_and_runs_nothing(tmp_path, capsys):
    _hf_dir(tmp_path / "A")
    _hf_dir(tmp_path / "B")
    rc = bq.main(["--models", str(tmp_path), "--config", "c.yaml", "--suffix=-q", "--max-models", "1", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 model(s)" in out and f"model.path={tmp_path}/A" in out and "/B" not in out
    assert not (tmp_path / "A-q").exists()


def test_batch_run_quantizes_and_reports_failures(tmp_path, capsys):
    """Two models, one broken: the good one is quantized, the run exits 1, a rerun skips the done one."""
    zsaq = shutil.which("zsaq") or str(Path(sys.executable).parent / "zsaq")
    models = tmp_path / "models"
    save_tiny(make_tiny_llama(), models / "good")
    _hf_dir(models / "broken")  # config.json without a model type: zsaq must fail on it
    cfg = tmp_path / "rtn.yaml"
    cfg.write_text(RTN_CONFIG)
    argv = ["--models", str(models), "--config", str(cfg), "--suffix=-w4", "--zsaq", zsaq]
    assert bq.main(argv) == 1
    assert "FAILED " + str(models / "broken") in capsys.readouterr().err
    out = models / "good-w4"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert list(out.glob("*.safetensors")) and not (models / "broken-w4").exists()
    assert bq.find_pending(str(models), "-w4") == [bq.Pending(str(models / "broken"), str(models / "broken-w4"))]


@pytest.mark.parametrize("name", ["x.tmp-99", "x-w4"])
def test_outputs_are_never_inputs(tmp_path, name):
    _hf_dir(tmp_path / name)
    assert bq.find_pending(str(tmp_path), "-w4") == []
