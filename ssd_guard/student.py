"""The SSD student: an MLP mixture-density network over answer embeddings.

Follows scikit-learn's conventions: ``__init__`` only stores hyper-parameters, ``fit``
returns ``self``, learned state ends in ``_``. The input standardisation statistics are
buffers of the network, so they travel with the weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ssd_guard.mixture import GaussianMixture

__all__ = ["MixtureDensityNetwork", "SSDStudent", "TrainingHistory"]


class MixtureDensityNetwork(nn.Module):
    """``x [B, in_dim] -> GaussianMixture(K components, out_dim dims)``.

    ``depth`` hidden layers of width ``hidden`` with GELU; the head emits component
    logits, means, and scales through softplus plus a floor ``min_scale``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_components: int,
        hidden: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, n_components, hidden, depth) < 1:
            raise ValueError("in_dim, out_dim, n_components, hidden and depth must be >= 1")
        self.in_dim, self.out_dim, self.n_components = in_dim, out_dim, n_components
        self.min_scale = float(min_scale)
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_components * (1 + 2 * out_dim))
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():  # start with unit-ish scales and spread-out means
            k, d = n_components, out_dim
            bias = self.head.bias.view(k, 1 + 2 * d)
            bias[:, 1 : 1 + d].normal_(std=0.5, generator=torch.Generator().manual_seed(0))
            bias[:, 1 + d :].fill_(math.log(math.expm1(1.0)))
        self.input_mean: torch.Tensor
        self.input_std: torch.Tensor
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> GaussianMixture:  # type: ignore[override,unused-ignore]
        x = (x.to(self.input_mean.dtype) - self.input_mean) / self.input_std
        out = self.head(self.body(x))
        b, k, d = x.shape[0], self.n_components, self.out_dim
        out = out.view(b, k, 1 + 2 * d)
        logits = out[..., 0]
        means = out[..., 1 : 1 + d]
        scales = nn.functional.softplus(out[..., 1 + d :]) + self.min_scale
        return GaussianMixture.from_logits(logits, means, scales)


@dataclass
class TrainingHistory:
    train_nll: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    best_epoch: int = -1


