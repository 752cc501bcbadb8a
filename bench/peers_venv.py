"""The peers' own virtual environment (llm-compressor, hqq), built once and cached.

llm-compressor pins its own transformers and compressed-tensors, so the peers
never share the product's venv. The build keeps torch at the product's exact
version through a pip constraints file: an unconstrained resolve would pull a
multi-GB CUDA torch. The venv is reused while ``requirements-peers.txt`` and
the torch pin are unchanged (a stamp file holds their hash).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from zsaq_dist.errors import ZsaqError

BENCH = Path(__file__).resolve().parent
REQUIREMENTS = BENCH / "requirements-peers.txt"
DEFAULT_VENV = BENCH / ".peers-venv"
STAMP = ".zsaq-peers-stamp"


class PeersEnvError(ZsaqError):
    """The peers' venv could not be built or used."""


def torch_pin() -> str:
    """``torch==X.Y.Z`` of the running interpreter, without a local tag like ``+cpu``."""
    return f"torch=={torch.__version__.split('+')[0]}"


def _stamp_text() -> str:
    return hashlib.sha256((REQUIREMENTS.read_text() + torch_pin()).encode()).hexdigest()


def venv_python(venv: Path) -> Path:
    """The interpreter of ``venv``."""
    return venv / "bin" / "python"


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise PeersEnvError(
            f"building the peers venv failed ({' '.join(cmd[:4])} ... exit {proc.returncode}); see {log}. "
            "Fix the cause (network to PyPI, disk space) and rerun, or delete the venv dir to start over"
        )


def ensure_venv(venv: Path = DEFAULT_VENV, quiet: bool = False) -> Path:
    """Build ``venv`` from requirements-peers.txt (torch constrained) unless it is already built; return its python."""
    py, stamp = venv_python(venv), venv / STAMP
    if py.is_file() and stamp.is_file() and stamp.read_text().strip() == _stamp_text():
        return py
    if not quiet:
        print(f"[peers] building {venv} from {REQUIREMENTS.name} (once; a few minutes)", flush=True)
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "build.log"
    constraints = venv / "constraints.txt"
    constraints.write_text(torch_pin() + "\n")
    _run([sys.executable, "-m", "venv", str(venv)], log)
    _run([str(py), "-m", "pip", "install", "-r", str(REQUIREMENTS), "-c", str(constraints)], log)
    stamp.write_text(_stamp_text() + "\n")
    return py


def versions(py: Path) -> dict[str, str]:
    """Installed versions of the packages that matter for the comparison, read inside the venv at ``py``."""
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in "
        "['llmcompressor','hqq','transformers','compressed-tensors','torch']}))"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
