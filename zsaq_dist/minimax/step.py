"""One SAM-SGA step, with the math separated from the mechanics so DeepSpeed can reuse it.

Math (pure functions of models and inputs; no optimizer):
  * :func:`teacher_targets`      teacher logits (and hidden states) on fixed inputs, no grad.
  * :func:`student_loss`         ``L = tau^2 KL(T || S) + lambda_hidden * MSE(hidden)``.
  * :func:`generator_objective`  ``J = L - lambda_nat R_nat + lambda_gm GM - lambda_div Div``
                                 as a differentiable function of the generator.

Mechanics (how gradients are taken and applied), passed in as callables:
  * :class:`StepMechanics` ``backward(loss)``, ``zero_grad()``, ``tensors_and_grads()`` (what
    SAM perturbs and the gradient it uses) and ``optimizer_step()`` (clip, step, schedule,
    zero grads). :func:`torch_mechanics` builds them for a plain torch optimizer; the dist
    layer builds them for a DeepSpeed engine (``engine.backward``, ``p.ds_tensor`` with
    ``safe_get_local_grad(p)``, ``engine.step``) and passes its process group for the norm.
  * :func:`sam_student_step` runs SAM with them:
        loss_fn() -> backward -> perturb(rho, group) -> zero_grad -> loss_fn() -> backward
        -> restore (bit-exact) -> [release] -> optimizer_step
    With ``rho == 0`` the second pass is skipped: exactly the plain optimizer step.
    The trainer lets SAM perturb the *weights* of the quantized layers only, not their scales:
    learnable scales are ~100x smaller than the weights yet carry a comparable share of
    ``||g||``, so one shared radius would move them by several percent; they still take the
    SAM gradient ``g'``. By default (``method.sam_space: quantized``) the perturbation is
    added after the quantizer, ``Q(w) + e`` (:func:`on_quantized_weights`, SAQ); with
    ``latent`` it moves ``w`` itself and the second pass sees ``Q(w + e)``.
  * :func:`generator_ascent_step` backpropagates ``J`` into the generator's parameters only
    (``backward(inputs=...)``: the student and teacher get no gradient) and steps an
    optimizer built with ``maximize=True`` (gradient *ascent*).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from zsaq_dist.config import MethodCfg
from zsaq_dist.minimax import losses
from zsaq_dist.minimax.generator import Generator
from zsaq_dist.optim.sam import perturb_tensors, restore


def _item(t: torch.Tensor) -> float:
    return float(t.detach())


LossFn = Callable[[], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Targets:
    """Teacher outputs on a batch: logits (B, T, V) and, if asked for, hidden states."""

    logits: torch.Tensor
    hidden: tuple[torch.Tensor, ...] | None = None


def run(model: nn.Module, x: torch.Tensor, hidden: bool = False) -> Targets:
    """Forward ``inputs_embeds`` x (B, T, D) through a causal LM."""
    out = model(inputs_embeds=x, output_hidden_states=hidden, use_cache=False)
    return Targets(out.logits, tuple(out.hidden_states) if hidden else None)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, x: torch.Tensor, cfg: MethodCfg) -> Targets:
    """Teacher outputs on fixed inputs (computed once per batch, reused by both SAM passes)."""
    return run(teacher, x, hidden=cfg.lambda_hidden > 0)


def student_loss(
    student: nn.Module, x: torch.Tensor, target: Targets, cfg: MethodCfg, per_sample: list | None = None
) -> tuple[torch.Tensor, dict]:
    """The student's distillation loss on inputs ``x`` and its metrics (``kl``, ``hidden``).

    ``per_sample``: if given, each sample's KL (B,) is appended to it (detached; for the seed picker).
    """
    out = run(student, x, hidden=cfg.lambda_hidden > 0)
    if per_sample is None:
        kl = losses.kl(out.logits, target.logits, cfg.tau)
    else:
        kl, each = losses.kl_with_per_sample(out.logits, target.logits, cfg.tau)
        per_sample.append(each)
    loss, metrics = kl, {"kl": _item(kl)}
    if cfg.lambda_hidden > 0:
        mse = losses.hidden_mse(out.hidden, target.hidden)
        loss = loss + cfg.lambda_hidden * mse
        metrics["hidden"] = _item(mse)
    metrics["loss"] = _item(loss)
    return loss, metrics


@dataclass
class StepMechanics:
    """How a student step takes and applies gradients (plain torch or a DeepSpeed engine)."""

    backward: Callable[[torch.Tensor], None]
    zero_grad: Callable[[], None]
    tensors_and_grads: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor | None]]]
    optimizer_step: Callable[[], None]
    release: Callable[[], None] | None = None  # after the second pass: drop what tensors_and_grads made

    @property
    def keep_copy(self) -> bool:
        """Whether SAM saves a copy to restore: not when the perturbed tensors are released instead."""
        return self.release is None


def modules_by_weight(modules: Sequence[nn.Module]) -> dict[int, list[nn.Module]]:
    """``modules`` grouped by the identity of their ``weight`` (tied layers share one group)."""
    by_weight: dict[int, list[nn.Module]] = {}
    for m in modules:
        by_weight.setdefault(id(m.weight), []).append(m)
    return by_weight


def clear_sam_deltas(by_weight: dict[int, list[nn.Module]]) -> None:
    """Drop every module's ``sam_delta`` (after SAM's second pass)."""
    for group in by_weight.values():
        for m in group:
            m.sam_delta = None


def on_quantized_weights(mech: StepMechanics, modules: Sequence[nn.Module]) -> StepMechanics:
    """``mech`` with SAM's perturbation added to the *quantized* weights of ``modules`` (QuantLinear).

    SAQ (Liu, Cai, Zhuang, "Sharpness-aware Quantization for Deep Neural Networks"): a
    perturbation ``e`` of the latent weight ``w`` moves the student to ``Q(w + e)``, which flips
    the rounding of every entry that ``e`` pushes over a grid midpoint, so the second pass sees
    a jump of the quantizer rather than the loss's sharpness. Here the second pass sees
    ``Q(w) + e`` instead (each module's ``sam_delta``), with ``e = rho * g / ||g||`` from the
    same gradient ``g`` (the weights' straight-through gradient). Its gradient still reaches
    ``w`` through the STE; ``release`` clears the deltas after the second pass (they are dropped,
    so SAM keeps no copy of them: its memory is one delta per weight, as a latent SAM's copy).
    Modules sharing one weight share one delta. For plain torch; DeepSpeed engines use
    :func:`zsaq_dist.dist.sam.quantized_mechanics`.
    """
    by_weight = modules_by_weight(modules)

    def tensors_and_grads():
        deltas, grads = [], []
        for group in by_weight.values():
            w = group[0].weight
            delta = torch.zeros_like(w, requires_grad=False)
            for m in group:
                m.sam_delta = delta
            deltas.append(delta)
            grads.append(w.grad)
        return deltas, grads

    return replace(mech, tensors_and_grads=tensors_and_grads, release=lambda: clear_sam_deltas(by_weight))


def torch_mechanics(
    optimizer: torch.optim.Optimizer,
    sam_params: list[nn.Parameter],
    grad_clip: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> StepMechanics:
    """Mechanics for ordinary parameters: SAM perturbs ``sam_params`` along their ``.grad``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> None:
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return StepMechanics(
        backward=lambda loss: loss.backward(),
        zero_grad=lambda: optimizer.zero_grad(set_to_none=True),
        tensors_and_grads=lambda: (list(sam_params), [p.grad for p in sam_params]),
        optimizer_step=step,
    )


def sam_student_step(
    loss_fn: LossFn,
    mech: StepMechanics,
    rho: float,
    adaptive: bool = False,
    group: torch.distributed.ProcessGroup | None = None,
) -> dict[str, float]:
    """One SAM optimizer step: gradient at ``w + e`` applied at ``w``; returns the metrics at ``w``."""
    loss, metrics = loss_fn()
    mech.backward(loss)
    if rho > 0:
        tensors, grads = mech.tensors_and_grads()
        state = perturb_tensors(tensors, grads, rho, adaptive, group, keep=mech.keep_copy)
        mech.zero_grad()
        loss_adv, _ = loss_fn()
        mech.backward(loss_adv)
        restore(state)
        if mech.release is not None:
            mech.release()
        metrics.update(sam_loss=_item(loss_adv), grad_norm=state.norm)
    mech.optimizer_step()
    return metrics


def _normalize_per_sample(v: torch.Tensor) -> torch.Tensor:
    return v / (v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))) + 1e-12)


