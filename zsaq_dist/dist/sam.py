"""Sharded SAM on a DeepSpeed engine: perturb and restore only this rank's partition.

``optim.sam`` does the math on parallel lists ``(tensors, grads)``; this module
says, for each ZeRO stage, which tensor the forward reads and which gradient
partition belongs to this rank (checked against deepspeed 0.19.8 on CPU):

- stage 0: parameters and (all-reduced) gradients are replicated; every rank
  perturbs the whole model with the same norm, no collective needed.
- stage 1/2: the model parameters are views into a flat buffer that the
  optimizer partitions; ``p._hp_mapping.lp_fragment`` is this rank's piece of
  ``p`` and ``get_lp_grad_fragment`` its reduced gradient. After perturbing the
  fragments the flat buffer is all-gathered, as DeepSpeed does after a step.
- stage 3: the forward gathers ``p.ds_tensor`` (not the fp32 master copy), so
  that is what moves; ``safe_get_local_grad(p)`` is the matching partition of
  the gradient. ``empty_partition_cache`` drops stale gathered copies first.

With ``||g||`` the norm over all ranks (an all-reduce of partition sums of
squares), a 2-rank run matches a single-process SAM reference.

:func:`quantized_mechanics` (``method.sam_space: quantized``) perturbs after the
quantizer instead: each rank moves a zero *delta* laid out like its partition,
and the forward adds the whole delta to ``Q(w)``; the latent weights never move.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime.utils import all_gather_dp_groups
from deepspeed.utils import safe_get_local_grad
from torch import nn

from zsaq_dist.minimax.step import StepMechanics, clear_sam_deltas, modules_by_weight
from zsaq_dist.optim.sam import global_norm


def _trainable(engine) -> list[torch.nn.Parameter]:
    return [p for p in engine.module.parameters() if p.requires_grad]


def group(engine) -> dist.ProcessGroup | None:
    """The data-parallel group when gradients are partitioned (stages 1-3), else None (replicated)."""
    if engine.zero_optimization_stage() == 0 or not dist.is_initialized():
        return None
    return dist.group.WORLD


def local_partitions(
    engine, params: list[torch.nn.Parameter] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """This rank's ``(tensors the forward reads, their gradients)`` of ``params`` (default: all trainable).

    Valid right after ``engine.backward`` and before ``engine.step``.
    """
    stage = engine.zero_optimization_stage()
    params = _trainable(engine) if params is None else params
    if stage == 3:
        return [p.ds_tensor for p in params], [safe_get_local_grad(p) for p in params]
    if stage in (1, 2):
        owned = [p for p in params if getattr(p, "_hp_mapping", None) is not None]
        return [p._hp_mapping.lp_fragment for p in owned], [_fragment_grad(p) for p in owned]
    return params, [p.grad for p in params]


def _fragment_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """Stage 1/2: the flat reduced gradient of this rank's fragment of ``p`` (same numel as ``lp_fragment``)."""
    g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
    addr = p._hp_mapping.lp_fragment_address
    if g.numel() != addr.numel:  # some paths keep the whole parameter's gradient on every rank
        g = g.narrow(0, addr.start, addr.numel)
    return g


def _sync_replicas(engine) -> None:
    """Make every rank's full parameters reflect the partitions just changed."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        engine.empty_partition_cache()
    elif stage in (1, 2):
        opt = engine.optimizer
        all_gather_dp_groups(
            groups_flat=opt.bit16_groups_flat,
            partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
            dp_process_group=opt.real_dp_process_group,
            start_alignment_factor=opt.nccl_start_alignment_factor,
            allgather_bucket_size=opt.allgather_bucket_size,
        )


def grad_norm(engine, params: list[torch.nn.Parameter] | None = None) -> float:
    """Global 2-norm of the gradient of ``params`` (all ranks); a collective for stages 1-3."""
    tensors, grads = local_partitions(engine, params)
    return float(global_norm(tensors, grads, group=group(engine)))


def _clear_reduced_grads(engine) -> None:
    """Stage 1/2 keep the reduced partition in ``averaged_gradients``; drop it so backward refills it."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() in (1, 2):
        for k in list(opt.averaged_gradients):
            opt.averaged_gradients[k] = None


