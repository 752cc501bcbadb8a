"""Optimization primitives in plain torch: SAM perturb/restore with an optional process group, lr and SAM-radius schedules."""

from zsaq_dist.optim.sam import SamState, global_norm, grad_norm, perturb, perturb_tensors, restore
from zsaq_dist.optim.schedule import delayed_lr_factor, lr_factor, make_scheduler, rho_at

__all__ = [
    "SamState",
    "delayed_lr_factor",
    "global_norm",
    "grad_norm",
    "lr_factor",
    "make_scheduler",
    "perturb",
    "perturb_tensors",
    "restore",
    "rho_at",
]
