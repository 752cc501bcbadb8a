"""Losses of the SAM-SGA game, as pure functions of logits and hidden states (float32 math).

kl           L  = tau^2 * mean_t KL( softmax(T_t/tau) || softmax(S_t/tau) )
hidden_mse      mean over layers and tokens of ||h^S - h^T||^2 / D
r_nat_nll    R  = mean_t -log p_T(argmax_v T_t | x_<=t)   (the teacher's NLL of its own
                  argmax continuation of x: low where the teacher finds x plausible)
r_nat_norm   R  = mean_t (||x_t|| / ||e_t|| - 1)^2          (embedding-norm penalty)
gradient_match  the last-layer per-token gradient of the KL w.r.t. the lm_head is the
                outer product (p_S - p_T) h^T, and cos(a b^T, c d^T) = cos(a, c) cos(b, d), so
                GM = mean_t cos(h_t, h'_t) * cos(p_S - p_T, p'_S - p'_T)_t   for x and a neighbour x'
diversity       the same token-wise gradient cosine between *different* samples of the
                batch at the same position, averaged over ordered pairs b != c
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays, for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``KL(p_T || p_S)`` per token (B, T), before the ``tau^2`` scale."""
    s = F.log_softmax(_up(student_logits) / tau, dim=-1)
    t = F.log_softmax(_up(teacher_logits) / tau, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(p_T || p_S)`` per token, mean over tokens; logits (B, T, V)."""
    return tau**2 * _kl_per_token(student_logits, teacher_logits, tau).mean()


def kl_with_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`kl`, each sample's KL alone (B,), detached) from one softmax of the logits."""
    per_token = _kl_per_token(student_logits, teacher_logits, tau)
    return tau**2 * per_token.mean(), tau**2 * per_token.detach().mean(-1)


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean squared error of the hidden states after each layer (entry 0, the inputs, is skipped)."""
    pairs = list(zip(student_hidden[1:], teacher_hidden[1:], strict=True))
    return torch.stack([F.mse_loss(_up(s), _up(t)) for s, t in pairs]).mean()


def r_nat_nll(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean teacher NLL of its own argmax next token: ``mean_t -max_v log p_T(v | x_<=t)``."""
    return -F.log_softmax(_up(teacher_logits), dim=-1).amax(-1).mean()


def r_nat_norm(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Squared relative deviation of each token's embedding norm from its seed's, mean over tokens."""
    ratio = _up(x).norm(dim=-1) / (_up(e.detach()).norm(dim=-1) + EPS)  # (B, T)
    return (ratio - 1).pow(2).mean()


def logit_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``p_S - p_T`` (B, T, V): the KL's gradient w.r.t. the student logits, up to the factor tau."""
    return F.softmax(_up(student_logits) / tau, -1) - F.softmax(_up(teacher_logits) / tau, -1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1, eps=EPS)


def gradient_match(h: torch.Tensor, d: torch.Tensor, h2: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """``mean_t cos(h_t, h'_t) * cos(d_t, d'_t)``: hidden states (B, T, H), logit gradients ``d`` (B, T, V)."""
    return (_cos(_up(h), _up(h2)) * _cos(d, d2)).mean()


def diversity(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs of different samples b != c and tokens t of ``cos(h_bt, h_ct) cos(d_bt, d_ct)``.

    Zero for a batch of one. The generator *subtracts* this, pushing samples' gradients apart.
    """
    b = h.shape[0]
    if b < 2:
        return h.new_zeros(())
    hn = F.normalize(_up(h), dim=-1, eps=EPS)
    dn = F.normalize(_up(d), dim=-1, eps=EPS)
    sim = torch.einsum("bth,cth->tbc", hn, hn) * torch.einsum("btv,ctv->tbc", dn, dn)  # (T, B, B)
    off = ~torch.eye(b, dtype=torch.bool, device=sim.device)
    return sim[:, off].mean()
