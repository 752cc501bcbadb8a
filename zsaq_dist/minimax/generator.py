"""The generator: noise + seed-token embeddings -> ``inputs_embeds`` near natural text.

Adversarial mode (ZSAQ's generator + feature adaptation module, for causal LMs).
Per token ``t`` with seed embedding ``e_t`` (D,) and noise ``z_t`` (Dz,):

    a_t = A_phi( [z_t, e_t / rms(e_t)] )                     two-layer MLP, (D,)
    x_t = e_t + r * ||e_t|| * tanh(a_t) / sqrt(D)

``||tanh(a_t)|| <= sqrt(D)``, so ``||x_t - e_t|| <= r * ||e_t||``: the radius
``r`` (``generator.radius``) bounds the move relative to the token's own
embedding norm and the generator cannot drift into garbage. With
``generator.radius_final`` the trainer sets ``radius`` at every student step, by a cosine from
``generator.radius`` to it (``Inputs.begin_step`` in :mod:`zsaq_dist.minimax.trainer`). The adapter sees
``e_t`` normalised by its RMS so that its input is O(1) for any model. With
``generator.adapter_init: zero`` the adapter's output layer starts at zero, so
``x_t = e_t`` until the ascent moves it: the generator's only move is the one
its ascent found (the first ascent step reaches the output layer alone; the
hidden layer follows from the second).

Other modes: ``self_sample`` gives ``x_t = e_t`` (LLM-QAT baseline, no
adapter); ``noise`` draws ``x_t ~ N(mu, sigma^2)`` with the per-dimension mean
and std of the embedding table (QAT on random data).

Noise for sample ``i`` at step ``k`` comes from a generator seeded by
``(seed, stream, k, i)`` (:func:`noise`), so it does not depend on how the
global batch is split across workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from zsaq_dist.data.seed import sample_rng

# independent random streams of one (seed, step, sample); STREAM_PICK draws a hard seed sequence
STREAM_STUDENT, STREAM_GENERATOR, STREAM_GM, STREAM_NOISE_INPUT, STREAM_PICK = 1, 2, 3, 4, 5


def noise(
    seed: int, step: int, indices: Sequence[int], shape: tuple[int, ...], stream: int = STREAM_STUDENT
) -> torch.Tensor:
    """Standard normal (len(indices), *shape) float32 on CPU; row ``j`` depends only on ``(seed, stream, step, i_j)``."""
    rows = [torch.randn(shape, generator=sample_rng(seed, stream, step, i)) for i in indices]
    return torch.stack(rows) if rows else torch.empty(0, *shape)


class Generator(nn.Module):
    """Bounded adapter ``(z, E(seed)) -> x`` (see module docstring); all state is in ``adapter``."""

    def __init__(
        self, embed_dim: int, noise_dim: int = 64, hidden_dim: int = 128, radius: float = 0.1, init: str = "random"
    ):
        super().__init__()
        if init not in ("random", "zero"):
            raise ValueError(f"adapter init {init!r}: use 'random' or 'zero'")
        self.embed_dim, self.noise_dim, self.radius = embed_dim, noise_dim, radius
        self.adapter = nn.Sequential(
            nn.Linear(noise_dim + embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, embed_dim),
        )
        if init == "zero":  # after the random init, so both draw the same numbers from torch's generator
            nn.init.zeros_(self.adapter[2].weight)
            nn.init.zeros_(self.adapter[2].bias)

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``z`` (B, T, Dz), seed embeddings ``e`` (B, T, D) -> ``x`` (B, T, D) in ``e``'s dtype."""
        ef = e.detach().float()
        norm = ef.norm(dim=-1, keepdim=True)  # (B, T, 1)
        rms = norm / math.sqrt(self.embed_dim)
        a = self.adapter(torch.cat([z.to(ef.device), ef / (rms + 1e-12)], dim=-1))  # (B, T, D)
        x = ef + self.radius * norm * torch.tanh(a) / math.sqrt(self.embed_dim)
        return x.to(e.dtype)


@torch.no_grad()
def embedding_stats(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) of an embedding table (V, D), in float32."""
    w = weight.detach().float()
    return w.mean(0), w.std(0)


def noise_inputs(
    stats: tuple[torch.Tensor, torch.Tensor], seed: int, step: int, indices: Sequence[int], seq_len: int
) -> torch.Tensor:
    """Random embeddings (B, T, D), float32: ``mu + sigma * N(0, 1)`` per token, seeded per sample."""
    mu, sigma = stats
    z = noise(seed, step, indices, (seq_len, mu.numel()), STREAM_NOISE_INPUT).to(mu.device)
    return mu + sigma * z