def mechanics(engine, sam_params: list[torch.nn.Parameter]) -> StepMechanics:
    """:class:`StepMechanics` driving ``engine`` for :func:`zsaq_dist.minimax.step.sam_student_step`.

    ``zero_grad`` runs after ``perturb_tensors`` changed this rank's partition: it
    refreshes the gathered copies (so the second forward reads ``w + e``) and
    empties the gradient so the second backward overwrites it. The restore needs
    no refresh: ``engine.step`` rewrites every partition from the master copy.
    """

    def tensors_and_grads():
        if engine.zero_optimization_stage() == 3:
            engine.empty_partition_cache()  # else stale gathered copies survive the perturbation
        return local_partitions(engine, sam_params)

    def zero_grad():
        _sync_replicas(engine)
        engine.optimizer.zero_grad()
        _clear_reduced_grads(engine)

    return StepMechanics(
        backward=engine.backward, zero_grad=zero_grad, tensors_and_grads=tensors_and_grads, optimizer_step=engine.step
    )


def _gathered(part: torch.Tensor, p: torch.nn.Parameter):
    """ZeRO-3: a callable giving ``p``'s whole delta from every rank's ``part`` (laid out like ``ds_tensor``)."""

    def whole() -> torch.Tensor:
        g = p.ds_process_group
        out = torch.empty(part.numel() * dist.get_world_size(g), dtype=part.dtype, device=part.device)
        dist.all_gather_single(out, part, group=g)
        return out.narrow(0, 0, p.ds_numel).view(p.ds_shape)

    return whole


def quantized_mechanics(engine, sam_params: list[torch.nn.Parameter], modules: list[nn.Module]) -> StepMechanics:
    """:func:`mechanics` with SAM's perturbation added after the quantizer of ``modules`` (QuantLinear).

    The single-process rule is :func:`zsaq_dist.minimax.step.on_quantized_weights`; per stage:

    - stage 0: gradients are replicated, so each rank builds the whole delta itself;
    - stage 1/2: each rank fills its fragment of one flat zero buffer holding every weight's delta,
      and one SUM all-reduce assembles it (each element belongs to exactly one rank);
    - stage 3: the delta stays partitioned like ``ds_tensor``; each QuantLinear's forward gathers
      its layer's delta (``sam_delta`` is then a callable) and drops it after, so no rank holds
      more than one layer's delta whole.

    The latent weights never move: ``zero_grad`` re-gathers nothing, no copy is kept, and
    ``release`` drops the deltas after the second pass.
    """
    stage = engine.zero_optimization_stage()
    by_weight = modules_by_weight(modules)
    flat: list[torch.Tensor] = []  # stage 1/2: the buffer to all-reduce before the second pass

    def attach(p: torch.nn.Parameter, delta) -> None:
        for m in by_weight.get(id(p), []):
            m.sam_delta = delta

    def tensors_and_grads():
        if stage == 3:
            parts = [torch.zeros_like(p.ds_tensor) for p in sam_params]
            for p, part in zip(sam_params, parts, strict=True):
                attach(p, _gathered(part, p))
            return parts, [safe_get_local_grad(p) for p in sam_params]
        if stage in (1, 2):
            first = sam_params[0]
            buf = torch.zeros(sum(p.numel() for p in sam_params), dtype=first.dtype, device=first.device)
            flat.append(buf)
            tensors, grads, offset = [], [], 0
            for p in sam_params:
                whole = buf.narrow(0, offset, p.numel())
                attach(p, whole.view(p.shape))
                if getattr(p, "_hp_mapping", None) is not None:
                    addr = p._hp_mapping.lp_fragment_address
                    tensors.append(whole.narrow(0, addr.start, addr.numel))
                    grads.append(_fragment_grad(p))
                offset += p.numel()
            return tensors, grads
        deltas = [torch.zeros_like(p) for p in sam_params]
        for p, d in zip(sam_params, deltas, strict=True):
            attach(p, d)
        return deltas, [p.grad for p in sam_params]

    def zero_grad():
        if flat:
            dist.all_reduce(flat[0], op=dist.ReduceOp.SUM, group=group(engine))
        engine.optimizer.zero_grad()
        _clear_reduced_grads(engine)

    def release():
        flat.clear()
        clear_sam_deltas(by_weight)

    return StepMechanics(
        backward=engine.backward,
        zero_grad=zero_grad,
        tensors_and_grads=tensors_and_grads,
        optimizer_step=engine.step,
        release=release,
    )


def partition_numel(engine) -> int:
    """Elements of student parameter state this rank owns (the fp32 master partition for stages 1-3)."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        return sum(p.ds_tensor.numel() for p in engine.module.parameters())
    if stage in (1, 2):
        return sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    return sum(p.numel() for p in engine.module.parameters())
