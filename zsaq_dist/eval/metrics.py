"""Perplexity, KL to the teacher and top-1 agreement on a token stream.

The stream is cut into non-overlapping windows of ``seq_len`` tokens; each
window is scored on its own (no carried context), and inside a window token
``t`` is predicted from tokens ``< t``, so a window of ``n`` tokens gives
``n - 1`` predictions. A final window shorter than ``seq_len`` is kept if it has
at least 2 tokens (one prediction), so every token of the stream but the first
of each window is scored, and the result does not depend on ``batch_size``.

    ppl  = exp( sum NLL / tokens )
    kl   = sum_t KL( p_T(.|t) || p_S(.|t) ) / tokens     (full vocabulary, fp32 log_softmax)
    top1 = #{ argmax p_T == argmax p_S } / tokens
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zsaq_dist.errors import ConfigError


def windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seq_len`` tokens; the last may be shorter but has >= 2 tokens."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens to predict one")
    return [w for w in ids.split(seq_len) if w.numel() >= 2]


def _batches(wins: list[torch.Tensor], batch_size: int) -> list[list[torch.Tensor]]:
    """Group windows of equal length (only the last may differ), so batches need no padding."""
    out: list[list[torch.Tensor]] = []
    for w in wins:
        if out and len(out[-1]) < batch_size and out[-1][0].numel() == w.numel():
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 logits for the predicting positions, (B, T-1, V)."""
    out = model(input_ids=x, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, :-1].float()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 512,
    reference: nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Score ``model`` on the 1-D token stream ``ids``.

    Returns ``ppl``, ``nll`` (mean token NLL), ``tokens`` (predictions made) and
    ``windows``; with ``reference`` (the teacher) also ``kl`` = mean per-token
    KL(reference || model) and ``top1`` = fraction of positions where both argmaxes agree.
    """
    wins = windows(ids, seq_len)
    if not wins:
        raise ConfigError(
            f"the evaluation text has {ids.numel()} token(s), at least 2 are needed: give a longer eval.text"
        )
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for batch in tqdm(_batches(wins, batch_size), desc="eval", unit="batch", disable=not progress):
        x = torch.stack(batch).to(_device(model))  # (B, T)
        targets = x[:, 1:]  # (B, T-1)
        logp = F.log_softmax(_logits(model, x), dim=-1)  # (B, T-1, V)
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).double().sum().item()
        count += targets.numel()
        if reference is not None:
            logq = F.log_softmax(_logits(reference, x.to(_device(reference))).to(logp.device), dim=-1)
            # KL(T || S) = sum_v q_v (log q_v - log p_v), q = teacher
            kl_sum += F.kl_div(logp, logq, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
    nll = nll_sum / count
    out = {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(wins)}
    if reference is not None:
        out["kl"] = kl_sum / count
        out["top1"] = agree / count
    return out
