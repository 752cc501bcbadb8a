"""Export a prepared (and trained) model as a sharded compressed-tensors checkpoint.

``export_checkpoint(model, tokenizer, cfg, report)`` writes ``cfg.output.dir``::

    config.json                       model config + quantization_config
    generation_config.json, tokenizer files
    model-0000k-of-0000N.safetensors  streamed one module at a time (see shards.py)
    model.safetensors.index.json
    zsaq_report.json                  the ``report`` dict
    manifest.json                     sha256 of every other file, written LAST

Local output goes to ``OUT.tmp-*`` and is renamed to ``OUT`` when complete;
an fsspec URI is written in place with ``manifest.json`` as the completion
marker (see fs.py). On any exception, what was written is removed.

The pieces are public so that the distributed export can run them per rank:
``module_tensors`` (with a ``gather`` context such as DeepSpeed's
``GatheredParameters`` and a ``keep`` filter for this rank's modules),
``ShardWriter``/``finalize_shards``, ``write_metadata`` and ``write_manifest``::

    fs, work = resolve(workdir)                      # rank 0 made it; all ranks see it
    w = ShardWriter(fs, work, cfg.output.max_shard_size, prefix=f"rank{rank:05d}")
    gather = lambda m: deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)))
    for _, t in module_tensors(model, gather=gather, keep=lambda i, n: i % world == rank):
        w.add(t)
    w.close(); barrier()
    if rank == 0:
        finalize_shards(fs, work, [f"rank{r:05d}" for r in range(world)])
        write_metadata(fs, work, model, tokenizer, cfg, report, extra_files); write_manifest(fs, work)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import fsspec
import torch
from torch import nn
from tqdm.auto import tqdm

from zsaq_dist.config import Config
from zsaq_dist.errors import ExportError
from zsaq_dist.io.compress import compress_linear, model_format, quantization_config
from zsaq_dist.io.fs import MANIFEST, is_local, join, remove_tree, resolve, write_json
from zsaq_dist.io.manifest import write_manifest
from zsaq_dist.io.shards import ShardWriter, finalize_shards
from zsaq_dist.quant import QuantLinear

REPORT = "zsaq_report.json"
Gather = Callable[[nn.Module], AbstractContextManager]
Keep = Callable[[int, str], bool]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl)
        return None


def _release_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``).

    The quantizer's per-layer temporaries (a few MB each) land on the brk heap
    between long-lived packed tensors; without trimming, the RSS of an export
    grows with the model (+263 MiB on a 706 MiB model) instead of staying
    about one shard (+69 MiB), see the export report.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _own_tensors(prefix: str, module: nn.Module, seen: set[int]) -> dict[str, torch.Tensor]:
    """A module's direct parameters and persistent buffers, skipping tensors already written (tied weights)."""
    out = {}
    items = list(module._parameters.items()) + [
        (k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set
    ]
    for name, t in items:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        out[f"{prefix}{name}"] = t.detach()
    return out


def module_tensors(
    model: nn.Module,
    fmt: str | None = None,
    gather: Gather | None = None,
    progress: bool = False,
    keep: Keep | None = None,
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield ``(module name, {state-dict key: tensor})`` in model order, QuantLinears compressed.

    A parameter shared by several modules (``tie_word_embeddings``) is written
    once, under its first name, which is what ``save_pretrained`` keeps.
    ``gather(module)`` is entered around EVERY module on every rank (ZeRO-3's
    ``GatheredParameters`` is a collective); ``keep(index, name)`` says which
    modules this rank writes, so the others are neither compressed nor copied.
    """
    fmt = fmt or model_format(model)
    seen: set[int] = set()
    modules = list(model.named_modules())
    for i, (name, mod) in enumerate(tqdm(modules, desc="export", unit="module", disable=not progress)):
        prefix = f"{name}." if name else ""
        mine = keep is None or keep(i, name)
        with gather(mod) if gather is not None else contextlib.nullcontext():
            if isinstance(mod, QuantLinear):
                seen.update(id(p) for p in mod.parameters(recurse=False))
                tensors = {prefix + k: t for k, t in compress_linear(mod, fmt).items()} if mine else {}
                _release_heap()
            else:
                tensors = _own_tensors(prefix, mod, seen)  # references; marks tied tensors on every rank
                tensors = tensors if mine else {}
            if gather is not None:  # gathered storage is freed when the context exits
                tensors = {k: t.clone() for k, t in tensors.items()}
        if tensors:
            yield name, tensors


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def config_dict(model: nn.Module, observer: str = "minmax") -> dict[str, Any]:
    """``config.json`` content: what ``save_pretrained`` writes plus ``quantization_config``."""
    d = model.config.to_diff_dict()
    d["architectures"] = [type(model).__name__]
    d["dtype"] = str(_model_dtype(model)).removeprefix("torch.")
    d["quantization_config"] = quantization_config(model, observer)
    return d


def _put_tokenizer(fs: fsspec.AbstractFileSystem, dir: str, tokenizer: Any) -> None:
    if is_local(fs):
        tokenizer.save_pretrained(dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            fs.put_file(os.path.join(tmp, name), join(dir, name))


def write_metadata(
    fs: fsspec.AbstractFileSystem,
    dir: str,
    model: nn.Module,
    tokenizer: Any,
    cfg: Config,
    report: dict,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write config.json, generation_config.json, tokenizer files, zsaq_report.json and ``extra_files`` into ``dir``."""
    write_json(fs, join(dir, "config.json"), config_dict(model, cfg.quant.weights.observer))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        write_json(fs, join(dir, "generation_config.json"), gen.to_diff_dict())
    if tokenizer is not None:
        _put_tokenizer(fs, dir, tokenizer)
    with fs.open(join(dir, REPORT), "w") as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
    for name, data in (extra_files or {}).items():
        with fs.open(join(dir, name), "wb") as f:
            f.write(data)


def check_target(fs: fsspec.AbstractFileSystem, target: str, overwrite: bool) -> None:
    if fs.exists(target) and not fs.isdir(target):
        raise ExportError(f"output.dir {target} is a file: choose a directory path for output.dir")
    if fs.exists(target) and not overwrite:
        raise ExportError(
            f"output.dir {target} already exists: set output.overwrite: true to replace it, "
            "or choose another output.dir"
        )


def _clear_remote(fs: fsspec.AbstractFileSystem, target: str) -> None:
    """overwrite=True on an object store (no atomic swap): drop the completion marker first, then the rest."""
    try:
        if fs.isfile(join(target, MANIFEST)):
            fs.rm(join(target, MANIFEST))
        fs.rm(target, recursive=True)
    except OSError as err:
        raise ExportError(f"cannot remove the previous checkpoint at {target} ({err}): remove it by hand") from err


def swap_in(work: str, target: str) -> None:
    """Rename ``work`` to ``target``; an existing ``target`` is replaced only once ``work`` is complete."""
    if not os.path.exists(target):
        os.rename(work, target)  # atomic on one filesystem
        return
    old = f"{target}.old-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(work, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _export_error(err: BaseException, work: str) -> ExportError | None:
    """Map disk errors (incl. safetensors' own IO errors) to an ExportError that names the fix."""
    disk = isinstance(err, OSError) or type(err).__name__ == "SafetensorError"
    if disk and (getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)):
        return ExportError(f"no space left on the device while writing {work}: free space or choose another output.dir")
    if isinstance(err, OSError):
        return ExportError(f"writing {work} failed ({err}): check that output.dir is writable, or choose another")
    return None


def export_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    cfg: Config,
    report: dict,
    progress: bool = True,
    gather: Gather | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> str:
    """Write the compressed-tensors checkpoint of a prepared ``model`` to ``cfg.output.dir``; returns its path."""
    fs, target = resolve(cfg.output.dir)
    local = is_local(fs)
    check_target(fs, target, cfg.output.overwrite)
    fmt = model_format(model)
    work = f"{target}.tmp-{secrets.token_hex(4)}" if local else target
    if not local and fs.exists(target):
        _clear_remote(fs, target)
    try:
        writer = ShardWriter(fs, work, cfg.output.max_shard_size)
        for _, tensors in module_tensors(model, fmt, gather, progress):
            writer.add(tensors)
        writer.close()
        finalize_shards(fs, work)
        write_metadata(fs, work, model, tokenizer, cfg, report, extra_files)
        write_manifest(fs, work)
        if local:
            swap_in(work, target)
    except BaseException as err:
        remove_tree(fs, work)
        mapped = _export_error(err, work)
        if mapped is not None:
            raise mapped from err
        raise
    return target if local else cfg.output.dir
