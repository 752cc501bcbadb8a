"""Block-by-block warm-up of the student before the end-to-end game (``method.block_warmup_steps``).

For each decoder layer ``l`` in order, the student's layer ``S_l`` (fake-quantized) is trained
alone to reproduce the teacher's layer ``T_l``::

    min  || S_l(h_S) - T_l(h_T) ||^2 / || T_l(h_T) ||^2      (summed over the minibatch)

on the seed sequences (the teacher's own text: zero real data). ``h_T`` is the teacher's hidden
state entering layer ``l``, ``h_S`` the student's, after its earlier layers were warmed, so each
layer also absorbs the error its predecessors left (as GPTQ does with quantized inputs). After
``block_warmup_steps`` AdamW steps on layer ``l`` both streams move one layer on and the next
layer starts. Only the layer's QuantLinear weights (and trainable scales, and its norms where
``method.norm_lr > 0``) move; the teacher and the embeddings do not.

Data-parallel on several workers (:class:`Part`): each minibatch's rows are split over the ranks,
each rank keeps its rows' hidden states only, the squared errors' sums and the gradients are
summed over the ranks, and every rank takes the same step. The minibatches, the loss and the
steps are the single process's; only the floating-point order of the sums differs. The work on
the tokens and the hidden states held fall with the number of ranks instead of being repeated on
every one; the weight-sized work of each step (fake quantization, AdamW) is still every rank's.

The hidden states entering layer 0 and the keyword arguments every layer receives (rotary
position embeddings, the attention mask) are taken from one ordinary teacher forward per
minibatch through a forward pre-hook on layer 0, so any decoder stack transformers builds
(Llama, Qwen2, Mistral, ...) runs unchanged: :func:`capture_layer_inputs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from zsaq_dist.config import MethodCfg
from zsaq_dist.errors import ConfigError
from zsaq_dist.minimax.step import seed_embeddings
from zsaq_dist.minimax.student import norm_params, student_params
from zsaq_dist.optim.schedule import make_scheduler
from zsaq_dist.quant import quant_modules


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ``nn.ModuleList`` of ``model``'s decoder layers (``config.num_hidden_layers`` long)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ConfigError(
        f"block warm-up found no list of {n} decoder layers in {type(model).__name__}: "
        "set method.block_warmup_steps: 0 for this architecture"
    )


def _hidden(out) -> torch.Tensor:
    """A decoder layer's output hidden states (a tensor, or the first item of the tuple older layers return)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class Part:
    """This rank's share of a data-parallel warm-up: ``rank`` of ``size``, and an in-place sum over the ranks."""

    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], None]

    def rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of one minibatch ``ids`` and their weight in the sums.

        A rank left without a row (a minibatch shorter than the number of ranks) runs the first row
        with weight 0: every rank makes the same layer calls, which a ZeRO-3 teacher's gathers need.
        """
        mine = torch.tensor_split(ids, self.size)[self.rank]
        return (mine, 1.0) if len(mine) else (ids[:1], 0.0)


class Batch:
    """One minibatch of the warm-up: its hidden-state streams, the keyword arguments of every layer, and
    the weight of its squared errors (1; 0 for a rank's stand-in row, :meth:`Part.rows`)."""

    def __init__(self, h: torch.Tensor, kwargs: dict, weight: float = 1.0):
        self.h_teacher = self.h_student = h  # never changed in place: each layer assigns new tensors
        self.kwargs = kwargs
        self.weight = weight


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(hidden states, keyword arguments) with which ``model``'s forward on ``inputs_embeds=x`` calls layer 0."""
    got: dict = {}

    def hook(_mod, args, kwargs):
        if "h" not in got:
            got["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(inputs_embeds=x, use_cache=False)
    finally:
        handle.remove()
    return got["h"], got["kwargs"]


def squared_error(student_layer: nn.Module, batch: Batch, target: torch.Tensor) -> torch.Tensor:
    """The student layer's squared error against the teacher's output, summed over the batch's rows (weighted)."""
    out = _hidden(student_layer(batch.h_student, **batch.kwargs))
    return (out - target).float().pow(2).sum() * batch.weight


def target_norms(batches: list[Batch], targets: list[torch.Tensor], part: Part | None = None) -> torch.Tensor:
    """Each minibatch's ``||T_l(h_T)||^2`` (len(batches),), summed over the ranks: the loss's denominators."""
    norms = torch.stack([t.float().pow(2).sum() * b.weight for b, t in zip(batches, targets, strict=True)])
    if part is not None:
        part.all_reduce(norms)
    return norms


def seed_batches(
    teacher: nn.Module, t_layers: nn.ModuleList, seed_ids: torch.Tensor, batch_size: int, part: Part | None = None
) -> list[Batch]:
    """The warm-up's minibatches of ``seed_ids``, ``batch_size`` rows each in order (this rank's share with ``part``)."""
    batches = []
    for i in range(0, len(seed_ids), batch_size):
        rows = seed_ids[i : i + batch_size]
        ids, weight = part.rows(rows) if part is not None else (rows, 1.0)
        batches.append(Batch(*capture_layer_inputs(teacher, t_layers, seed_embeddings(teacher, ids)), weight))
    return batches


@torch.no_grad()
def layer_targets(t_layer: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """The teacher layer's output on each minibatch's teacher stream: what the student layer is trained to give."""
    return [_hidden(t_layer(b.h_teacher, **b.kwargs)) for b in batches]


def layer_loss(student_layer: nn.Module, batch: Batch, target: torch.Tensor, norm: torch.Tensor | None = None):
    """Relative squared error of the student layer's output against the teacher's (one minibatch).

    ``norm``: the minibatch's ``||T_l(h_T)||^2`` over all ranks (:func:`target_norms`); default: this
    rank's own, which is the whole minibatch's in one process.
    """
    if norm is None:
        norm = target.float().pow(2).sum() * batch.weight
    return squared_error(student_layer, batch, target) / norm


def _layer_params(layer: nn.Module, learnable_scales: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    weights, scales = student_params(layer)
    return weights, scales if learnable_scales else []


def _mean_loss(
    layer: nn.Module, batches: list[Batch], targets: list[torch.Tensor], norms: torch.Tensor, part: Part | None
) -> float:
    """The layer's loss averaged over the minibatches (every rank gets the same value)."""
    with torch.no_grad():
        errors = torch.stack([squared_error(layer, b, t) for b, t in zip(batches, targets, strict=True)])
    if part is not None:
        part.all_reduce(errors)
    return sum(float(e / n) for e, n in zip(errors, norms, strict=True)) / len(batches)


def _sum_grads(params: list[nn.Parameter], part: Part) -> None:
    """Sum the gradients over the ranks in one call on one flat buffer (half the time of one call per tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    part.all_reduce(flat)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(summed.view_as(g))


def warm_layer(
    s_layer: nn.Module,
    batches: list[Batch],
    targets: list[torch.Tensor],
    m: MethodCfg,
    learnable_scales: bool,
    part: Part | None = None,
) -> dict[str, float]:
    """``m.block_warmup_steps`` AdamW steps of one student layer; minibatch ``k mod len(batches)`` at step ``k``.

    A layer whose mean error over the minibatches ends above where it started (too large an lr) is put
    back as it was (``kept: False``): the warm-up never leaves a layer worse on the seed sequences.
    Then, with ``m.block_warmup_margin > 0``, its trained weights are moved that far inside their rounding
    bins (:meth:`QuantLinear.settle`; ``settled``: how many moved). The codes, and so every output, stay
    bit for bit; what changes is the game after it. Adam's first step of the end-to-end game moves every
    weight by about ``lr`` whatever its gradient, so every weight that close to an edge and pushed toward
    it flips a whole quantization step at once; on the demo model that undid the warm-up
    (``bench/warmup_edges.py``).

    With ``part``, ``batches`` hold this rank's rows: the gradients are summed over the ranks before
    each step, so every rank steps alike.
    """
    weights, scales = _layer_params(s_layer, learnable_scales)
    gains = norm_params(s_layer) if m.trains_norms else []  # the layer's norms, where the student trains them
    norms = target_norms(batches, targets, part)
    before = _mean_loss(s_layer, batches, targets, norms, part)
    params = weights + scales + gains
    start = [p.detach().clone() for p in params]
    groups = [{"params": weights, "lr": m.block_warmup_lr, "weight_decay": 0.0}]
    if scales:
        groups.append({"params": scales, "lr": m.scale_lr, "weight_decay": 0.0})
    if gains:
        groups.append({"params": gains, "lr": m.norm_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    sched = make_scheduler(opt, m.block_warmup_steps, 0, "cosine")
    for k in range(m.block_warmup_steps):
        b = k % len(batches)
        loss = layer_loss(s_layer, batches[b], targets[b], norms[b])
        loss.backward(inputs=params)
        if part is not None:
            _sum_grads(params, part)
        if m.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, m.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    after = _mean_loss(s_layer, batches, targets, norms, part)
    if after > before:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
    settled = sum(q.settle(m.block_warmup_margin) for _, q in quant_modules(s_layer)) if m.block_warmup_margin else 0
    return {"loss_before": before, "loss_after": after, "kept": after <= before, "settled": settled}


def block_warmup(
    teacher: nn.Module,
    student: nn.Module,
    seed_ids: torch.Tensor,
    m: MethodCfg,
    learnable_scales: bool,
    progress: bool = True,
    on_layer: Callable[[int, dict], None] | None = None,
    layer_ctx: Callable[[nn.Module], AbstractContextManager] | None = None,
    sync: Callable[[nn.Module], None] | None = None,
    part: Part | None = None,
) -> dict:
    """Warm every decoder layer of ``student`` that holds a QuantLinear in turn; return the per-layer record.

    ``seed_ids`` (N, T): the run's seed sequences, of which the first ``m.seed_data.num_sequences`` (all
    but the later passes' sets of ``fresh_per_epoch``) are taken ``m.batch_size`` at a time (the last
    minibatch may be shorter). Deterministic: no sampling, the minibatches are taken in order.

    For DeepSpeed workers (:mod:`zsaq_dist.dist.worker`): a ZeRO-3 teacher's layers gather their
    parameters through its own hooks (every rank runs the same calls); ``layer_ctx(student_layer)``
    is entered around each student layer's turn (a ZeRO-3 student: gathered, rank 0's values kept)
    and ``sync(student_layer)`` runs at its end (a replicated student: rank 0's values broadcast).
    With ``part`` the warm-up is data-parallel (module docstring): each rank holds and runs its share
    of every minibatch only.
    """
    t0 = time.perf_counter()
    name, t_layers = decoder_layers(teacher)
    s_layers = student.get_submodule(name)
    batches = seed_batches(teacher, t_layers, seed_ids[: m.seed_data.num_sequences], m.batch_size, part)
    record = {
        "steps_per_layer": m.block_warmup_steps,
        "lr": m.block_warmup_lr,
        "layers": [],
        "workers": part.size if part is not None else 1,
    }
    bar = tqdm(range(len(t_layers)), disable=not progress, desc="block warm-up", dynamic_ncols=True)
    for i in bar:
        t1 = time.perf_counter()
        targets = layer_targets(t_layers[i], batches)
        row = {"layer": i}
        with layer_ctx(s_layers[i]) if layer_ctx is not None else nullcontext():
            if any(True for _ in quant_modules(s_layers[i])):
                row |= warm_layer(s_layers[i], batches, targets, m, learnable_scales, part)
                bar.set_postfix(before=f"{row['loss_before']:.4f}", after=f"{row['loss_after']:.4f}")
                if sync is not None:
                    sync(s_layers[i])
            with torch.no_grad():
                for b, t in zip(batches, targets, strict=True):
                    b.h_student = _hidden(s_layers[i](b.h_student, **b.kwargs))
                    b.h_teacher = t
        row["seconds"] = time.perf_counter() - t1
        record["layers"].append(row)
        if on_layer is not None:
            on_layer(i, row)
    record["total_seconds"] = time.perf_counter() - t0
    return record
