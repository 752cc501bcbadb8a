"""Parallel, streamed export of the student engine's module: one layer gathered at a time.

Every rank walks every module in the same order (under ZeRO-3 the gather is a
collective); module ``i`` is compressed and written only by rank ``i mod N``
into its own shard files. Rank 0 then numbers the parts into
``model-0000k-of-0000N.safetensors``, writes the index, config, tokenizer,
report and manifest, and renames the work dir into place. The tensors are the
ones a single-process export of the same weights writes (``io.export``).
"""

from __future__ import annotations

import secrets
from typing import Any

import torch.distributed as dist
from torch import nn

from zsaq_dist.config import Config
from zsaq_dist.dist.engines import broadcast, world
from zsaq_dist.errors import ExportError
from zsaq_dist.io.compress import model_format
from zsaq_dist.io.export import check_target, swap_in, module_tensors, write_metadata
from zsaq_dist.io.fs import is_local, remove_tree, resolve
from zsaq_dist.io.manifest import write_manifest
from zsaq_dist.io.shards import ShardWriter, finalize_shards


def _gather_fn(zero_stage: int):
    """ZeRO-3 gathers a module's own parameters around its export; other stages hold them already."""
    if zero_stage != 3:
        return None
    import deepspeed

    return lambda m: deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)))


def _work_dir(cfg: Config) -> str:
    """Rank 0 checks the target and names the work dir; every rank gets the name, or the same error."""
    rank, _ = world()
    work, error = None, None
    if rank == 0:
        try:
            fs, target = resolve(cfg.output.dir)
            check_target(fs, target, cfg.output.overwrite)
            work = f"{target}.tmp-{secrets.token_hex(4)}" if is_local(fs) else target
            fs.makedirs(work, exist_ok=True)
        except ExportError as err:  # the other ranks would wait in the broadcast forever
            error = str(err)
    work, error = broadcast((work, error))
    if error is not None:
        raise ExportError(error)
    return work


def export_parallel(
    model: nn.Module, tokenizer: Any, cfg: Config, report: dict, extra_files: dict[str, bytes] | None = None
) -> str:
    """Write the checkpoint of ``model`` (an engine's module) from all ranks; returns the output path."""
    rank, n = world()
    work = _work_dir(cfg)
    fs, target = resolve(cfg.output.dir)
    try:
        writer = ShardWriter(fs, work, cfg.output.max_shard_size, prefix=f"rank{rank:05d}")
        keep = (lambda i, _name: i % n == rank) if n > 1 else None
        for _, tensors in module_tensors(model, model_format(model), _gather_fn(cfg.dist.zero_stage), keep=keep):
            writer.add(tensors)
        writer.close()
        if n > 1:
            dist.barrier()
        if rank == 0:
            finalize_shards(fs, work, [f"rank{r:05d}" for r in range(n)])
            write_metadata(fs, work, model, tokenizer, cfg, report, extra_files)
            write_manifest(fs, work)
            if is_local(fs):
                swap_in(work, target)
    except BaseException:
        if rank == 0:
            remove_tree(fs, work)
        raise
    if n > 1:
        dist.barrier()
    return target if is_local(fs) else cfg.output.dir
