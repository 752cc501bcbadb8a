"""What the student's autograd graph keeps for the backward, next to the size of its parameters.

    python bench/activation_memory.py                      # demo model, W4 g64, batch 1 x 64
    python bench/activation_memory.py --batch 4 --seq-len 64
    python bench/activation_memory.py --recompute          # method.recompute_fake_quant: true

Fake-quant training keeps several weight-sized tensors per QuantLinear until the
backward (the scaled weight for the clamp mask, the integer codes, the
dequantized weight for the matmul), for every layer at once. That memory scales
with the whole model, not with a ZeRO partition; this script measures it with
``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zsaq_dist import job
from zsaq_dist.config import validate
from zsaq_dist.minimax.student import freeze, make_student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:smollm2-135m-instruct")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--recompute", action="store_true", help="recompute the fake quantization in the backward")
    args = ap.parse_args()
    cfg = validate(
        {
            "model": {"path": args.model},
            "quant": {"weights": {"bits": args.bits, "group_size": args.group_size}},
            "output": {"dir": "unused"},
        }
    )
    teacher, _ = job.load_teacher(cfg, torch.device("cpu"))
    student = make_student(freeze(teacher), cfg.quant, learnable_scales=True, recompute=args.recompute)
    seen: set[tuple[int, int]] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            saved += t.untyped_storage().nbytes()
        return t

    vocab = student.config.vocab_size
    x = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student(input_ids=x)
    times = []
    for _ in range(4):  # forward + backward; the first one pays for allocations
        t0 = time.perf_counter()
        student(input_ids=x).logits.float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() * p.element_size() for p in student.parameters())
    mib = 1 << 20
    print(
        f"batch {args.batch}x{args.seq_len}, recompute={args.recompute}: saved for backward {saved / mib:.0f} MiB "
        f"({saved / params:.2f}x the student's {params / mib:.0f} MiB of parameters); "
        f"forward+backward {statistics.median(times[1:]):.2f} s (median of 3)"
    )


if __name__ == "__main__":
    main()
