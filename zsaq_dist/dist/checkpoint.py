"""Checkpoints of a worker: student engine (ZeRO partitions), generator, optimizers, RNG, step, config hash.

Every rank writes its own files into a local directory and hands it to
``ray.train.report``; Ray merges the ranks' files into one checkpoint
directory in ``RunConfig.storage_path``. On restart, each rank reads that
directory back from ``ray.train.get_checkpoint()``.

Layout: ``student/`` (``engine.save_checkpoint``, tag ``ckpt``) and
``zsaq_state.pt`` from rank 0 (generator, its optimizer and schedule, RNG,
next step, config hash). A checkpoint whose config hash differs is refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from zsaq_dist.dist.engines import world
from zsaq_dist.dist.game import DistGame
from zsaq_dist.errors import ConfigError

TAG = "ckpt"
STATE = "zsaq_state.pt"


def _state(game: DistGame, next_step: int, cfg_hash: str, history: dict) -> dict[str, Any]:
    gen = game.inp.generator
    return {
        "next_step": next_step,
        "history": history,
        "config_hash": cfg_hash,
        "num_workers": world()[1],
        "generator": gen.state_dict() if gen is not None else None,
        "g_opt": game.g_opt.state_dict() if game.g_opt is not None else None,
        "g_sched": game.g_sched.state_dict() if game.g_sched is not None else None,
        "rng": torch.get_rng_state(),
    }


def save(game: DistGame, next_step: int, cfg_hash: str, directory: str, history: dict) -> None:
    """Write this rank's part of the checkpoint into ``directory`` (a collective: all ranks call it)."""
    rank, _ = world()
    game.student.save_checkpoint(os.path.join(directory, "student"), tag=TAG, save_latest=False)
    if rank == 0:
        torch.save(_state(game, next_step, cfg_hash, history), os.path.join(directory, STATE))


def load(game: DistGame, cfg_hash: str, directory: str) -> tuple[int, dict | None]:
    """Restore every piece from ``directory``; returns (next student step to run, history so far)."""
    state = torch.load(Path(directory) / STATE, weights_only=False)
    if state["config_hash"] != cfg_hash:
        raise ConfigError(
            f"checkpoint in {directory} was written by a job with config hash {state['config_hash']}, "
            f"this job has {cfg_hash}: resume with the same config, or set dist.storage_path to a fresh directory"
        )
    check_world(state, game.student.zero_optimization_stage(), world()[1], directory)
    game.student.load_checkpoint(os.path.join(directory, "student"), tag=TAG)
    if state["generator"] is not None:
        game.inp.generator.load_state_dict(state["generator"])
        game.g_opt.load_state_dict(state["g_opt"])
        game.g_sched.load_state_dict(state["g_sched"])
    torch.set_rng_state(state["rng"])
    return int(state["next_step"]), state["history"]


def check_world(state: dict[str, Any], stage: int, num_workers: int, directory: str) -> None:
    """A checkpoint resumes on the number of workers that wrote it (ZeRO 1-3 hold one partition per rank).

    Resuming on another count (DeepSpeed's universal checkpoints) is not supported yet.
    """
    saved = state.get("num_workers")
    if saved is None or saved == num_workers:
        return
    raise ConfigError(
        f"checkpoint in {directory} was written by {saved} workers (ZeRO-{stage}) and this job has "
        f"{num_workers}: resume with dist.num_workers: {saved}, or set dist.storage_path to a fresh directory "
        "to start over"
    )


def report(game: DistGame, next_step: int, cfg_hash: str, metrics: dict[str, float], history: dict) -> None:
    """Save a checkpoint into a temp dir and hand it to Ray Train with ``metrics`` (all ranks)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="zsaq-ckpt-") as d:
        save(game, next_step, cfg_hash, d, history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def resume(game: DistGame, cfg_hash: str) -> tuple[int, dict | None]:
    """(step to start from, history so far): (0, None), or what the checkpoint Ray Train restored holds."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, None
    with ckpt.as_directory() as d:
        return load(game, cfg_hash, d)
