"""Output locations: a local path or any fsspec URI (``s3://``, ``gs://``, ``memory://``, ``file://``).

Completion rule. Local directories are written into a sibling ``OUT.tmp-*``
and renamed to ``OUT`` when complete, so ``OUT`` either exists whole or not at
all. Object stores have no atomic directory rename: files are written directly
under the target and ``manifest.json`` is written LAST, as the completion
marker. A directory without ``manifest.json`` is incomplete (:func:`is_complete`);
readers must not load it.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "manifest.json"


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or an fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk, where a directory rename is atomic."""
    return isinstance(fs, LocalFileSystem)


def join(path: str, *names: str) -> str:
    """Join with ``/`` (fsspec paths use ``/`` on every filesystem)."""
    return "/".join([path.rstrip("/"), *names])


def is_complete(uri: str) -> bool:
    """True if ``uri`` is a checkpoint directory whose export finished (it holds ``manifest.json``)."""
    fs, path = resolve(uri)
    return fs.isfile(join(path, MANIFEST))


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON (what ``save_pretrained`` writes for configs)."""
    with fs.open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Read a JSON file."""
    with fs.open(path, "r") as f:
        return json.load(f)


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` recursively if it exists (best effort: cleanup must not mask the original error)."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError:
        pass
