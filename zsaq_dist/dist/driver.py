"""``run(cfg)``: the Ray driver of ``zsaq quantize`` (``dist.launcher: ray``).

Joins a cluster when ``dist.address`` or ``RAY_ADDRESS`` says where one is
(``ray job submit`` sets ``RAY_ADDRESS`` for its entrypoint); otherwise starts
Ray embedded in this process, dashboard on 127.0.0.1 only, sized to the workers. Then runs a
``TorchTrainer`` whose workers execute :func:`zsaq_dist.dist.worker.train_loop`
and returns the report that rank 0 wrote next to the checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from zsaq_dist.config import Config, validate
from zsaq_dist.errors import ZsaqError
from zsaq_dist.io.export import REPORT, check_target
from zsaq_dist.io.fs import join, read_json, resolve

log = logging.getLogger("zsaq.dist")


def storage_path(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints: ``dist.storage_path`` or ``<output.dir>.ray`` (absolute)."""
    if cfg.dist.storage_path:
        return cfg.dist.storage_path
    return os.path.abspath(cfg.output.dir.rstrip("/") + ".ray")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers narrow), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpus_asked(cfg: Config) -> float | None:
    """The CPUs each worker asks for in ``dist.resources_per_worker``; None where it names none."""
    return (cfg.dist.resources_per_worker or {}).get("CPU")


def worker_threads(cfg: Config) -> int:
    """Torch threads of each worker of embedded Ray where ``OMP_NUM_THREADS`` is not set: the CPUs each worker
    asks for in ``dist.resources_per_worker``, else this machine's cores shared out over the workers (so one
    worker on a laptop takes every core, as ``--local`` does)."""
    asked = cpus_asked(cfg)
    if asked:
        return max(1, int(asked))
    return max(1, usable_cpus() // cfg.dist.num_workers)


def _worker_env(cfg: Config) -> dict[str, str]:
    threads = os.environ.get("OMP_NUM_THREADS") or str(worker_threads(cfg))
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads}
    if not cfg.dist.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def embedded_cpus(cfg: Config) -> int:
    """Logical CPUs embedded Ray advertises: this machine's usable cores (the same count ``worker_threads``
    shares out), and never fewer than the workers ask for plus one for the driver's trainer actor."""
    asked = cpus_asked(cfg)
    return max(int(cfg.dist.num_workers * (1 if asked is None else asked)) + 1, usable_cpus())


def init_ray(cfg: Config) -> bool:
    """Connect to (or start) Ray; returns True if this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.dist.address or os.environ.get("RAY_ADDRESS")
    if address:  # a job's runtime_env (working_dir, env) stays as submitted; setup_comm sets DS_ACCELERATOR
        ray.init(address=address, log_to_driver=True)
        return True
    # "local" never attaches to someone else's cluster on this machine. The dashboard listens on loopback only;
    # Ray's core gRPC ports follow the node IP (Ray 2.60 rewrites a loopback _node_ip_address to the routable
    # one, services.resolve_ip_for_localhost) and are guarded by Ray's token auth. The dashboard
    # serves the State API that Ray Train's placement-group cleaner polls, else it logs a warning a second
    ray.init(
        address="local",
        num_cpus=embedded_cpus(cfg),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": _worker_env(cfg)},
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return True


def trainer(cfg: Config):
    """The ``TorchTrainer`` for ``cfg`` (workers, resources, storage, failures)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from zsaq_dist.dist.worker import train_loop

    d = cfg.dist
    resources = d.resources_per_worker or {"CPU": 1}
    store = storage_path(cfg)
    payload = cfg.model_dump(mode="json")
    payload["dist"]["storage_path"] = store
    return TorchTrainer(
        train_loop,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"zsaq-{cfg.hash()}",
            storage_path=store,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _absolute(path: str | None, must_exist: bool = False) -> str | None:
    if path is None or "://" in path or path.startswith("demo:") or os.path.isabs(path):
        return path
    if must_exist and not os.path.exists(path):
        return path  # not a local path: a hub id such as org/name
    return os.path.abspath(path)


def absolute_paths(cfg: Config) -> Config:
    """Ray workers run in their own working directory: resolve the caller's relative local paths first."""
    d = cfg.model_dump()
    d["model"]["path"] = _absolute(d["model"]["path"], must_exist=True)
    d["output"]["dir"] = _absolute(d["output"]["dir"])
    d["dist"]["storage_path"] = _absolute(d["dist"]["storage_path"])
    d["method"]["init_from"] = _absolute(d["method"]["init_from"])
    sd = d["method"]["seed_data"]
    sd["cache_dir"] = _absolute(sd["cache_dir"])
    sd["seed_model"] = _absolute(sd["seed_model"], must_exist=True)
    if d.get("eval"):
        d["eval"]["text"] = _absolute(d["eval"]["text"])
    return validate(d)


def run(cfg: Config) -> dict[str, Any]:
    """Run the job on Ray Train workers; returns the report (also in ``<output.dir>/zsaq_report.json``)."""
    import ray
    from ray.train import TrainingFailedError

    cfg = absolute_paths(cfg)
    fs, target = resolve(cfg.output.dir)
    check_target(fs, target, cfg.output.overwrite)  # fail before training, not after
    started = init_ray(cfg)
    try:
        try:
            trainer(cfg).fit()
        except TrainingFailedError as err:
            raise ZsaqError(
                f"the Ray Train job failed after {cfg.dist.max_failures} restarts: {err}. "
                "See the worker traceback above; raise dist.max_failures to retry more"
            ) from err
    finally:
        if started:
            ray.shutdown()
    path = join(target, REPORT)
    if not fs.isfile(path):
        raise ZsaqError(
            f"the workers finished but {path} is missing: output.dir must be reachable from every worker "
            "(a shared filesystem or an object-store URI)"
        )
    return read_json(fs, path)
