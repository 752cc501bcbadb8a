#!/usr/bin/env python3
"""Quantize every model under a root that has no quantized sibling yet (the scheduled batch step).

    python launch/batch_quantize.py --models /mnt/models --config configs/quickstart.yaml \
        --suffix=-w4g64 [--out-root s3://bucket/quantized] [--set k=v ...] [--max-models N] [--dry-run]

A model is a directory holding ``config.json`` (a Hugging Face checkpoint) or a ``.gguf`` file.
Its output is ``<out-root>/<name><suffix>`` (``out-root`` defaults to ``--models``, so the
checkpoint lands next to its source). A model is pending when that output does not exist; the
export writes ``OUT.tmp-*`` and renames it to ``OUT`` only when complete, so an interrupted run
is simply retried next time. Roots may be local paths or fsspec URIs (``s3://``, ``gs://``, with
the matching fsspec backend installed).

Each model runs as its own ``zsaq quantize`` process (inside a Ray job its driver inherits the
job's cluster address), so one failure does not stop the others; the exit status is 1 if any
model failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass

import fsspec


@dataclass(frozen=True)
class Pending:
    """One model to quantize and where its checkpoint goes."""

    source: str
    output: str


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _names(root: str) -> dict[str, str]:
    """Entries directly under ``root``: name -> fsspec type ("directory" or "file")."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] for e in fs.ls(path, detail=True)}


def _is_model(root: str, name: str, kind: str) -> bool:
    if kind == "file":
        return name.endswith(".gguf")
    fs, path = fsspec.core.url_to_fs(_join(root, name))
    return fs.isfile(f"{path}/config.json")


def find_pending(models: str, suffix: str, out_root: str | None = None) -> list[Pending]:
    """Models under ``models`` whose ``<out_root>/<stem><suffix>`` does not exist, sorted by name."""
    if not suffix:
        raise ValueError("suffix must be non-empty, e.g. -w4g64, or outputs would overwrite their sources")
    out_root = out_root or models
    entries = _names(models)
    existing = set(_names(out_root)) if out_root != models else set(entries)
    pending = []
    for name, kind in sorted(entries.items()):
        stem = name.removesuffix(".gguf")
        # Skip outputs of earlier runs (complete or in progress) so they are never re-quantized.
        if stem.endswith(suffix) or ".tmp-" in name or not _is_model(models, name, kind):
            continue
        if stem + suffix not in existing:
            pending.append(Pending(_join(models, name), _join(out_root, stem + suffix)))
    return pending


def quantize_command(zsaq: str, config: str, item: Pending, sets: list[str]) -> list[str]:
    """The ``zsaq quantize`` argv for one model; user overrides come last so they win."""
    cmd = [zsaq, "quantize", config, "--set", f"model.path={item.source}", "--set", f"output.dir={item.output}"]
    for kv in sets:
        cmd += ["--set", kv]
    return cmd


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="directory or fsspec URI holding one model per entry")
    p.add_argument("--config", required=True, help="zsaq recipe YAML, e.g. configs/quickstart.yaml")
    p.add_argument(
        "--suffix",
        required=True,
        help="appended to the model name for its output; write --suffix=-w4g64 (the = keeps the dash)",
    )
    p.add_argument("--out-root", default=None, help="where outputs go (default: next to the models)")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="extra overrides for every model"
    )
    p.add_argument("--max-models", type=int, default=None, help="quantize at most this many per run")
    p.add_argument("--zsaq", default="zsaq", help="the zsaq executable")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Quantize the pending models one after another; 1 if any failed."""
    args = _parse(argv)
    try:
        pending = find_pending(args.models, args.suffix, args.out_root)
    except ValueError as err:
        print(f"batch_quantize: {err}", file=sys.stderr)
        return 2
    pending = pending[: args.max_models] if args.max_models is not None else pending
    print(f"batch_quantize: {len(pending)} model(s) to quantize under {args.models}", flush=True)
    failed = []
    for item in pending:
        cmd = quantize_command(args.zsaq, args.config, item, args.sets)
        print("+ " + shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(item.source)
    for src in failed:
        print(f"batch_quantize: FAILED {src}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
