import math

import torch

from ssd_guard.student import SSDStudent


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher: z = +/- A x (two equally likely meanings) + noise whose scale depends on x0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 6, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 6, generator=g)
    sigma = torch.where(x[:, :1] > 0, 0.05, 0.5)  # [n,1]
    sign = torch.where(torch.rand(n, 10, 1, generator=g) < 0.5, -1.0, 1.0)
    z = sign * (x @ a.T).unsqueeze(1) + sigma.unsqueeze(1) * torch.randn(n, 10, 2, generator=g)
    return x, z, sigma.squeeze(1)


def true_nll(x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> float:
    a = torch.randn(2, 6, generator=torch.Generator().manual_seed(99))
    mu = (x @ a.T).unsqueeze(1)
    s = sigma.view(-1, 1, 1)

    def comp(m: torch.Tensor) -> torch.Tensor:
        return (-0.5 * ((z - m) / s).pow(2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)

    lp = torch.logsumexp(torch.stack([comp(mu), comp(-mu)]), 0) + math.log(0.5)
    return float(-lp.mean())


def test_student_recovers_known_teacher() -> None:
    x, z, _sigma = synthetic(1500, 0)
    xv, zv, _sv = synthetic(500, 1)
    xt, zt, st = synthetic(500, 2)
    student = SSDStudent(
        2, 64, 2, dropout=0.0, lr=5e-3, max_epochs=80, patience=10, batch_size=256, seed=0
    )
    fitted = student.fit(x, z, xv, zv)
    assert fitted is student
    hist = student.history_
    assert hist.train_nll[-1] < hist.train_nll[0] - 1.0  # NLL decreases
    test_nll = student.nll(xt, zt)
    assert test_nll < true_nll(xt, zt, st) + 0.6, (test_nll, true_nll(xt, zt, st))
    # Two components are needed: a one-component student cannot represent +/- A x.
    single = SSDStudent(1, 64, 2, dropout=0.0, lr=5e-3, max_epochs=30, batch_size=256).fit(
        x, z, xv, zv
    )
    assert single.nll(xt, zt) > test_nll + 1.0
    mix = student.predict(xt)
    # The entropy ranks the noisy prompts (x0 <= 0) above the clean ones.
    h = mix.renyi2_entropy()
    noisy = st > 0.1
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(noisy.numpy(), h.numpy()) > 0.95
    assert h[noisy].mean() > h[~noisy].mean() + 3.0
    # The two component means recover +/- A x.
    a = torch.randn(2, 6, generator=torch.Generator().manual_seed(99))
    target = xt @ a.T
    err = torch.minimum(
        (mix.means[:, 0] - target).norm(dim=1) + (mix.means[:, 1] + target).norm(dim=1),
        (mix.means[:, 1] - target).norm(dim=1) + (mix.means[:, 0] + target).norm(dim=1),
    )
    assert err.median() < 0.3 * target.norm(dim=1).median()


def test_student_is_deterministic_and_round_trips() -> None:
    x, z, _ = synthetic(200, 3)
    a = SSDStudent(3, 32, 2, max_epochs=5, seed=7).fit(x, z)
    b = SSDStudent(3, 32, 2, max_epochs=5, seed=7).fit(x, z)
    for k, v in a.state_tensors().items():
        assert torch.equal(v, b.state_tensors()[k])
    c = SSDStudent.from_state(a.config(), a.state_tensors())
    assert torch.equal(a.predict(x).renyi2_entropy(), c.predict(x).renyi2_entropy())
    # Standardisation statistics are part of the model.
    assert torch.allclose(c.model_.input_mean, x.mean(0))


def test_unfitted_student_raises() -> None:
    import pytest

    with pytest.raises(RuntimeError, match="not fitted"):
        SSDStudent().predict(torch.zeros(1, 3))
