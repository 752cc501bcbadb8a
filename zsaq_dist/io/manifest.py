"""``manifest.json``: sha256 and size of every file of a checkpoint, written LAST.

Its presence marks a finished export (see :mod:`zsaq_dist.io.fs`);
:func:`verify_checkpoint` re-hashes every listed file. Files present but not
listed (a README added later, editor droppings) cannot make a listed file
wrong, so they are returned under ``unlisted`` and are an error only with
``strict=True``.
"""

from __future__ import annotations

import hashlib

import fsspec

from zsaq_dist.errors import VerifyError
from zsaq_dist.io.fs import MANIFEST, join, read_json, resolve, write_json

_CHUNK = 8 << 20
_FORMAT = "zsaq-manifest/1"


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Hex sha256 of a file, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _relative_files(fs: fsspec.AbstractFileSystem, dir: str) -> list[str]:
    root = dir.rstrip("/") + "/"
    return sorted(p[len(root) :] for p in fs.find(dir) if p.startswith(root))


def write_manifest(fs: fsspec.AbstractFileSystem, dir: str) -> dict:
    """Hash every file under ``dir`` (recursively) and write ``manifest.json``; call it last."""
    files = {}
    for rel in _relative_files(fs, dir):
        if rel == MANIFEST:
            continue
        path = join(dir, rel)
        files[rel] = {"sha256": sha256_file(fs, path), "size": fs.size(path)}
    manifest = {"format": _FORMAT, "algorithm": "sha256", "files": files}
    write_json(fs, join(dir, MANIFEST), manifest)
    return manifest


def _fail(uri: str, what: str) -> VerifyError:
    return VerifyError(f"checkpoint {uri} is corrupt or incomplete: {what}; re-export it (zsaq export / zsaq quantize)")


def verify_checkpoint(path: str, strict: bool = False) -> dict:
    """Re-hash every file listed in ``manifest.json``; raise :class:`VerifyError` at the first bad or missing one.

    Returns ``{"path", "files", "bytes", "unlisted"}``. With ``strict``, files
    not in the manifest are an error too.
    """
    fs, dir = resolve(path)
    mpath = join(dir, MANIFEST)
    if not fs.isfile(mpath):
        raise _fail(path, f"{MANIFEST} is missing (the export did not finish)")
    try:
        manifest = read_json(fs, mpath)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise _fail(path, f"{MANIFEST} is not a valid manifest") from None
    total = 0
    for rel, entry in files.items():
        fpath = join(dir, rel)
        if not fs.isfile(fpath):
            raise _fail(path, f"{rel} is missing")
        size = fs.size(fpath)
        if size != entry["size"]:
            raise _fail(path, f"{rel} has {size} bytes, the manifest says {entry['size']}")
        if sha256_file(fs, fpath) != entry["sha256"]:
            raise _fail(path, f"{rel} does not match its sha256")
        total += size
    unlisted = [rel for rel in _relative_files(fs, dir) if rel != MANIFEST and rel not in files]
    if strict and unlisted:
        raise _fail(path, f"{unlisted[0]} is not in the manifest (remove it, or verify without strict)")
    return {"path": path, "files": len(files), "bytes": total, "unlisted": unlisted}