def _mean_nll(
    model: MixtureDensityNetwork, x: torch.Tensor, z: torch.Tensor, bs: int = 1024
) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], bs):
            lp = model(x[i : i + bs]).log_prob(z[i : i + bs])
            total += float(-lp.sum())
            count += lp.numel()
    return total / max(count, 1)


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors (differentiable)."""
    a = a - a.mean()
    b = b - b.mean()
    corr: torch.Tensor = (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-8)
    return corr


class SSDStudent:
    """Fit a mixture-density student by conditional maximum likelihood.

    ``fit(X, Z)`` takes prompt representations ``X [N, in_dim]`` and teacher answer
    embeddings ``Z [N, S, d]`` (all ``S`` samples of each prompt are targets). With a
    validation set, training stops early on validation NLL and keeps the best epoch.
    """

    def __init__(
        self,
        n_components: int = 5,
        hidden: int = 256,
        depth: int = 3,
        *,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 300,
        patience: int = 20,
        batch_size: int = 128,
        min_scale: float = 1e-3,
        rank_weight: float = 0.0,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        # the head, its training, the loss
        self.n_components, self.hidden, self.depth = n_components, hidden, depth
        self.dropout, self.lr, self.weight_decay = dropout, lr, weight_decay
        self.max_epochs, self.patience, self.batch_size = max_epochs, patience, batch_size
        self.min_scale, self.rank_weight = min_scale, rank_weight
        self.seed, self.device = seed, device

    def get_params(self) -> dict[str, Any]:
        keys = [
            "n_components",
            "hidden",
            "depth",
            "dropout",
            "lr",
            "weight_decay",
            "max_epochs",
            "patience",
            "batch_size",
            "min_scale",
            "rank_weight",
            "seed",
        ]
        return {k: getattr(self, k) for k in keys}

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def fit(
        self,
        X: torch.Tensor,
        Z: torch.Tensor,
        X_val: torch.Tensor | None = None,
        Z_val: torch.Tensor | None = None,
        *,
        dispersion: torch.Tensor | None = None,
        dispersion_val: torch.Tensor | None = None,
    ) -> SSDStudent:
        """Maximum likelihood, plus (with ``rank_weight > 0`` and ``dispersion`` [N])
        an auxiliary term that ties the mixture's Rényi-2 entropy to the teacher's
        dispersion: ``rank_weight * (1 - corr(H, log dispersion))`` over each batch.
        The model stays a mixture fitted by likelihood; the term only orders entropies
        the way the teacher's sample spread orders prompts. Early stopping then watches
        the same combined loss on the validation set.
        """
        if Z.dim() == 2:
            Z = Z.unsqueeze(1)
        if X.dim() != 2 or Z.dim() != 3 or X.shape[0] != Z.shape[0]:
            raise ValueError(
                f"expected X [N, in] and Z [N, S, d]; got {tuple(X.shape)}, {tuple(Z.shape)}"
            )
        dev = self._device()
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        X = X.float().to(dev)
        Z = Z.float().to(dev)
        model = MixtureDensityNetwork(
            X.shape[1],
            Z.shape[2],
            self.n_components,
            self.hidden,
            self.depth,
            self.dropout,
            self.min_scale,
        ).to(dev)
        model.set_standardisation(X.mean(0), X.std(0))
        has_val = X_val is not None and Z_val is not None
        if has_val:
            assert X_val is not None and Z_val is not None
            X_val = X_val.float().to(dev)
            Z_val = (Z_val.unsqueeze(1) if Z_val.dim() == 2 else Z_val).float().to(dev)
        use_rank = self.rank_weight > 0 and dispersion is not None
        log_d = log_d_val = None
        if use_rank:
            assert dispersion is not None
            log_d = dispersion.float().clamp_min(1e-6).log().to(dev)
            if has_val and dispersion_val is not None:
                log_d_val = dispersion_val.float().clamp_min(1e-6).log().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        history = TrainingHistory()
        best_state = copy.deepcopy(model.state_dict())
        best = math.inf
        bad = 0
        n = X.shape[0]
        for epoch in range(self.max_epochs):
            model.train()
            perm = torch.randperm(n, generator=gen).to(dev)
            total = 0.0
            for i in range(0, n, self.batch_size):
                idx = perm[i : i + self.batch_size]
                mix = model(X[idx])
                loss = -mix.log_prob(Z[idx]).mean()
                if use_rank and idx.numel() > 2:
                    assert log_d is not None
                    loss = loss + self.rank_weight * (1 - _corr(mix.renyi2_entropy(), log_d[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
                total += float(loss.detach()) * idx.numel()
            history.train_nll.append(total / n)
            if has_val:
                assert X_val is not None and Z_val is not None
                val = _mean_nll(model, X_val, Z_val)
                history.val_nll.append(val)
                if use_rank and log_d_val is not None:
                    with torch.no_grad():
                        h_val = model(X_val).renyi2_entropy()
                    val = val + self.rank_weight * (1 - float(_corr(h_val, log_d_val)))
                if val < best - 1e-4:
                    best, bad = val, 0
                    best_state = copy.deepcopy(model.state_dict())
                    history.best_epoch = epoch
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
        if has_val:
            model.load_state_dict(best_state)
        else:
            history.best_epoch = len(history.train_nll) - 1
        model.eval()
        self.model_ = model
        self.history_ = history
        self.n_features_in_ = int(X.shape[1])
        self.dim_ = int(Z.shape[2])
        self.best_val_nll_ = best if has_val else float("nan")
        return self

    def _check_fitted(self) -> MixtureDensityNetwork:
        if not hasattr(self, "model_"):
            raise RuntimeError("this SSDStudent is not fitted yet; call fit() first")
        return self.model_

    def predict(self, X: torch.Tensor) -> GaussianMixture:
        model = self._check_fitted()
        dev = next(model.parameters()).device
        with torch.no_grad():
            mix: GaussianMixture = model(X.to(dev))
        return mix

    def nll(self, X: torch.Tensor, Z: torch.Tensor) -> float:
        """Mean negative log-likelihood per teacher sample."""
        model = self._check_fitted()
        dev = next(model.parameters()).device
        Z = Z.unsqueeze(1) if Z.dim() == 2 else Z
        return _mean_nll(model, X.float().to(dev), Z.float().to(dev))

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "in_dim": self.n_features_in_,
            "out_dim": self.dim_,
            "n_components": self.n_components,
            "hidden": self.hidden,
            "depth": self.depth,
            "min_scale": self.min_scale,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().contiguous() for k, v in self._check_fitted().state_dict().items()
        }

    @classmethod
    def from_state(
        cls,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
    ) -> SSDStudent:
        obj = cls(
            n_components=int(config["n_components"]),
            hidden=int(config["hidden"]),
            depth=int(config["depth"]),
            min_scale=float(config["min_scale"]),
            device=device,
        )
        model = MixtureDensityNetwork(
            int(config["in_dim"]),
            int(config["out_dim"]),
            obj.n_components,
            obj.hidden,
            obj.depth,
            0.0,
            obj.min_scale,
        )
        model.load_state_dict(tensors, strict=True)
        model.to(obj._device()).eval()
        obj.model_ = model
        obj.history_ = TrainingHistory()
        obj.n_features_in_ = int(config["in_dim"])
        obj.dim_ = int(config["out_dim"])
        obj.best_val_nll_ = float(config.get("val_nll", float("nan")))
        return obj
