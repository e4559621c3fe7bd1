"""VIBNet gates (seed 002 sec. 3.2, eq. 9-13, 18-19): one multiplicative Gaussian gate per output channel."""

from __future__ import annotations

import math

import torch
from torch import nn


def vib_term(mu: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """Eq. 13's sum over channels of log(1 + mu^2 / sigma^2), written with log sigma^2 for stability."""
    return torch.log1p(mu.square() * torch.exp(-log_sigma2)).sum()


def log_alpha(mu: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """log alpha = log(mu^2 / sigma^2) per channel."""
    return torch.log(mu.square() + 1e-30) - log_sigma2


class Gate(nn.Module):
    """z = mu + eps * sigma (eq. 10) for one channel group, multiplied into every member's output (eq. 9).

    In training each sample draws its own eps ~ N(0, 1) once per forward pass (``sample``), shared by every
    site the group's gate multiplies, so the members of a residual add see the same z. In evaluation z is
    its mean mu, with the channels eq. 18 prunes (alpha < alpha_th) set to zero: the unpruned model then
    computes what the physically pruned one does.
    """

    def __init__(self, channels: int, *, log_sigma2: float, alpha_th: float) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.ones(channels))
        self.log_sigma2 = nn.Parameter(torch.full((channels,), float(log_sigma2)))
        self.alpha_th = alpha_th
        # Set once eq. 18 has been applied physically: every channel left is kept, whatever its alpha is now
        # (a group whose channels all fell below alpha_th keeps its best one).
        self.register_buffer("decided", torch.tensor(False))
        self.current: torch.Tensor | None = None

    def log_alpha(self) -> torch.Tensor:
        return log_alpha(self.mu, self.log_sigma2)

    def vib(self) -> torch.Tensor:
        return vib_term(self.mu, self.log_sigma2)

    def kept(self) -> torch.Tensor:
        """Eq. 18's survivors: alpha >= alpha_th (every channel, once decided)."""
        if bool(self.decided):
            return torch.ones_like(self.mu, dtype=torch.bool)
        return self.log_alpha().detach() >= math.log(self.alpha_th)

    def soft_keep(self, tau: float) -> torch.Tensor:
        """1 - p_l of eq. 19, on log alpha: mean of sigmoid((log alpha - log alpha_th) / tau)."""
        return torch.sigmoid((self.log_alpha() - math.log(self.alpha_th)) / tau).mean()

    def sample(self, batch: int) -> None:
        if self.training:
            eps = torch.randn(batch, self.mu.numel(), device=self.mu.device, dtype=self.mu.dtype)
            self.current = self.mu + eps * torch.exp(0.5 * self.log_sigma2)
        else:
            self.current = (self.mu * self.kept().to(self.mu.dtype)).expand(batch, -1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("Gate.sample(batch) must run before the gated model")
        z = self.current
        return h * z.reshape(*z.shape, *([1] * (h.dim() - 2)))

    @torch.no_grad()
    def select(self, kept: list[int]) -> None:
        """Keep only the channels ``kept`` (after physical pruning), all of them decided."""
        index = torch.tensor(kept, dtype=torch.long, device=self.mu.device)
        self.mu = nn.Parameter(self.mu[index].clone())
        self.log_sigma2 = nn.Parameter(self.log_sigma2[index].clone())
        self.decided.fill_(True)
