"""Streaming safetensors shards: add tensors one module at a time, never hold the whole model.

One process::

    w = ShardWriter(fs, workdir, max_shard_size="2GB")
    for name, tensors in modules: w.add(tensors)      # full state-dict names
    w.close()
    finalize_shards(fs, workdir)                         # -> model-0000k-of-0000N.safetensors + index

Several ranks writing disjoint modules into the same directory::

    w = ShardWriter(fs, workdir, max_shard_size, prefix=f"rank{rank:05d}")
    ... w.add(...) for this rank's modules ...; w.close()
    barrier()
    if rank == 0: finalize_shards(fs, workdir, [f"rank{r:05d}" for r in range(world_size)])

Each writer writes parts ``{prefix}-00001.safetensors, ...`` and, on ``close``,
a sidecar ``{prefix}.parts.json`` listing its parts, keys and sizes.
``finalize_shards`` numbers all parts in prefix order (then part order),
renames them to ``model-0000k-of-0000N.safetensors``, writes
``model.safetensors.index.json`` and deletes the sidecars. Peak memory of a
writer is one shard of tensors (plus its serialized bytes on non-local
filesystems) and the module being added.
"""

from __future__ import annotations

import fsspec
import torch
from safetensors.torch import save, save_file
from transformers.utils.hub import convert_file_size_to_int

from zsaq_dist.errors import ExportError
from zsaq_dist.io.fs import is_local, join, read_json, write_json

INDEX = "model.safetensors.index.json"
_META = {"format": "pt"}  # transformers refuses safetensors files without it


def parse_size(size: int | str) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"1GiB"`` or an int (transformers' own parser)."""
    try:
        n = convert_file_size_to_int(size)
    except ValueError:
        raise ExportError(
            f"max_shard_size={size!r} is not a size: use an int of bytes or e.g. '2GB', '500MB'"
        ) from None
    if n <= 0:
        raise ExportError(f"max_shard_size={size!r} must be positive, e.g. '2GB'")
    return n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Collect tensors into safetensors parts of at most ``max_shard_size`` bytes (one module never splits)."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, dir: str, max_shard_size: int | str = "2GB", prefix: str = "part"
    ):
        if "/" in prefix or not prefix:
            raise ExportError(f"ShardWriter prefix {prefix!r} must be a plain file-name prefix such as 'rank00000'")
        self.fs, self.dir, self.prefix = fs, dir, prefix
        self.max_bytes = parse_size(max_shard_size)
        self.parts: list[dict] = []
        self._keys: set[str] = set()
        self._cur: dict[str, torch.Tensor] = {}
        self._cur_bytes = 0
        fs.makedirs(dir, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add one module's tensors (full names); flushes the current part first if they would not fit."""
        dup = next((k for k in tensors if k in self._keys), None)
        if dup is not None:
            raise ExportError(f"tensor {dup} was written twice: add each module once")
        size = sum(_nbytes(t) for t in tensors.values())
        if self._cur and self._cur_bytes + size > self.max_bytes:
            self.flush()
        for key, t in tensors.items():
            self._keys.add(key)
            self._cur[key] = t.detach().to("cpu").contiguous()
        self._cur_bytes += size

    def flush(self) -> None:
        """Write the current part to disk and forget its tensors."""
        if not self._cur:
            return
        name = f"{self.prefix}-{len(self.parts) + 1:05d}.safetensors"
        path = join(self.dir, name)
        if is_local(self.fs):
            save_file(self._cur, path, metadata=_META)
        else:
            self.fs.pipe_file(path, save(self._cur, metadata=_META))
        self.parts.append({"file": name, "keys": list(self._cur), "size": self._cur_bytes})
        self._cur, self._cur_bytes = {}, 0

    def close(self) -> list[dict]:
        """Flush the last part and write the ``{prefix}.parts.json`` sidecar; returns the parts."""
        self.flush()
        write_json(self.fs, join(self.dir, f"{self.prefix}.parts.json"), self.parts)
        return self.parts


def finalize_shards(fs: fsspec.AbstractFileSystem, dir: str, prefixes: list[str] | tuple[str, ...] = ("part",)) -> dict:
    """Rename every writer's parts to ``model-0000k-of-0000N.safetensors`` and write the index; returns it."""
    parts: list[dict] = []
    for prefix in prefixes:
        sidecar = join(dir, f"{prefix}.parts.json")
        if not fs.isfile(sidecar):
            raise ExportError(f"{sidecar} is missing: the writer with prefix {prefix!r} did not call close()")
        parts += read_json(fs, sidecar)
    if not parts:
        raise ExportError("no tensors were written: the model is empty or no module was added to a ShardWriter")
    n = len(parts)
    weight_map: dict[str, str] = {}
    for k, part in enumerate(parts, start=1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        fs.mv(join(dir, part["file"]), join(dir, final))
        for key in part["keys"]:
            if key in weight_map:
                raise ExportError(f"tensor {key} was written by two writers: give each rank disjoint modules")
            weight_map[key] = final
    index = {"metadata": {"total_size": sum(p["size"] for p in parts)}, "weight_map": weight_map}
    write_json(fs, join(dir, INDEX), index)
    for prefix in prefixes:
        fs.rm(join(dir, f"{prefix}.parts.json"))
    return index
