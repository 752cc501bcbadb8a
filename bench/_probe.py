"""What the demo-model probes share (``sam_space.py``, ``ascent_probe.py``, ``warmup_edges.py``).

:func:`demo_config`: the benchmark recipe (``configs/bench-quality.yaml``) on the demo model at W4 g64, with a
probe's own overrides. :func:`main`: a probe's command line around its ``measure`` / ``table`` / ``plot``: with
``--table JSON`` only the Markdown table of a result file, else measure and write the JSON (machine, date,
command, setting, arguments, results) and its PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def demo_config(symmetric: bool, overrides: list[str]):
    """The benchmark recipe on the demo model, W4 g64 (symmetric or not), then ``overrides``."""
    from zsaq_dist.config import load_config
    from zsaq_dist.io.demo import fetch_demo_model

    base = [
        f"model.path={fetch_demo_model(quiet=True)}",
        "quant.weights.bits=4",
        "quant.weights.group_size=64",
        f"quant.weights.symmetric={str(symmetric).lower()}",
        "output.dir=/tmp/unused",
    ]
    return load_config(ROOT / "configs" / "bench-quality.yaml", base + overrides)


def _accelerator() -> str:
    """The first GPU's name where torch sees one (a probe's Ray workers may use it), else "cpu"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(
    p: argparse.ArgumentParser,
    name: str,
    measure: Callable[[argparse.Namespace], dict],
    table: Callable[[dict], str],
    plot: Callable[[dict, Path], None],
    check: Callable[[argparse.Namespace], str | None] = lambda args: None,
) -> None:
    """Parse ``p`` (plus ``--symmetric``, ``--out``, ``--table``), then run the probe ``bench/{name}.py``."""
    p.add_argument("--symmetric", action="store_true", help="W4 g64 symmetric (default: asymmetric)")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"))
    p.add_argument("--table", metavar="JSON", help="only print the Markdown table of a result file")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if (err := check(args)) is not None:
        p.error(err)
    from zsaq_dist.job import machine_line

    result = {
        "machine": machine_line(_accelerator()),
        "date": dt.date.today().isoformat(),
        "command": shlex.join(["python", f"bench/{name}.py", *sys.argv[1:]]),
        "setting": f"w4g64-{'sym' if args.symmetric else 'asym'}",
        "args": vars(args),
        **measure(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and .png")
