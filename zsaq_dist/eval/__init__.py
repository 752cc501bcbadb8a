"""Evaluation on held-out text: perplexity, KL to the teacher, top-1 agreement (never used for training)."""

from zsaq_dist.eval.metrics import evaluate, windows
from zsaq_dist.eval.table import format_table

__all__ = ["evaluate", "format_table", "windows"]