def _grad_features(teacher, student, x: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    """(h, d, teacher logits, student logits): student last hidden state and ``p_S - p_T``."""
    t = run(teacher, x).logits
    s = run(student, x, hidden=True)
    return s.hidden[-1], losses.logit_grad(s.logits, t, tau), t, s.logits


def neighbour_noise(
    teacher, student, generator: Generator, z: torch.Tensor, e: torch.Tensor, h, d, cfg: MethodCfg, xi: torch.Tensor
) -> torch.Tensor:
    """``z' = z - rho_z * normalize(grad S)``, S = GM between x and G(z0), at a random start ``z0``.

    ``S`` is maximal (gradient zero) at ``z' = z``, so its gradient is taken at
    ``z0 = z + rho_z * normalize(xi)`` (a seeded random direction, as in PGD's random start).
    """
    rho_z = cfg.generator.rho_z
    z0 = (z + rho_z * _normalize_per_sample(xi)).detach().requires_grad_(True)
    h0, d0, _, _ = _grad_features(teacher, student, generator(z0, e), cfg.tau)
    (g,) = torch.autograd.grad(losses.gradient_match(h.detach(), d.detach(), h0, d0), z0)
    return (z - rho_z * _normalize_per_sample(g)).detach()


def generator_objective(
    teacher: nn.Module,
    student: nn.Module,
    generator: Generator,
    z: torch.Tensor,
    e: torch.Tensor,
    cfg: MethodCfg,
    xi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``J(phi)`` to *maximise*, for noise z (B, T, Dz) and seed embeddings e (B, T, D); ``xi`` seeds GM."""
    g = cfg.generator
    x = generator(z, e)
    h, d, t_logits, s_logits = _grad_features(teacher, student, x, cfg.tau)
    kl = losses.kl(s_logits, t_logits, cfg.tau)
    r_nat = losses.r_nat_nll(t_logits) if g.r_nat == "nll" else losses.r_nat_norm(x, e)
    obj = kl - g.lambda_nat * r_nat
    metrics = {"gen_kl": _item(kl), "r_nat": _item(r_nat)}
    if g.lambda_gm > 0:
        xi = torch.randn_like(z) if xi is None else xi
        z2 = neighbour_noise(teacher, student, generator, z, e, h, d, cfg, xi)
        h2, d2, _, _ = _grad_features(teacher, student, generator(z2, e), cfg.tau)
        gm = losses.gradient_match(h, d, h2, d2)
        obj = obj + g.lambda_gm * gm
        metrics["gm"] = _item(gm)
    if g.lambda_div > 0:
        div = losses.diversity(h, d)
        obj = obj - g.lambda_div * div
        metrics["div"] = _item(div)
    metrics["gen_obj"] = _item(obj)
    return obj, metrics


def generator_ascent_step(
    objective_fn: LossFn,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
    reduce_grads: Callable[[list[nn.Parameter]], None] | None = None,
) -> dict[str, float]:
    """Backprop ``J`` into ``params`` only and step ``optimizer`` (built with ``maximize=True``).

    ``reduce_grads`` lets the dist layer all-reduce the replicated generator's gradients.
    """
    optimizer.zero_grad(set_to_none=True)
    obj, metrics = objective_fn()
    obj.backward(inputs=params)
    if reduce_grads is not None:
        reduce_grads(params)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


def seed_embeddings(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Teacher input embeddings of seed tokens (B, T) -> (B, T, D), no grad."""
    emb = teacher.get_input_embeddings()  # the module, so scaled embeddings (Gemma) stay scaled
    with torch.no_grad():
        return emb(ids.to(emb.weight.device))
