"""Links on 0 rows and on huge covariances, the float64 retry of the MC factor, the Laplace
bridge's invariance to shifting every logit, the normalised bridge against laplace-torch's, and
the limit of every link as the posterior collapses and as it widens."""

from __future__ import annotations

import math

import pytest
import torch

from laplace_ggn.predictive import laplace_bridge, mc_link, probit, psd_sqrt

DT = torch.float64

# -- links on 0 rows and huge covariances ----------------------------------------------------------


def test_mc_link_and_psd_sqrt_on_zero_rows():
    out = mc_link(torch.zeros(0, 3, dtype=DT), torch.zeros(0, 3, 3, dtype=DT), n_samples=4)
    assert out.mean.shape == out.variance.shape == (0, 3)
    assert psd_sqrt(torch.zeros(0, 3, 3, dtype=DT)).shape == (0, 3, 3)


def test_links_stable_for_huge_finite_covariances():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, 3, generator=g)
    cov = 1e37 * A @ A.transpose(1, 2) / 3  # finite in float32, products of it are not
    f = torch.randn(4, 3, generator=g)
    for out in (
        probit(f, cov),
        laplace_bridge(f, cov),
        laplace_bridge(f, cov, normalize=True),
        mc_link(f, cov, n_samples=16, generator=g),
    ):
        assert bool(torch.isfinite(out.mean).all()) and bool(torch.isfinite(out.variance).all())
        torch.testing.assert_close(out.mean.sum(-1), torch.ones(4), rtol=0, atol=1e-5)
    L = psd_sqrt(cov)
    torch.testing.assert_close(L @ L.transpose(1, 2) / 1e37, cov / 1e37, rtol=1e-3, atol=1e-3)


