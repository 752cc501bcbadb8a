"""Single-process SAM-SGA trainer: ``train(teacher, student, tokenizer, cfg)`` and ``plot_history``.

Student step ``k`` (of ``cfg.method.steps``) uses global samples ``[k*B, (k+1)*B)``;
sample ``i`` takes seed sequence ``i mod num_sequences`` (with ``generator.seed_hardness > 0``,
after the first pass, one drawn by :class:`SeedPicker`; with ``seed_data.fresh_per_epoch``, sequence
``i`` of a pool of ``steps x batch_size`` rounded up to whole passes) and noise seeded by
``(seed, stream, k, i)``. Before student steps ``k = 0, n, 2n, ...``
(``n = student_steps_per_generator_step``) the generator takes one ascent step
on fresh noise (another stream) with the student fixed, unless ``ascent: false``.
With ``generator.radius_final`` the generator's radius goes from ``radius`` to it by the cosine of
``rho_at`` (:meth:`Inputs.begin_step`). With ``generator.clean_fraction = f`` that share of the student's
samples (:func:`clean_samples`) takes the seed embeddings unperturbed. Modes ``self_sample`` and
``noise`` feed seed embeddings or random embeddings and have no generator. Step ``k`` runs SAM at
radius ``rho_at(k, steps, rho, rho_final)`` (recorded as ``rho``); with ``scales_only_steps = K`` the
weights' lr is 0 for steps ``< K`` (:func:`zsaq_dist.minimax.student.make_student_scheduler`),
``dist.game`` does the same.
With ``block_warmup_steps > 0`` the student's decoder layers are first warmed one by one on the
seed sequences (:mod:`zsaq_dist.minimax.blockwise`); the record goes into the history as ``block_warmup``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from zsaq_dist.config import Config, MethodCfg
from zsaq_dist.data.seed import load_or_generate, pool_cfg, sample_rng, seed_identity
from zsaq_dist.errors import ConfigError
from zsaq_dist.minimax.blockwise import block_warmup
from zsaq_dist.minimax.generator import (
    STREAM_GENERATOR,
    STREAM_GM,
    STREAM_PICK,
    STREAM_STUDENT,
    Generator,
    embedding_stats,
    noise,
    noise_inputs,
)
from zsaq_dist.minimax.step import (
    generator_ascent_step,
    generator_objective,
    on_quantized_weights,
    sam_student_step,
    seed_embeddings,
    student_loss,
    teacher_targets,
    torch_mechanics,
)
from zsaq_dist.minimax.student import (
    freeze,
    make_optimizer,
    make_student_scheduler,
    norm_params,
    set_trainable,
    student_params,
)
from zsaq_dist.optim.schedule import make_scheduler, rho_at
from zsaq_dist.quant import quant_modules


def resolve_mode(cfg: MethodCfg) -> str:
    """``self_sample`` / ``noise`` methods force that input mode; ``zsaq`` uses ``generator.mode``."""
    return cfg.name if cfg.name in ("self_sample", "noise") else cfg.generator.mode


def generator_optimizer(generator: nn.Module, m: MethodCfg) -> tuple[torch.optim.Optimizer, object]:
    """Adam with ``maximize=True`` (gradient ascent) and its schedule over the generator's own steps."""
    every = m.generator.student_steps_per_generator_step
    opt = torch.optim.Adam(generator.parameters(), lr=m.generator.lr, maximize=True)
    return opt, make_scheduler(opt, math.ceil(m.steps / every), m.warmup_steps // every, m.schedule)


def batch_indices(step: int, batch_size: int) -> range:
    """Global sample numbers of student step ``step``."""
    return range(step * batch_size, (step + 1) * batch_size)


def clean_samples(idx: range, fraction: float) -> torch.Tensor:
    """Which samples of ``idx`` (bool, (B,)) take their seed embeddings unperturbed: sample ``i`` does when
    ``floor((i + 1) * fraction) > floor(i * fraction)``, so a ``fraction`` of every run of samples does,
    spread evenly and by global sample number (the same on any split of the batch over workers)."""
    return torch.tensor([math.floor((i + 1) * fraction) > math.floor(i * fraction) for i in idx], dtype=torch.bool)


class SeedPicker:
    """Which seed sequence each sample takes: ``i mod N`` in order, or, with ``hardness > 0``, the hard ones.

    With ``hardness`` ``b > 0`` the first pass over the pool of ``N`` sequences goes in order (samples
    ``i < N``); every later sample ``i`` draws sequence ``j`` with probability
    ``q_j ~ exp(b * KL_j / mean_k KL_k)``, ``KL_j`` the student's KL on sequence ``j`` when it last trained
    on it (:meth:`observe`; a sequence not yet seen counts as the hardest seen). The draw is seeded by
    ``(seed, STREAM_PICK, step, i)``, so it depends only on the state and the global sample number.
    This is the generator's move over the pool: the closed-form maximiser of ``E_q[KL] - (1/b) KL(q || u)``
    over distributions ``q`` (with the ratio to the mean, ``b`` does not depend on the KL's scale).
    """

    def __init__(self, num_sequences: int, hardness: float, seed: int):
        self.hardness, self.seed = hardness, seed
        self.kl = torch.full((num_sequences,), float("nan"), dtype=torch.float64)

    def weights(self) -> torch.Tensor:
        """``q`` (N,), float64."""
        seen = ~torch.isnan(self.kl)
        if not seen.any():
            return torch.full_like(self.kl, 1.0 / len(self.kl))
        k = torch.where(seen, self.kl, self.kl[seen].max())
        return torch.softmax(self.hardness * k / k.mean().clamp_min(1e-12), dim=0)

    def rows(self, step: int, idx: range) -> torch.Tensor:
        """The seed-sequence rows (B,) of samples ``idx`` at student step ``step``."""
        n = len(self.kl)
        if self.hardness == 0 or all(i < n for i in idx):
            return torch.tensor([i % n for i in idx])
        q = self.weights()
        picks = [i if i < n else int(torch.multinomial(q, 1, generator=sample_rng(self.seed, STREAM_PICK, step, i)))
                 for i in idx]
        return torch.tensor(picks)

    def observe(self, rows: torch.Tensor, kl: torch.Tensor) -> None:
        """Record the student's KL (B,) on seed rows ``rows`` (B,); a row drawn twice keeps the last."""
        self.kl[rows] = kl.detach().to("cpu", torch.float64)

    def state_dict(self) -> dict:
        return {"kl": self.kl.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.kl.copy_(state["kl"])


class Inputs:
    """Produces the inputs of each step for one mode (``adversarial``, ``self_sample``, ``noise``)."""

    def __init__(self, teacher: nn.Module, mode: str, cfg: MethodCfg, seed_ids: torch.Tensor | None):
        self.teacher, self.mode, self.cfg, self.seed_ids = teacher, mode, cfg, seed_ids
        hard = cfg.generator.seed_hardness if mode == "adversarial" and cfg.ascent else 0.0
        self.picker = SeedPicker(len(seed_ids), hard, cfg.seed) if seed_ids is not None else None
        self.stats = embedding_stats(teacher.get_input_embeddings().weight) if mode == "noise" else None
        dim = teacher.get_input_embeddings().embedding_dim
        g = cfg.generator
        self.generator = (
            Generator(dim, g.noise_dim, g.hidden_dim, g.radius, g.adapter_init) if mode == "adversarial" else None
        )
        if self.generator is not None:
            self.generator.to(teacher.get_input_embeddings().weight.device)

    def begin_step(self, step: int) -> None:
        """Set what depends on the student step alone: the generator's radius (``rho_at`` on
        ``generator.radius``, ``generator.radius_final``), used by that step's ascent and its student batch."""
        if self.generator is not None:
            g = self.cfg.generator
            self.generator.radius = rho_at(step, self.cfg.steps, g.radius, g.radius_final)

    def seed_embeds(self, idx: range, step: int = 0) -> torch.Tensor:
        """Teacher embeddings of the seed sequences of samples ``idx`` at student step ``step``: (B, T, D)."""
        return seed_embeddings(self.teacher, self.seed_ids[self.picker.rows(step, idx)])

    def noise(self, step: int, idx: range, stream: int, like: torch.Tensor) -> torch.Tensor:
        """Generator noise (B, T, Dz) for ``(seed, stream, step, i)``."""
        z = noise(self.cfg.seed, step, idx, (self.cfg.seq_len, self.cfg.generator.noise_dim), stream)
        return z.to(like.device)

    @torch.no_grad()
    def student_batch(self, step: int, idx: range) -> torch.Tensor:
        """The fixed inputs ``x`` (B, T, D) of student step ``step``."""
        emb_dtype = self.teacher.get_input_embeddings().weight.dtype
        if self.mode == "noise":
            return noise_inputs(self.stats, self.cfg.seed, step, idx, self.cfg.seq_len).to(emb_dtype)
        e = self.seed_embeds(idx, step)
        if self.mode == "self_sample":
            return e
        x = self.generator(self.noise(step, idx, STREAM_STUDENT, e), e)
        keep = clean_samples(idx, self.cfg.generator.clean_fraction)
        return torch.where(keep.to(x.device).view(-1, 1, 1), e, x) if keep.any() else x


def new_history() -> dict[str, list]:
    """Empty per-step history (the lists written to zsaq_report.json)."""
    keys = ("step", "loss", "kl", "sam_loss", "gen_obj", "gen_kl", "lr", "rho", "seconds")
    return {k: [] for k in keys}


def record_step(hist: dict, step: int, m: dict, gen: dict | None, lr: float, secs: float) -> None:
    """Append one step's metrics (``None`` where a step had no generator phase)."""
    row = {"step": step, "lr": lr, "seconds": secs, **m, **(gen or {})}
    for k in new_history():
        hist[k].append(row.get(k))


def load_seed_ids(teacher, seed_model, tokenizer, cfg: MethodCfg, progress: bool = False) -> torch.Tensor:
    """All seed sequences of the run (:func:`~zsaq_dist.data.seed.pool_cfg`), cached.

    Written by ``seed_model`` when the config names one, else by the teacher.
    """
    if cfg.seed_data.seed_model is not None and seed_model is None:
        raise ConfigError(
            f"method.seed_data.seed_model={cfg.seed_data.seed_model!r} is set but no seed model was passed: "
            "load it and call train(..., seed_model=model), or set seed_model: null to use the teacher"
        )
    return load_or_generate(seed_model or teacher, pool_cfg(cfg), cfg.seq_len, cfg.seed, tokenizer, progress=progress)


class Game:
    """The optimizers and inputs of one run; :meth:`step` is one SAM-SGA student step (+ ascent step)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, inp: Inputs):
        m = self.cfg = inp.cfg
        self.teacher, self.student, self.inp = teacher, student, inp
        weights, scales = student_params(student)
        self.opt = make_optimizer(weights, scales, m, norm_params(student))
        sched = make_student_scheduler(self.opt, m)
        self.mech = torch_mechanics(self.opt, weights, m.grad_clip, sched)
        if m.sam_space == "quantized":
            self.mech = on_quantized_weights(self.mech, [q for _, q in quant_modules(student)])
        self.every = m.generator.student_steps_per_generator_step
        self.ascent = inp.generator is not None and m.ascent
        if self.ascent:
            self.g_opt, self.g_sched = generator_optimizer(inp.generator, m)

    def generator_step(self, step: int, idx: range) -> dict[str, float]:
        """One ascent step of the generator on fresh noise, the student fixed."""
        inp, m = self.inp, self.cfg
        e = inp.seed_embeds(idx, step)
        z = inp.noise(step, idx, STREAM_GENERATOR, e)
        xi = inp.noise(step, idx, STREAM_GM, e) if m.generator.lambda_gm > 0 else None

        def objective():
            return generator_objective(self.teacher, self.student, inp.generator, z, e, m, xi)

        metrics = generator_ascent_step(objective, list(inp.generator.parameters()), self.g_opt, m.grad_clip)
        self.g_sched.step()
        return metrics

    def step(self, step: int) -> tuple[dict[str, float], dict[str, float] | None, float]:
        """Student step ``step``: (student metrics with the SAM radius ``rho``, generator metrics or None, weights lr)."""
        m = self.cfg
        idx = batch_indices(step, m.batch_size)
        self.inp.begin_step(step)
        gen = self.generator_step(step, idx) if self.ascent and step % self.every == 0 else None
        x = self.inp.student_batch(step, idx)
        target = teacher_targets(self.teacher, x, m)
        lr = self.opt.param_groups[0]["lr"]
        rho = rho_at(step, m.steps, m.rho, m.rho_final)

        picker = self.inp.picker if self.inp.picker is not None and self.inp.picker.hardness > 0 else None
        per_sample: list[torch.Tensor] | None = [] if picker is not None else None  # each sample's KL, for it

        def loss_fn():
            return student_loss(self.student, x, target, m, per_sample)

        metrics = sam_student_step(loss_fn, self.mech, rho, m.adaptive_sam)
        if picker is not None:
            picker.observe(picker.rows(step, idx), per_sample[0])  # the KL at w, not at w + e
        return {**metrics, "rho": rho}, gen, lr


def train(
    teacher: nn.Module,
    student: nn.Module,
    tokenizer,
    cfg: Config,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    seed_model: nn.Module | None = None,
) -> dict:
    """Run ``cfg.method.steps`` student optimizer steps of SAM-SGA (or a baseline); return the history.

    ``student`` must already be prepared (:func:`zsaq_dist.quant.prepare` on a copy of the teacher);
    the teacher is frozen here. ``on_step(step, metrics)`` is called after every student step.
    The history (JSON-ready lists per step) goes into ``zsaq_report.json`` and :func:`plot_history`.
    """
    m = cfg.method
    mode = resolve_mode(m)
    hist = {"mode": mode, "method": m.name, **new_history()}
    if not m.trains:
        return hist | {"total_seconds": 0.0}
    freeze(teacher)
    set_trainable(student, m.learnable_scales, m.trains_norms)
    seed_ids = None if mode == "noise" else load_seed_ids(teacher, seed_model, tokenizer, m, progress)
    if seed_ids is not None:
        hist["seed_data"] = seed_identity(seed_ids)
    if m.block_warmup_steps > 0:
        hist["block_warmup"] = block_warmup(teacher, student, seed_ids, m, m.learnable_scales, progress)
    torch.manual_seed(m.seed)  # the generator's initial weights
    game = Game(teacher, student, Inputs(teacher, mode, m, seed_ids))
    t_start = time.perf_counter()
    bar = tqdm(range(m.steps), disable=not progress, desc=f"zsaq {mode}", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        metrics, gen, lr = game.step(step)
        secs = time.perf_counter() - t0
        record_step(hist, step, metrics, gen, lr, secs)
        if step % m.log_every == 0:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}", s=f"{secs:.2f}")
        if on_step is not None:
            on_step(step, {**metrics, **(gen or {}), "lr": lr, "seconds": secs})
    hist["total_seconds"] = time.perf_counter() - t_start
    return hist


def plot_history(history: dict, path_png: str) -> str:
    """Training curves (student loss and KL; generator KL) as a PNG (Agg canvas, no pyplot global state)."""
    from matplotlib.figure import Figure

    warm = [r for r in (history.get("block_warmup") or {}).get("layers", []) if "loss_before" in r]
    fig = Figure(figsize=(15 if warm else 10, 3.8))
    ax1, ax2, *ax3 = fig.subplots(1, 3 if warm else 2)
    if warm:
        layers = [r["layer"] for r in warm]
        ax3[0].plot(layers, [r["loss_before"] for r in warm], marker=".", label="before")
        ax3[0].plot(layers, [r["loss_after"] for r in warm], marker=".", label="after")
        ax3[0].set(xlabel="decoder layer", ylabel="relative squared error", title="block warm-up")
        ax3[0].legend()
    steps = history["step"]
    ax1.plot(steps, history["loss"], label="student loss")
    ax1.plot(steps, history["kl"], label="KL(T || S)", alpha=0.8)
    ax1.set(xlabel="student step", ylabel="loss", title=f"student ({history.get('method')}, {history.get('mode')})")
    ax1.legend()
    gen = [(s, v) for s, v in zip(steps, history["gen_kl"], strict=True) if v is not None]
    if gen:
        ax2.plot(*zip(*gen, strict=True), color="C3", label="KL on generator inputs")
        ax2.legend()
    ax2.set(xlabel="student step", ylabel="KL", title="generator (ascent)")
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    return path_png
