"""How hard the generator's inputs get: held-out KL of the student against the teacher as the generator ascends.

    python bench/ascent_probe.py           # -> bench/results/ascent_probe.json + ascent_probe.png
    python bench/ascent_probe.py --table bench/results/ascent_probe.json   # its Markdown table again

On the demo model's RTN-initialised student (W4 g64 asymmetric by default), held fixed, and the
benchmark's own zero-shot seed sequences (``configs/bench-quality.yaml``: 32 x 64 tokens, seed 0,
the cached set ``bench/quality.py`` trains on), for each generator learning rate it builds the
generator exactly as a ``zsaq`` run does (``torch.manual_seed(seed)`` then
:class:`zsaq_dist.minimax.trainer.Inputs`) and takes the ascent steps of the game
(:meth:`zsaq_dist.minimax.trainer.Game.generator_step`: batch ``k``'s seeds, fresh noise), the
student never stepping. Every ``--every`` steps it records the KL on held-out batches (student
steps 200 and 201 of the game's numbering: other noise, seed sequences the probe's ascent steps
also see), for the seed text itself (``clean``: what ``self_sample`` trains on) and for the
generator's inputs. The first generator row (0 steps) is what ``ascent=false`` trains on.

It answers one question: does the generator, at a given lr and radius, actually find inputs on which
the student disagrees more with the teacher within a game's budget of ascent steps?
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _probe  # bench/_probe.py, beside this script
import torch

HELD_OUT = (200, 201)


def held_out_kl(teacher, student, inp, clean: bool) -> float:
    """Mean KL(T || S) over the held-out batches: on the seed text, or on the generator's inputs."""
    from zsaq_dist.minimax.generator import STREAM_STUDENT
    from zsaq_dist.minimax.step import student_loss, teacher_targets
    from zsaq_dist.minimax.trainer import batch_indices

    m, kls = inp.cfg, []
    for s in HELD_OUT:
        idx = batch_indices(s, m.batch_size)
        with torch.no_grad():
            e = inp.seed_embeds(idx, s)
            x = e if clean else inp.generator(inp.noise(s, idx, STREAM_STUDENT, e), e)
            kls.append(student_loss(student, x, teacher_targets(teacher, x, m), m)[1]["kl"])
    return sum(kls) / len(kls)


def measure(args: argparse.Namespace) -> dict:
    from zsaq_dist.job import build_student, load_teacher
    from zsaq_dist.minimax.student import freeze, set_trainable
    from zsaq_dist.minimax.trainer import Game, Inputs, batch_indices, load_seed_ids

    def config(lr: float):
        return _probe.demo_config(
            args.symmetric,
            [
                f"method.steps={args.game_steps}",
                f"method.batch_size={args.batch_size}",
                f"method.seq_len={args.seq_len}",
                f"method.seed_data.num_sequences={args.num_sequences}",
                f"method.seed={args.seed}",
                f"method.generator.lr={lr}",
                f"method.generator.radius={args.radius}",
                "method.block_warmup_steps=0",
            ],
        )

    cfg = config(args.lrs[0])
    teacher, tokenizer = load_teacher(cfg, torch.device("cpu"))
    student = build_student(teacher, cfg)  # never stepped: the generator's steps leave it as it is
    freeze(teacher)
    set_trainable(student, cfg.method.learnable_scales)
    seed_ids = load_seed_ids(teacher, None, tokenizer, cfg.method)
    runs = []
    for lr in args.lrs:
        m = config(lr).method
        torch.manual_seed(m.seed)  # as trainer.train does before it builds the generator
        inp = Inputs(teacher, "adversarial", m, seed_ids)
        game = Game(teacher, student, inp)
        t0 = time.perf_counter()
        clean = held_out_kl(teacher, student, inp, True)
        curve = [{"step": 0, "kl": held_out_kl(teacher, student, inp, False), "gen_kl": None}]
        for k in range(args.steps):
            g = game.generator_step(k, batch_indices(k, m.batch_size))
            if (k + 1) % args.every == 0 or k + 1 == args.steps:
                kl = held_out_kl(teacher, student, inp, False)
                curve.append({"step": k + 1, "kl": kl, "gen_kl": g["gen_kl"], "r_nat": g["r_nat"]})
                print(f"lr {lr:g} step {k + 1}: held-out KL {kl:.4f} (seed text {clean:.4f})", flush=True)
        runs.append({"lr": lr, "clean_kl": clean, "curve": curve, "seconds": round(time.perf_counter() - t0, 1)})
    return {"runs": runs}


def table(result: dict) -> str:
    steps = [p["step"] for p in result["runs"][0]["curve"]]
    lines = [
        "| generator lr | seed text | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for r in result["runs"]:
        c = r["clean_kl"]
        cells = [f"{p['kl']:.4f} ({p['kl'] / c - 1:+.0%})" for p in r["curve"]]
        lines.append(f"| {r['lr']:g} | {c:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for r in result["runs"]:
        ax.plot([p["step"] for p in r["curve"]], [p["kl"] for p in r["curve"]], marker=".", label=f"lr {r['lr']:g}")
    ax.axhline(result["runs"][0]["clean_kl"], color="gray", ls="--", label="seed text (self_sample)")
    ax.set(xlabel="generator ascent steps (student fixed)", ylabel="held-out KL(T || S)")
    ax.set_title(
        f"{result['setting']}, radius {result['args']['radius']}, {result['date']}, {result['machine']}", fontsize=8
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--steps", type=int, default=20, help="ascent steps per lr")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--game-steps", type=int, default=40, help="the game's length, which sets the generator's schedule")
    p.add_argument("--radius", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-sequences", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    _probe.main(p, "ascent_probe", measure, table, plot)


if __name__ == "__main__":
    main()