def test_mc_factor_retried_in_float64_then_named(monkeypatch):
    cov = torch.eye(3).expand(2, 3, 3)
    eigh = torch.linalg.eigh
    calls = []

    def flaky(A, *args, **kwargs):
        calls.append(A.dtype)
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    L = psd_sqrt(cov)
    assert calls == [torch.float32, torch.float64] and L.dtype == torch.float32
    torch.testing.assert_close(L @ L.transpose(1, 2), cov)

    def broken(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(
        RuntimeError,
        match=r"functional covariance J Σ Jᵀ must have an eigendecomposition for the mc link; "
        r"torch\.linalg\.eigh failed \(linalg\.eigh: failed to converge\)",
    ):
        mc_link(torch.zeros(2, 3), cov, n_samples=2)


# -- the Laplace bridge is invariant to shifting every logit ---------------------------------------


def _bridge_of_dirichlet(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian over logits that the Laplace bridge matches to Dirichlet(α) (its inverse map)."""
    K = alpha.shape[1]
    la = alpha.log()
    mu = la - la.mean(-1, keepdim=True)
    v = (1 / alpha) * (1 - 2 / K) + (1 / alpha).sum(-1, keepdim=True) / K**2
    return mu, torch.diag_embed(v)


def test_bridge_of_the_reported_example_is_shift_invariant():
    mu = torch.tensor([[3.0, 0.0, 0.0]], dtype=DT)
    cov = torch.diag(torch.tensor([20.0, 1.0, 1.0], dtype=DT))[None]
    ref = laplace_bridge(mu, cov)
    for shift in (-10.0, 10.0):
        out = laplace_bridge(mu + shift, cov)
        torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.variance, ref.variance, rtol=0, atol=1e-12)
    # the bridge of the projected Gaussian, written out: μ' = (2, -1, -1), diag(PΣP)
    v = torch.tensor([20 * 4 / 9 + 2 / 9, 20 / 9 + 4 / 9 + 1 / 9, 20 / 9 + 1 / 9 + 4 / 9], dtype=DT)
    m = torch.tensor([2.0, -1.0, -1.0], dtype=DT)
    a = (1 - 2 / 3 + m.exp() / 9 * (-m).exp().sum()) / v
    torch.testing.assert_close(ref.mean[0], a / a.sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("C", [2, 3, 5, 10])
def test_bridge_invariant_to_shifts_of_every_logit_and_sample(C):
    g = torch.Generator().manual_seed(C)
    mu = torch.randn(20, C, generator=g, dtype=DT) * 2
    A = torch.randn(20, C, C, generator=g, dtype=DT)
    cov = A @ A.transpose(1, 2) / C
    ref = laplace_bridge(mu, cov)
    one = torch.ones(C, C, dtype=DT)
    for shift in (-1e3, -10.0, -0.5, 3.0, 50.0):
        out = laplace_bridge(mu + shift, cov)
        torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(out.variance, ref.variance, rtol=0, atol=1e-10)
    # a random shift common to all logits of a sample (Σ + τ 11ᵀ) changes nothing either
    for tau in (0.1, 10.0):
        out = laplace_bridge(mu, cov + tau * one)
        torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(ref.mean.sum(-1), torch.ones(20, dtype=DT), rtol=0, atol=1e-12)


def test_binary_bridge_equals_the_two_class_bridge_of_any_shifted_pair():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(10, 1, generator=g, dtype=DT) * 3
    v = torch.rand(10, generator=g, dtype=DT) * 2 + 0.1
    binary = laplace_bridge(a, v[:, None, None], binary=True)
    for shift in (-5.0, 0.0, 7.0):
        # logits (s, s + a): the second class has probability sigmoid(a)
        mu = torch.cat([torch.full_like(a, shift), a + shift], 1)
        cov = torch.zeros(10, 2, 2, dtype=DT)
        cov[:, 1, 1] = v
        two = laplace_bridge(mu, cov)
        torch.testing.assert_close(two.mean[:, 1:], binary.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(two.variance[:, 1:], binary.variance, rtol=0, atol=1e-12)


@pytest.mark.parametrize("C", [2, 3, 5, 10])
def test_bridge_agrees_with_mc_where_the_bridge_is_accurate(C):
    """Gaussians of the Laplace-bridge family (the inverse map of a Dirichlet, α in [5, 50]).

    Measured over 3 seeds of 100 points per C: |bridge − MC| up to 0.005 for C = 2 (the MC
    error of 40,000 samples; median 0.0013), up to 0.071 for C = 3..10 (10,000 samples; median
    at most 0.023). The tolerances below (C = 2: 0.015 max / 0.004 median, with 20,000 samples;
    C > 2: 0.08 / 0.025) leave that margin. The projection onto the zero-sum subspace costs
    accuracy on this family for C > 2 (the bridge of the unprojected diagonal reproduces the
    Dirichlet to 0.009), the price of the shift invariance.
    """
    g = torch.Generator().manual_seed(100 + C)
    alpha = 5 + 45 * torch.rand(100, C, generator=g, dtype=DT)
    mu, cov = _bridge_of_dirichlet(alpha)
    S = 20_000 if C == 2 else 10_000
    ref = mc_link(mu, cov, n_samples=S, generator=torch.Generator().manual_seed(1)).mean
    err = (laplace_bridge(mu, cov).mean - ref).abs()
    tol_max, tol_median = (0.015, 0.004) if C == 2 else (0.08, 0.025)
    assert float(err.max()) <= tol_max, float(err.max())
    assert float(err.median()) <= tol_median, float(err.median())
    # the same after shifting every logit, and with a shared random shift (Σ + 11ᵀ)
    shifted = laplace_bridge(mu + 4.0, cov + torch.ones(C, C, dtype=DT)).mean
    assert float((shifted - ref).abs().max()) <= tol_max


# -- the normalised bridge is laplace-torch's "bridge_norm" ----------------------------------------


def _laplace_torch_bridge(mu, cov, normalize):
    """laplace-torch 0.3's ``bridge`` / ``bridge_norm`` (``BaseLaplace._glm_forward_call``),
    written out: the Gaussian conditioned on Σ_c f_c = 0, the variance normalisation, α."""
    s1, tot = cov.sum(-1), cov.sum((1, 2))
    mu = mu - s1 * mu.sum(-1, keepdim=True) / tot[:, None]
    cov = cov - torch.einsum("bi,bj->bij", s1, cov.sum(-2)) / tot[:, None, None]
    K = mu.shape[-1]
    v = torch.diagonal(cov, dim1=1, dim2=2)
    if normalize:
        m = v.mean(1) / math.sqrt(K / 2)
        mu, v = mu / m.sqrt()[:, None], v / m[:, None]
    alpha = (1 - 2 / K + mu.exp() / K**2 * torch.exp(-mu).sum(1, keepdim=True)) / v
    return alpha / alpha.sum(1, keepdim=True)


def _gaussians(B, C, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    mu = scale * torch.randn(B, C, generator=g, dtype=DT)
    A = torch.randn(B, C, C, generator=g, dtype=DT)
    return mu, A @ A.transpose(1, 2) / C + 0.1 * torch.eye(C, dtype=DT)


@pytest.mark.parametrize("C", [2, 3, 7])
@pytest.mark.parametrize("normalize", [False, True])
def test_bridges_equal_laplace_torch_where_its_zero_sum_correction_is_the_projection(C, normalize):
    """laplace-torch conditions the Gaussian on Σ_c f_c = 0; we project it onto that subspace.
    Both give the same Gaussian when the rows of Σ_f sum to one constant, and on any Gaussian
    after the projection (Pμ, PΣP + 11ᵀ): there the two bridges agree to round-off."""
    mu, S = _gaussians(50, C, seed=C)
    P = torch.eye(C, dtype=DT) - 1.0 / C
    ones = torch.ones(C, C, dtype=DT)
    ours = laplace_bridge(mu, S, normalize=normalize).mean
    ref = _laplace_torch_bridge(mu @ P, P @ S @ P + ones, normalize)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    const_rows = P @ S @ P + 2 * ones / C  # Σ1 = 2·1
    torch.testing.assert_close(
        laplace_bridge(mu, const_rows, normalize=normalize).mean,
        _laplace_torch_bridge(mu, const_rows, normalize),
        rtol=0,
        atol=1e-12,
    )


def test_bridges_equal_laplace_torch_itself():
    """The same comparison against laplace-torch's own code, where it is installed."""
    baselaplace = pytest.importorskip("laplace.baselaplace")

    class _Moments:
        _device, _dtype = torch.device("cpu"), DT

        def __init__(self, mu, cov):
            self.mu, self.cov = mu, cov

        def _glm_predictive_distribution(self, x, joint=False):
            return self.mu.clone(), self.cov.clone()

    mu, S = _gaussians(50, 7, seed=1)
    P = torch.eye(7, dtype=DT) - 1.0 / 7
    for link, normalize in (("bridge", False), ("bridge_norm", True)):
        theirs = baselaplace.BaseLaplace._glm_forward_call(
            _Moments(mu @ P, P @ S @ P + 1.0), None, "classification", False, link, 100, False
        )
        ours = laplace_bridge(mu, S, normalize=normalize).mean
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# -- limits of every link as Σ_f = t·Σ₀ collapses (t → 0) and widens (t → ∞) ----------------------


def _links(mu, S, binary=False):
    g = torch.Generator().manual_seed(0)
    return {
        "probit": probit(mu, S, binary=binary).mean,
        "bridge": laplace_bridge(mu, S, binary=binary).mean,
        "bridge_norm": laplace_bridge(mu, S, binary=binary, normalize=True).mean,
        "mc": mc_link(mu, S, n_samples=4000, binary=binary, generator=g).mean,
    }


@pytest.mark.parametrize("C", [3, 6])
def test_link_limits_as_the_posterior_collapses(C):
    mu, S0 = _gaussians(8, C, seed=10 + C, scale=1.0)
    got, at_one = _links(mu, 1e-12 * S0), _links(mu, S0)
    map_softmax = torch.softmax(mu, -1)
    # probit and mc tend to the MAP softmax (errors O(t), O(√t))
    torch.testing.assert_close(got["probit"], map_softmax, rtol=0, atol=1e-10)
    torch.testing.assert_close(got["mc"], map_softmax, rtol=0, atol=1e-5)
    # the bridge's mean does not depend on the scale of Σ_f at all: no limit to approach
    torch.testing.assert_close(got["bridge"], at_one["bridge"], rtol=1e-9, atol=0)
    assert float((got["bridge"] - map_softmax).abs().max()) > 0.05
    # the normalised bridge tends to the one-hot arg-max of μ
    one_hot = torch.nn.functional.one_hot(mu.argmax(-1), C).to(DT)
    torch.testing.assert_close(got["bridge_norm"], one_hot, rtol=0, atol=1e-10)


@pytest.mark.parametrize("C", [3, 6])
def test_link_limits_as_the_posterior_widens(C):
    mu, S0 = _gaussians(8, C, seed=20 + C, scale=1.0)
    got, at_one = _links(mu, 1e12 * S0), _links(mu, S0)
    # probit tends to the uniform distribution (error O(t^-1/2))
    torch.testing.assert_close(got["probit"], torch.full_like(mu, 1 / C), rtol=0, atol=1e-5)
    # mc to the probability that each logit of N(0, Σ₀) is the largest (the mean drops out)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20_000, 8, C, generator=g, dtype=DT)
    z = torch.einsum("bcd,sbd->sbc", torch.linalg.cholesky(S0), x)
    freq = torch.nn.functional.one_hot(z.argmax(-1), C).to(DT).mean(0)
    torch.testing.assert_close(got["mc"], freq, rtol=0, atol=0.04)
    torch.testing.assert_close(got["bridge"], at_one["bridge"], rtol=1e-9, atol=0)
    # the normalised bridge tends to 1/Σ'_kk normalised, Σ' the projected covariance
    P = torch.eye(C, dtype=DT) - 1.0 / C
    w = 1 / torch.diagonal(P @ S0 @ P, dim1=1, dim2=2)
    torch.testing.assert_close(got["bridge_norm"], w / w.sum(-1, keepdim=True), rtol=0, atol=1e-5)


def test_binary_link_limits_and_the_two_class_bridge_ignores_the_variance():
    g = torch.Generator().manual_seed(3)
    a = 2 * torch.randn(6, 1, generator=g, dtype=DT)
    v = 0.5 + torch.rand(6, 1, 1, generator=g, dtype=DT)
    small, large = _links(a, 1e-12 * v, binary=True), _links(a, 1e12 * v, binary=True)
    for link in ("probit", "mc"):
        torch.testing.assert_close(small[link], torch.sigmoid(a), rtol=0, atol=1e-5)
    torch.testing.assert_close(large["probit"], torch.full_like(a, 0.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(large["mc"], torch.full_like(a, 0.5), rtol=0, atol=0.03)
    # two classes: both projected variances are equal, so the bridge is the MAP sigmoid always
    for t in (1e-12, 1.0, 1e12):
        bridge = laplace_bridge(a, t * v, binary=True).mean
        torch.testing.assert_close(bridge, torch.sigmoid(a), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(small["bridge_norm"], (a > 0).to(DT), rtol=0, atol=1e-10)
    torch.testing.assert_close(large["bridge_norm"], torch.full_like(a, 0.5), rtol=0, atol=1e-5)
