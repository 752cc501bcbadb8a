"""Checkpoints of a worker: student engine (ZeRO partitions), generator, optimizers, RNG, step, config hash.

Every rank writes its own files into a local directory and hands it to
``ray.train.report``; Ray merges the ranks' files into one checkpoint
directory in ``RunConfig.storage_path``. On restart, each rank reads that
directory back from ``ray.train.get_checkpoint()``.

Layout: ``student/`` (``engine.save_checkpoint``, tag ``ckpt``) and
``zsaq_state.pt`` from rank 0 (generator, its optimizer and schedule, the seed picker's KLs, RNG,
next step, config hash, worker count). A checkpoint whose config hash differs
is refused.

A job may resume on another number of workers (a rerun after losing a node, or
on a bigger cluster): the sample indexing makes the trajectory independent of
the worker count, and a ZeRO 1-3 checkpoint, which holds one partition per
rank, is converted once per host into DeepSpeed's *universal* format
(``deepspeed.checkpoint.ds_to_universal``) and loaded by an engine built with
``checkpoint.load_universal``. ZeRO-0 state is replicated and loads as is.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zsaq_dist.config import Config
from zsaq_dist.dist.engines import all_gather, world
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
        "picker": game.inp.picker.state_dict() if game.inp.picker is not None else None,
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
    student = os.path.join(directory, "student")
    if game.student.load_universal_checkpoint():
        with tempfile.TemporaryDirectory(prefix="zsaq-universal-") as tmp:
            game.student.load_checkpoint(_universal_per_host(os.path.join(student, TAG), tmp), tag=TAG)
            _barrier()  # the host's converted copy is removed once every rank of the host has read it
    else:
        game.student.load_checkpoint(student, tag=TAG)
    if state["generator"] is not None:
        game.inp.generator.load_state_dict(state["generator"])
        game.g_opt.load_state_dict(state["g_opt"])
        game.g_sched.load_state_dict(state["g_sched"])
    if state.get("picker") is not None:
        game.inp.picker.load_state_dict(state["picker"])
    torch.set_rng_state(state["rng"])
    return int(state["next_step"]), state["history"]


def needs_universal(saved: dict[str, Any] | None, cfg: Config) -> bool:
    """Whether the restored checkpoint's ``saved`` state was written by another worker count at ZeRO 1-3."""
    if saved is None or cfg.dist.zero_stage == 0:
        return False
    return saved.get("num_workers", world()[1]) != world()[1]


def to_universal(src: str, dst: str) -> None:
    """Convert the ZeRO checkpoint folder ``src`` (one tag) into a universal checkpoint folder ``dst``."""
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(
        input_folder=src,
        output_folder=dst,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # ZeRO 1-2 checkpoints lack the (here trivial) tensor-parallel layout
    )
    main(args)


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _universal_per_host(src: str, tmp: str) -> str:
    """The first rank of each host converts ``src`` into its ``tmp``; returns this host's converted folder's parent."""
    rank, _ = world()
    hosts = all_gather(socket.gethostname())
    leader = hosts.index(hosts[rank])
    if rank == leader:
        to_universal(src, os.path.join(tmp, TAG))
    return all_gather(tmp if rank == leader else None)[leader]


def report(game: DistGame, next_step: int, cfg_hash: str, metrics: dict[str, float], history: dict) -> None:
    """Save a checkpoint into a temp dir and hand it to Ray Train with ``metrics`` (all ranks)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="zsaq-ckpt-") as d:
        save(game, next_step, cfg_hash, d, history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def restored() -> dict[str, Any] | None:
    """The ``zsaq_state.pt`` of the checkpoint Ray Train restores this run from, or None.

    Read alone (not the whole checkpoint), to decide how to build the student engine before loading.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.filesystem.open_input_file(f"{ckpt.path}/{STATE}") as f:
        return torch.load(f, weights_only=False)


def resume(game: DistGame, cfg_hash: str, saved: dict[str, Any] | None) -> tuple[int, dict | None]:
    """(step to start from, history so far): (0, None), or what the checkpoint Ray Train restored holds."""
    import ray.train

    ckpt = ray.train.get_checkpoint() if saved is not None else None
    if ckpt is None:
        return 0, None
    with ckpt.as_directory() as d:
        return load(game, cfg_hash, d)
