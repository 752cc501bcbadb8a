"""Optimization primitives in plain torch: SAM perturb/restore with an optional process group, lr schedules."""

from zsaq_dist.optim.sam import SamState, global_norm, grad_norm, perturb, perturb_tensors, restore
from zsaq_dist.optim.schedule import lr_factor, make_scheduler

__all__ = [
    "SamState",
    "global_norm",
    "grad_norm",
    "lr_factor",
    "make_scheduler",
    "perturb",
    "perturb_tensors",
    "restore",
]
