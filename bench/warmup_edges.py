"""The game's first steps after the block warm-up: codes flipped and the student's KL, with and without the margin.

    python bench/warmup_edges.py          # -> bench/results/warmup_edges.json + warmup_edges.png
    python bench/warmup_edges.py --table bench/results/warmup_edges.json   # its Markdown table again

On the demo model (W4 g64 asymmetric by default) and the benchmark's own zero-shot seed sequences
(``configs/bench-quality.yaml``: 32 x 64 tokens, seed 0; the cached set ``bench/quality.py`` trains
on), the block warm-up runs once with ``method.block_warmup_margin=0`` (its default steps and lr),
then for each margin the warmed student is settled (:meth:`QuantLinear.settle`, what the warm-up does
with that margin: codes unchanged) and takes the first ``--steps`` student steps of the game exactly as
a ``zsaq`` run does (:class:`zsaq_dist.minimax.trainer.Game`, lr 5e-5 with its warm-up, SAM, the
generator). After each step it records how many integer codes differ from the warm-up's and the KL of
the student against the teacher on the seed text of batch 0 (the first step's own batch).

It answers: does the end-to-end game start where the warm-up left the student, or do its first
(Adam-normalised, about ``lr`` for every weight) steps flip the codes the warm-up left on a bin's edge?
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import _probe  # bench/_probe.py, beside this script
import torch


def measure(args: argparse.Namespace) -> dict:
    from zsaq_dist.job import build_student, load_teacher
    from zsaq_dist.minimax.blockwise import block_warmup
    from zsaq_dist.minimax.step import student_loss, teacher_targets
    from zsaq_dist.minimax.student import freeze, set_trainable
    from zsaq_dist.minimax.trainer import Game, Inputs, batch_indices, load_seed_ids
    from zsaq_dist.quant import quant_modules

    cfg = _probe.demo_config(
        args.symmetric,
        [
            f"method.steps={args.game_steps}",
            "method.batch_size=4",
            "method.seq_len=64",
            "method.seed_data.num_sequences=32",
            f"method.seed={args.seed}",
            "method.lr=5e-5",
            "method.block_warmup_margin=0",
        ],
    )
    m = cfg.method
    teacher, tokenizer = load_teacher(cfg, torch.device("cpu"))
    freeze(teacher)
    warmed = build_student(teacher, cfg)
    set_trainable(warmed, m.learnable_scales)
    seed_ids = load_seed_ids(teacher, None, tokenizer, m)
    t0 = time.perf_counter()
    record = block_warmup(teacher, warmed, seed_ids, m, m.learnable_scales, progress=False)
    warm_seconds = time.perf_counter() - t0
    x0 = Inputs(teacher, "self_sample", m, seed_ids).seed_embeds(batch_indices(0, m.batch_size))  # the first batch
    target0 = teacher_targets(teacher, x0, m)

    def kl0(student) -> float:
        with torch.no_grad():
            return student_loss(student, x0, target0, m)[1]["kl"]

    runs = []
    for margin in args.margins:
        student = copy.deepcopy(warmed)
        mods = [q for _, q in quant_modules(student)]
        settled = sum(q.settle(margin) for q in mods) if margin > 0 else 0
        set_trainable(student, m.learnable_scales)
        codes = [q.int_weight() for q in mods]
        torch.manual_seed(m.seed)  # as trainer.train does before it builds the generator
        game = Game(teacher, student, Inputs(teacher, "adversarial", m, seed_ids))
        curve = [{"step": 0, "kl": kl0(student), "flipped": 0, "lr": 0.0}]
        for k in range(args.steps):
            _, _, lr = game.step(k)
            flipped = sum(int((q.int_weight() != c).sum()) for q, c in zip(mods, codes, strict=True))
            curve.append({"step": k + 1, "kl": kl0(student), "flipped": flipped, "lr": lr})
            print(f"margin {margin:g} step {k + 1}: KL {curve[-1]['kl']:.4f}, {flipped} codes flipped", flush=True)
        runs.append({"margin": margin, "settled": settled, "curve": curve})
    n_codes = sum(q.weight.numel() for _, q in quant_modules(warmed))
    return {
        "warmup": {k: v for k, v in record.items() if k != "layers"},
        "warmup_seconds": round(warm_seconds, 1),
        "codes": n_codes,
        "runs": runs,
    }


def table(result: dict) -> str:
    steps = [p["step"] for p in result["runs"][0]["curve"]]
    lines = [
        "| margin | weights moved | " + " | ".join(f"after {s} steps" if s else "warmed" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for r in result["runs"]:
        cells = [f"KL {p['kl']:.4f}" + (f", {p['flipped']} flipped" if p["step"] else "") for p in r["curve"]]
        lines.append(f"| {r['margin']:g} | {r['settled']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    for r in result["runs"]:
        steps = [p["step"] for p in r["curve"]]
        ax1.plot(steps, [p["kl"] for p in r["curve"]], marker=".", label=f"margin {r['margin']:g}")
        ax2.plot(steps, [p["flipped"] for p in r["curve"]], marker=".", label=f"margin {r['margin']:g}")
    ax1.set(xlabel="game step", ylabel="KL(T || S), batch 0", title="student after the warm-up")
    ax2.set(xlabel="game step", ylabel="codes flipped since the warm-up", title=f"of {result['codes']} codes")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['setting']}, {result['date']}, {result['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--steps", type=int, default=4, help="game steps per margin")
    p.add_argument("--game-steps", type=int, default=40, help="the game's length, which sets its lr schedule")
    p.add_argument("--seed", type=int, default=0)
    _probe.main(p, "warmup_edges", measure, table, plot)


if __name__ == "__main__":
    main()
