"""Where SAM's perturbation lands: on the latent weights, ``Q(w + e)``, or after the quantizer, ``Q(w) + e``.

    python bench/sam_space.py            # -> bench/results/sam_space.json + sam_space.png
    python bench/sam_space.py --table bench/results/sam_space.json   # its Markdown table again

On the demo model's RTN-initialised student (the start of every ``zsaq`` run) and
the benchmark's own zero-shot seed sequences (``configs/bench-quality.yaml``: 32 x 64
tokens, seed 0; the same cached set ``bench/quality.py`` trains on), for each batch
and radius ``rho`` it takes ``g`` at ``w``, ``e = rho * g / ||g||`` (SAM's step, as
``zsaq_dist.optim.sam`` computes it) and records:

- ``codes_flipped``: integer codes that differ between ``Q(w + e)`` and ``Q(w)``;
- ``loss_latent``: the loss at ``Q(w + e)`` (``method.sam_space: latent``);
- ``loss_quantized``: the loss at ``Q(w) + e`` (``method.sam_space: quantized``, SAQ);
- ``loss_first_order``: ``L(w) + rho * ||g||``, what a smooth loss would give for small ``rho``.

and once, ``codes_at_ties``: weights whose scaled value ``w / s + zp`` is within 1e-6 of a
rounding midpoint at the start. The demo teacher is dequantized from a Q4_1 GGUF (4-bit,
groups of 32), so its weights sit on a grid and many land exactly on midpoints of the g64
grid; any perturbation of the right sign flips those, whatever ``rho``.

SAM's second pass should see the sharpness of the loss. Where ``loss_latent`` sits
far above the first-order value while ``loss_quantized`` sits on it, what the
latent perturbation measures is mostly the jump of the rounded codes it flips.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _probe  # bench/_probe.py, beside this script
import torch


def measure(args: argparse.Namespace) -> dict:
    from zsaq_dist.io.load import load_model
    from zsaq_dist.minimax.step import seed_embeddings, student_loss, teacher_targets
    from zsaq_dist.minimax.student import freeze, make_student, student_params
    from zsaq_dist.minimax.trainer import load_seed_ids
    from zsaq_dist.optim.sam import EPS, global_norm
    from zsaq_dist.quant import quant_modules

    cfg = _probe.demo_config(
        args.symmetric,
        [
            f"method.seq_len={args.seq_len}",
            f"method.seed_data.num_sequences={args.num_sequences}",
            f"method.seed={args.seed}",
        ],
    )
    m = cfg.method
    teacher, tokenizer = load_model(cfg.model)
    freeze(teacher)
    student = make_student(teacher, cfg.quant, m.learnable_scales)
    weights, _ = student_params(student)
    mods = [q for _, q in quant_modules(student)]
    ids = load_seed_ids(teacher, None, tokenizer, m)
    ties = 0
    with torch.no_grad():
        for q in mods:
            v = q.weight.reshape(*q.weight_scale.shape, -1) / q.weight_scale.unsqueeze(-1)
            if q.weight_zero_point is not None:
                v = v + q.weight_zero_point.unsqueeze(-1).float()
            ties += int(((v - v.floor() - 0.5).abs() < 1e-6).sum())
    rows = []
    for b in range(args.batches):
        x = seed_embeddings(teacher, ids[b * args.batch_size : (b + 1) * args.batch_size])
        target = teacher_targets(teacher, x, m)
        for p in weights:
            p.grad = None
        loss, _ = student_loss(student, x, target, m)
        loss.backward()
        grads = [p.grad for p in weights]
        norm = float(global_norm(weights, grads))
        with torch.no_grad():
            codes = [q.int_weight() for q in mods]
            for rho in args.rhos:
                scale = rho / (norm + EPS)
                flipped, saved = 0, [q.weight.clone() for q in mods]
                for q, c in zip(mods, codes, strict=True):
                    q.weight.add_(q.weight.grad * scale)
                    flipped += int((q.int_weight() != c).sum())
                loss_latent = float(student_loss(student, x, target, m)[0])
                for q, w in zip(mods, saved, strict=True):  # exact restore (w + e - e need not be w)
                    q.weight.copy_(w)
                del saved
                for q in mods:
                    q.sam_delta = q.weight.grad * scale
                loss_q = float(student_loss(student, x, target, m)[0])
                for q in mods:
                    q.sam_delta = None
                rows.append(
                    {
                        "batch": b,
                        "rho": rho,
                        "grad_norm": norm,
                        "loss": float(loss),
                        "codes_flipped": flipped,
                        "codes": sum(c.numel() for c in codes),
                        "loss_latent": loss_latent,
                        "loss_quantized": loss_q,
                        "loss_first_order": float(loss) + rho * norm,
                    }
                )
                print(
                    f"batch {b} rho {rho}: loss {float(loss):.4f} -> latent {loss_latent:.4f}, quantized {loss_q:.4f}"
                    f", first order {float(loss) + rho * norm:.4f}; {flipped} codes flipped",
                    flush=True,
                )
    summary = {}
    for rho in args.rhos:
        rs = [r for r in rows if r["rho"] == rho]
        summary[str(rho)] = {
            k: sum(r[k] for r in rs) / len(rs)
            for k in ("loss", "loss_latent", "loss_quantized", "loss_first_order", "codes_flipped")
        }
    return {"codes_at_ties": ties, "rows": rows, "mean_over_batches": summary}


def table(result: dict) -> str:
    """The means over batches as a Markdown table (what bench/README.md shows)."""
    lines = [
        "| rho | loss | latent: Q(w + e) | quantized: Q(w) + e | first order | codes flipped (latent) |",
        "|---|---|---|---|---|---|",
    ]
    for rho, v in result["mean_over_batches"].items():
        lines.append(
            f"| {rho} | {v['loss']:.4f} | {v['loss_latent']:.4f} | {v['loss_quantized']:.4f} "
            f"| {v['loss_first_order']:.4f} | {v['codes_flipped']:.0f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["mean_over_batches"]
    rhos = [float(r) for r in s]
    fig, ax = plt.subplots(figsize=(6, 4))
    base = [s[str(r)]["loss"] for r in rhos]
    for key, label in (
        ("loss_latent", "latent: Q(w + e)"),
        ("loss_quantized", "quantized: Q(w) + e"),
        ("loss_first_order", "first order: L + rho ||g||"),
    ):
        ax.plot(rhos, [s[str(r)][key] - b for r, b in zip(rhos, base, strict=True)], marker="o", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="SAM radius rho",
        ylabel="loss increase at the perturbed point",
        title=f"SAM perturbation, SmolLM2-135M student at RTN init ({result['date']})",
    )
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rhos", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1])
    p.add_argument("--batches", type=int, default=4, help="batches of the seed set, each measured at every rho")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-sequences", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)

    def check(args: argparse.Namespace) -> str | None:
        if args.batches * args.batch_size > args.num_sequences:
            return "--batches x --batch-size must fit in --num-sequences"
        return None

    _probe.main(p, "sam_space", measure, table, plot, check)


if __name__ == "__main__":
    main()
