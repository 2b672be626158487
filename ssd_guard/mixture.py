"""Diagonal Gaussian mixtures: the distribution the SSD student predicts.

Pure torch math, batched over prompts and differentiable, on any device. Every density
is computed in log space so that nothing under- or overflows for large ``d`` or tiny
scales.
"""

from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixture"]

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture:
    """A batch of ``B`` mixtures with ``K`` diagonal Gaussian components in ``d`` dims.

    Args:
        weights: mixture weights ``[B, K]`` (non-negative, rows summing to one). Use
            :meth:`from_logits` when you have unnormalised logits.
        means: component means ``[B, K, d]``.
        scales: component standard deviations ``[B, K, d]`` (strictly positive).
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> None:
        if weights.dim() != 2 or means.dim() != 3 or scales.dim() != 3:
            raise ValueError(
                "expected weights [B,K], means [B,K,d], scales [B,K,d]; got "
                f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(scales.shape)}"
            )
        if means.shape != scales.shape or means.shape[:2] != weights.shape:
            raise ValueError(
                "shape mismatch: weights "
                f"{tuple(weights.shape)}, means {tuple(means.shape)}, scales {tuple(scales.shape)}"
            )
        self.weights = weights
        self.means = means
        self.scales = scales
        self._log_weights = torch.log(weights.clamp_min(torch.finfo(weights.dtype).tiny))

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, means: torch.Tensor, scales: torch.Tensor
    ) -> GaussianMixture:
        """Build a mixture from unnormalised component logits (numerically stable)."""
        obj = cls.__new__(cls)
        log_w = torch.log_softmax(logits, dim=-1)
        GaussianMixture.__init__(obj, log_w.exp(), means, scales)
        obj._log_weights = log_w
        return obj

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch_size(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.means.shape[1])

    @property
    def dim(self) -> int:
        return int(self.means.shape[2])

    @property
    def log_weights(self) -> torch.Tensor:
        return self._log_weights

    def __getitem__(self, idx: int | slice | torch.Tensor) -> GaussianMixture:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        obj = GaussianMixture.__new__(GaussianMixture)
        obj.weights = self.weights[idx]
        obj.means = self.means[idx]
        obj.scales = self.scales[idx]
        obj._log_weights = self._log_weights[idx]
        return obj

    def to(self, device: torch.device | str) -> GaussianMixture:
        obj = GaussianMixture.__new__(GaussianMixture)
        obj.weights = self.weights.to(device)
        obj.means = self.means.to(device)
        obj.scales = self.scales.to(device)
        obj._log_weights = self._log_weights.to(device)
        return obj

    def detach(self) -> GaussianMixture:
        obj = GaussianMixture.__new__(GaussianMixture)
        obj.weights = self.weights.detach()
        obj.means = self.means.detach()
        obj.scales = self.scales.detach()
        obj._log_weights = self._log_weights.detach()
        return obj

    # ------------------------------------------------------------------ densities
    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Per-component log densities ``[B, N, K]`` for ``z`` of shape ``[B, N, d]``."""
        diff = (z.unsqueeze(2) - self.means.unsqueeze(1)) / self.scales.unsqueeze(1)  # [B,N,K,d]
        log_det = torch.log(self.scales).sum(-1).unsqueeze(1)  # [B,1,K]
        return -0.5 * (diff.pow(2).sum(-1) + self.dim * _LOG_2PI) - log_det

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of points under each prompt's mixture.

        ``z`` is ``[B, d]`` (one point per mixture, returns ``[B]``) or ``[B, N, d]``
        (``N`` candidate points per mixture, returns ``[B, N]``).
        """
        squeeze = z.dim() == 2
        if squeeze:
            z = z.unsqueeze(1)
        if z.dim() != 3 or z.shape[0] != self.batch_size or z.shape[-1] != self.dim:
            raise ValueError(
                f"z must be [B={self.batch_size}, d={self.dim}] or [B, N, d]; got {tuple(z.shape)}"
            )
        comp = self.component_log_prob(z.to(self.means.dtype))
        out = torch.logsumexp(comp + self._log_weights.unsqueeze(1), dim=-1)
        return out.squeeze(1) if squeeze else out

    def renyi2_entropy(self) -> torch.Tensor:
        """Exact Rényi-2 (collision) entropy ``[B]``.

        ``H2 = -log sum_i sum_j pi_i pi_j N(mu_i; mu_j, Sigma_i + Sigma_j)``: the product
        of two Gaussians integrates in closed form, so no sampling is involved. Computed
        with ``logsumexp`` over all ``K*K`` pairs.
        """
        var = self.scales.pow(2)
        pair_var = var.unsqueeze(2) + var.unsqueeze(1)  # [B,K,K,d]
        diff = self.means.unsqueeze(2) - self.means.unsqueeze(1)  # [B,K,K,d]
        log_overlap = -0.5 * (
            (diff.pow(2) / pair_var).sum(-1) + torch.log(pair_var).sum(-1) + self.dim * _LOG_2PI
        )
        log_w = self._log_weights
        terms = log_w.unsqueeze(2) + log_w.unsqueeze(1) + log_overlap
        return -torch.logsumexp(terms.flatten(1), dim=-1)

    def mean(self) -> torch.Tensor:
        """Mixture mean ``[B, d]``: the semantic consensus of the predicted answers."""
        return (self.weights.unsqueeze(-1) * self.means).sum(1)

    def variance(self) -> torch.Tensor:
        """Per-dimension mixture variance ``[B, d]`` (law of total variance)."""
        m = self.mean()
        second = (self.weights.unsqueeze(-1) * (self.scales.pow(2) + self.means.pow(2))).sum(1)
        return second - m.pow(2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples per mixture, ``[B, n, d]`` (not differentiable in the weights)."""
        b, _k, d = self.means.shape
        comp = torch.multinomial(self.weights.detach(), n, replacement=True, generator=generator)
        idx = comp.unsqueeze(-1).expand(b, n, d)
        mu = self.means.gather(1, idx)
        sd = self.scales.gather(1, idx)
        eps = torch.randn(
            (b, n, d), generator=generator, device=self.means.device, dtype=self.means.dtype
        )
        return mu + sd * eps

    def __repr__(self) -> str:
        return f"GaussianMixture(B={self.batch_size}, K={self.n_components}, d={self.dim})"
