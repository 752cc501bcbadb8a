"""``ray job submit ... -- zsaq quantize cfg.yaml`` against a Ray head on 127.0.0.1 (slow).

The head runs in its own process group and temp dir; teardown kills only the
processes of that group and of that temp dir (never ``ray stop``, which would
stop every Ray process of the user on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import free_ports, make_tiny_llama, save_tiny

BIN = Path(sys.executable).parent




def _kill_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head we started: its process group, then anything still running from its temp dir."""
    with_tree = [p for p in psutil.process_iter(["pid", "cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for p in with_tree + [p for p in psutil.process_iter(["pid"]) if _in_group(p, proc.pid)]:
        try:
            p.kill()
        except psutil.Error:
            pass


def _in_group(p: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(p.pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False


@pytest.fixture
def head():
    gcs, dash, client, agent, agent_grpc, rt_agent, metrics = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="zsaqray", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""}
    env["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test head; a token file in ~/.ray must not matter
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
    cmd += ["--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent)]
    cmd += ["--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_agent)]
    cmd += ["--metrics-export-port", str(metrics), "--num-cpus", "2", "--temp-dir", temp_dir]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(url, proc)
        yield url, env
    finally:
        _kill_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up in {timeout} s")


@pytest.mark.slow
def test_ray_job_submit_runs_zsaq_quantize(head, tmp_path):
    url, env = head
    model = save_tiny(make_tiny_llama(seed=5), tmp_path / "tiny")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    out = tmp_path / "out"
    recipe = {
        "model": {"path": model},
        "quant": {"weights": {"group_size": 32}},
        "method": {
            "steps": 2,
            "batch_size": 2,
            "seq_len": 8,
            "seed_data": {"num_sequences": 2, "cache_dir": str(tmp_path / "seed")},
            "generator": {"noise_dim": 8, "hidden_dim": 16},
        },
        "dist": {"num_workers": 2, "zero_stage": 3},
        "output": {"dir": str(out)},
    }
    (job_dir / "cfg.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(job_dir)]
    cmd += ["--", str(BIN / "zsaq"), "quantize", "cfg.yaml"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout
    report = json.loads((out / "zsaq_report.json").read_text())
    assert report["dist"]["num_workers"] == 2 and report["dist"]["zero_stage"] == 3
    assert len(report["history"]["loss"]) == 2
    assert sorted(p.name for p in out.glob("model-*.safetensors"))
