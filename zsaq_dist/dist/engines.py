"""DeepSpeed on each worker: communication setup, configs, the student and teacher engines.

- student: a DeepSpeed engine at ``dist.zero_stage`` (0-3) around a *client* torch
  AdamW (our two param groups: weights and scales), so DeepSpeed never JIT-builds
  its fused CPU Adam (minutes on first use).
- teacher: ZeRO-3 partitioned with no optimizer and no gradients
  (``deepspeed.init_inference`` is tensor parallelism, not ZeRO).

``stage3_param_persistence_threshold: 0`` partitions every parameter: a
"persistent" small parameter stays gathered in ``p.data`` and the forward would
not see a perturbation of its ``ds_tensor``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zsaq_dist.config import Config
from zsaq_dist.errors import ConfigError


def setup_comm(use_gpu: bool) -> None:
    """Join DeepSpeed to the process group Ray Train made (gloo on CPU, nccl on GPU).

    On CPU DeepSpeed would JIT-compile a shared-memory all-reduce op when its
    comm backend starts; marking it incompatible keeps plain gloo and a start in
    seconds (deepspeed caches this dict, so the edit holds for the process).
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a collective; ``obj`` is ignored elsewhere)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective)."""
    _, n = world()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj)
    return out


def micro_batch(cfg: Config, world_size: int) -> int:
    """Per-rank slice of the global batch; the global batch must split evenly."""
    b = cfg.method.batch_size
    if b % world_size:
        raise ConfigError(
            f"method.batch_size={b} does not split over dist.num_workers={world_size}: "
            f"use a batch size that is a multiple of {world_size}"
        )
    return b // world_size


def ds_config(
    cfg: Config, world_size: int, stage: int, grad_clip: float | None, universal: bool = False
) -> dict[str, Any]:
    """A DeepSpeed config for one engine (fp32 or the model's dtype, no accumulation).

    ``universal``: the engine will load a universal checkpoint (one written by another worker count).
    """
    mb = micro_batch(cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    c: dict[str, Any] = {
        "train_batch_size": mb * world_size,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if grad_clip:
        c["gradient_clipping"] = grad_clip
    if universal:
        c["checkpoint"] = {"load_universal": True}
    if cfg.model.dtype == "bfloat16":
        c["bf16"] = {"enabled": True}
    elif cfg.model.dtype == "float16":
        c["fp16"] = {"enabled": True}
    return c


def student_engine(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: Config,
    universal: bool = False,
):
    """The student as a DeepSpeed engine at ``dist.zero_stage``; ``engine.step`` also steps ``scheduler``."""
    import deepspeed

    _, n = world()
    conf = ds_config(cfg, n, cfg.dist.zero_stage, cfg.method.grad_clip, universal)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler, config=conf)
    share_fp32_masters(engine.optimizer)
    return engine


def share_fp32_masters(zero3_optimizer) -> int:
    """Let ZeRO-3 update fp32 parameters in place instead of through a second fp32 copy; returns bytes freed.

    DeepSpeed means to do this itself when a partition already has the master dtype (stage3.py: "we don't
    need another copy of the weights"), but compares ``tensor.device`` with ``self.device``, a string, which
    is never equal, so fp32 training keeps a redundant fp32 master partition (deepspeed 0.19.8, CPU and
    GPU alike). Pointing each master at its parameter partition's storage is that intended state: the
    optimizer writes the parameters directly and DeepSpeed's copy back becomes a self-copy. Other stages
    and dtypes are left as they are.
    """
    masters = getattr(zero3_optimizer, "fp32_partitioned_groups_flat", None)
    params = getattr(zero3_optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not params or len(masters) != len(params):
        return 0
    freed = 0
    for master, param in zip(masters, params, strict=True):
        same = master.dtype == param.dtype and master.device == param.device and master.shape == param.shape
        if same and master.data_ptr() != param.data_ptr():
            if not torch.equal(master, param):  # a fresh engine's masters are clones of the partitions
                raise RuntimeError("ZeRO-3 fp32 master partition differs from its parameter partition")
            freed += master.numel() * master.element_size()
            master.data = param.data
    return freed


def teacher_engine(teacher: nn.Module, cfg: Config):
    """The frozen teacher partitioned by ZeRO-3 (no optimizer, no gradients); call it like the model."""
    import deepspeed

    teacher.requires_grad_(False)
    _, n = world()
    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config(cfg, n, 3, None))
    engine.eval()
    return engine
