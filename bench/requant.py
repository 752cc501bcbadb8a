"""What re-quantizing an already quantized checkpoint with our observers costs (issue #3's GPTQ-start lever).

    python bench/requant.py --model bench/.work/runs/gptq-w4-272c3b31600f/model \\
        --teacher bench/.work/smollm2-fp32 --bits 4 --group-size 64 --symmetric \\
        --out bench/results/requant_gptq-self-w4g64.json

The lever "start the student from GPTQ run on the seed data instead of RTN" needs the student to
begin where the GPTQ checkpoint is. The student's scales come from an observer (min-max or MSE) run
on its starting weights. Loaded with ``zsaq_dist.io.load`` (decompressed to dense weights), a GPTQ
checkpoint's weights sit on GPTQ's grid, but the observer does not find that grid again: symmetric
int4 min-max sets ``s = max|w| / 7.5``, and on the grid ``max|w|`` is ``7 s`` or ``8 s``, never ``7.5 s``,
so every group gets another scale. This script scores, on the development text against the FP teacher (perplexity, KL, top-1):

- the checkpoint as loaded;
- the checkpoint re-quantized by each observer, as ``make_student`` would start from it,

and counts the weights that the re-quantization moves off the checkpoint's values. The model must
be a dense or compressed-tensors checkpoint of the teacher's architecture.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from zsaq_dist.config import ModelCfg, QuantCfg
from zsaq_dist.data.text import encode_text, load_eval_text, text_identity
from zsaq_dist.eval import evaluate
from zsaq_dist.io.load import load_model
from zsaq_dist.job import machine_line
from zsaq_dist.minimax.student import make_student
from zsaq_dist.quant.prepare import quant_modules


def moved(model: torch.nn.Module, student: torch.nn.Module) -> tuple[int, int]:
    """(weights whose re-quantized value differs from the checkpoint's, weights quantized)."""
    dense = dict(model.named_modules())
    diff = total = 0
    with torch.no_grad():
        for name, m in quant_modules(student):
            d = m.quantized_weight() != dense[name].weight
            diff += int(d.sum())
            total += d.numel()
    return diff, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the quantized checkpoint (dense or compressed-tensors)")
    p.add_argument("--teacher", required=True, help="the full-precision model it was made from")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--symmetric", action="store_true", help="default: asymmetric")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    t0 = time.perf_counter()
    teacher, tok = load_model(ModelCfg(path=args.teacher))
    model, _ = load_model(ModelCfg(path=args.model))
    ids = encode_text(tok, load_eval_text(), args.eval_tokens)
    fp = evaluate(teacher, ids, args.seq_len, progress=False)["ppl"]

    def row(name: str, m: torch.nn.Module, **extra) -> dict:
        r = evaluate(m, ids, args.seq_len, reference=teacher, progress=False)
        print(f"{name}: ppl {r['ppl']:.3f} (+{r['ppl'] - fp:.3f})", flush=True)
        return {"method": name, "ppl": r["ppl"], "dppl": r["ppl"] - fp, "kl": r["kl"], "top1": r["top1"], **extra}

    rows = [row("checkpoint as loaded", model)]
    for observer in ("minmax", "mse"):
        q = QuantCfg.model_validate(
            {
                "weights": {
                    "bits": args.bits,
                    "group_size": args.group_size,
                    "symmetric": args.symmetric,
                    "observer": observer,
                },
                "ignore": ["lm_head"],
            }
        )
        student = make_student(model, q)
        diff, total = moved(model, student)
        rows.append(row(f"re-quantized, {observer} observer", student, weights_moved=diff, weights=total))
    result = {
        "machine": machine_line("cpu"),
        "date": dt.date.today().isoformat(),
        "command": shlex.join(["python", "bench/requant.py", *sys.argv[1:]]),
        "model": args.model,
        "scheme": {"bits": args.bits, "group_size": args.group_size, "symmetric": args.symmetric},
        "eval": {"fp_ppl": fp, "tokens": int(ids.numel()), **text_identity(None, ids)},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and .png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(rows)), [r["dppl"] for r in rows], color="tab:blue", alpha=0.6)
    ax.set_xticks(range(len(rows)), [r["method"].replace(", ", "\n") for r in rows], fontsize=8)
    ax.set_ylabel("perplexity increase over FP")
    ax.set_title(f"{Path(result['model']).parent.name}: {result['scheme']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
