import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ssd_guard.mixture import GaussianMixture


def random_mixture(b: int, k: int, d: int, seed: int = 0, scale: float = 1.0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, generator=g, dtype=torch.float64)
    means = torch.randn(b, k, d, generator=g, dtype=torch.float64) * 2
    scales = (torch.rand(b, k, d, generator=g, dtype=torch.float64) + 0.3) * scale
    return GaussianMixture.from_logits(logits, means, scales)


def reference(m: GaussianMixture) -> MixtureSameFamily:
    return MixtureSameFamily(
        Categorical(probs=m.weights), Independent(Normal(m.means, m.scales), 1)
    )


def test_renyi2_single_component_closed_form() -> None:
    scales = torch.tensor([[[0.5, 2.0, 1.5]]], dtype=torch.float64)
    m = GaussianMixture(
        torch.ones(1, 1, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64), scales
    )
    # H2 of N(mu, diag(s^2)) = d/2 log(4 pi) + sum log s
    expected = 1.5 * math.log(4 * math.pi) + torch.log(scales).sum().item()
    assert m.renyi2_entropy().item() == pytest.approx(expected, rel=1e-12)


def test_renyi2_matches_monte_carlo() -> None:
    m = random_mixture(3, 4, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    z = m.sample(200_000, generator=g)  # [B, N, d]
    mc = -torch.log(m.log_prob(z).exp().mean(1))
    exact = m.renyi2_entropy()
    assert torch.allclose(exact, mc, atol=0.02), (exact, mc)


def test_log_prob_matches_torch_distributions() -> None:
    m = random_mixture(4, 5, 6, seed=3)
    z = torch.randn(4, 7, 6, dtype=torch.float64)
    ref = reference(m).log_prob(z.transpose(0, 1)).transpose(0, 1)
    assert torch.allclose(m.log_prob(z), ref, atol=1e-10)
    assert torch.allclose(m.log_prob(z[:, 0]), ref[:, 0], atol=1e-10)


def test_mean_and_variance_match_samples() -> None:
    m = random_mixture(2, 3, 4, seed=4)
    z = m.sample(100_000, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(m.mean(), z.mean(1), atol=0.05)
    assert torch.allclose(m.variance(), z.var(1), rtol=0.05, atol=0.05)
    assert m.sample(3).shape == (2, 3, 4)


@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("d", [1, 128])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_stay_finite(k: int, d: int, scale: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, k, generator=g).to(dtype).requires_grad_()
    means = (torch.randn(3, k, d, generator=g) * 10).to(dtype).requires_grad_()
    scales = torch.full((3, k, d), scale, dtype=dtype, requires_grad=True)
    m = GaussianMixture.from_logits(logits, means, scales)
    h = m.renyi2_entropy()
    lp = m.log_prob(torch.randn(3, 5, d, generator=g).to(dtype) * 10)
    assert torch.isfinite(h).all() and torch.isfinite(lp).all()
    (h.sum() + lp.sum()).backward()
    for t in (logits, means, scales):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_identical_components_equal_one_component() -> None:
    one = random_mixture(2, 1, 8, seed=6)
    many = GaussianMixture(
        torch.full((2, 16), 1 / 16, dtype=torch.float64),
        one.means.expand(2, 16, 8).clone(),
        one.scales.expand(2, 16, 8).clone(),
    )
    assert torch.allclose(one.renyi2_entropy(), many.renyi2_entropy(), atol=1e-10)
    z = torch.randn(2, 4, 8, dtype=torch.float64)
    assert torch.allclose(one.log_prob(z), many.log_prob(z), atol=1e-10)


def test_separated_components_add_log_k() -> None:
    # K far-apart equal-weight identical-shape components: H2 = H2(one) + log K.
    k, d = 4, 3
    means = torch.arange(k, dtype=torch.float64).view(1, k, 1).expand(1, k, d) * 1e3
    scales = torch.ones(1, k, d, dtype=torch.float64)
    m = GaussianMixture(torch.full((1, k), 1 / k, dtype=torch.float64), means.clone(), scales)
    single = GaussianMixture(
        torch.ones(1, 1, dtype=torch.float64), means[:, :1].clone(), scales[:, :1]
    )
    assert m.renyi2_entropy().item() == pytest.approx(
        single.renyi2_entropy().item() + math.log(k), abs=1e-9
    )


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        GaussianMixture(torch.ones(2, 3), torch.zeros(2, 3, 4), torch.ones(2, 3, 5))
    m = random_mixture(2, 3, 4)
    with pytest.raises(ValueError, match="z must be"):
        m.log_prob(torch.zeros(2, 5))
    assert m[1].batch_size == 1 and m[0:2].batch_size == 2
