import pytest
import torch

from laplace_ggn._checks import Likelihood
from laplace_ggn.likelihoods import Bernoulli, Categorical, Gaussian, get_likelihood
from laplace_ggn.testing import dense_output_hessians, nll_per_sample

KINDS = {"regression": 3, "classification": 4, "binary": 1}


def _data(kind, g):
    C = KINDS[kind]
    f = torch.randn(6, C, dtype=torch.float64, generator=g)
    if kind == "regression":
        y = torch.randn(6, C, dtype=torch.float64, generator=g)
    elif kind == "classification":
        y = torch.randint(0, C, (6,), generator=g)
    else:
        y = torch.randint(0, 2, (6,), generator=g).double()
    return f, y


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_and_sqrt_match_autograd(kind, seed):
    g = torch.Generator().manual_seed(seed)
    f, y = _data(kind, g)
    lik = get_likelihood(Likelihood(kind))
    yc = lik.check_targets(f, y)
    ref = dense_output_hessians(kind, f, y)
    torch.testing.assert_close(lik.hessian(f), ref, rtol=1e-10, atol=1e-12)
    L = lik.sqrt_hessian(f)
    torch.testing.assert_close(L @ L.transpose(1, 2), ref, rtol=1e-10, atol=1e-12)
    u = torch.randn(f.shape, dtype=f.dtype, generator=g)
    torch.testing.assert_close(
        lik.hessian_matvec(f, u), torch.einsum("bcd,bd->bc", ref, u), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(lik.nll(f, yc), nll_per_sample(kind, f, y).sum(), rtol=1e-12, atol=0)
    fr = f.clone().requires_grad_(True)
    (gref,) = torch.autograd.grad(nll_per_sample(kind, fr, y).sum(), fr)
    torch.testing.assert_close(lik.grad_f(f, yc), gref, rtol=1e-10, atol=1e-12)


def test_gaussian_nll_with_sigma():
    g = torch.Generator().manual_seed(0)
    f, y = _data("regression", g)
    lik = Gaussian()
    torch.testing.assert_close(
        lik.nll(f, y, 0.3), nll_per_sample("regression", f, y, 0.3).sum(), rtol=1e-12, atol=0
    )


def test_sampling_statistics():
    g = torch.Generator().manual_seed(0)
    f = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64).expand(40000, 3)
    y = Categorical().sample(f, generator=g)
    freq = torch.bincount(y, minlength=3).double() / y.numel()
    torch.testing.assert_close(freq, torch.softmax(f[0], -1), atol=0.01, rtol=0)
    yb = Bernoulli().sample(f[:, :1], generator=g)
    assert abs(float(yb.mean()) - float(torch.sigmoid(f[0, 0]))) < 0.01
    yg = Gaussian().sample(f, sigma=2.0, generator=g)
    assert abs(float((yg - f).std()) - 2.0) < 0.05


def test_target_validation_messages():
    f = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\].*got values in \[0, 5\]"):
        Categorical().check_targets(f, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"class indices of shape \(4,\); got \(4, 3\)"):
        Categorical().check_targets(f, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="must be integer class indices"):
        Categorical().check_targets(f, torch.tensor([0.5, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"output's shape \(4, 3\); got \(4, 2\)"):
        Gaussian().check_targets(f, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="needs a model with 1 output"):
        Bernoulli().check_targets(f, torch.zeros(4))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        Bernoulli().check_targets(torch.zeros(4, 1), torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"binary targets must have shape \(4,\) or \(4, 1\)"):
        Bernoulli().check_targets(torch.zeros(4, 1), torch.zeros(3))


def test_get_likelihood_converts_options_once_and_passes_objects_through():
    lik = get_likelihood("classification")
    assert isinstance(lik, Categorical)
    assert get_likelihood(lik) is lik
    assert isinstance(get_likelihood(Likelihood.BINARY), Bernoulli)
    with pytest.raises(ValueError, match=r"likelihood must be one of \['regression'"):
        get_likelihood("gaussian")


@pytest.mark.parametrize("kind", list(KINDS))
def test_predictive_mapping_fit_metric_and_targets(kind):
    g = torch.Generator().manual_seed(3)
    f, y = _data(kind, g)
    lik = get_likelihood(Likelihood(kind))
    yc = lik.check_targets(f, y)
    out = f + 0.1 * torch.randn(5, *f.shape, dtype=f.dtype, generator=g)  # (S, B, C)
    pred = lik.sample_predictive(out, 0.5)
    probs = {"regression": out, "classification": out.softmax(-1), "binary": out.sigmoid()}[kind]
    torch.testing.assert_close(pred.mean, probs.mean(0))
    noise = 0.25 if kind == "regression" else 0.0
    torch.testing.assert_close(pred.variance, probs.var(0) + noise)
    total = lik.fit_metric_sum(out, yc)
    assert total.shape == (5,)
    metric = lik.fit_metric(total, f.shape[0], f.shape[1])
    if kind == "regression":
        want = ((out - yc) ** 2).mean((1, 2)).sqrt()
    elif kind == "classification":
        want = (out.argmax(-1) == yc).double().mean(-1)
    else:
        want = ((out > 0).double() == yc).double().mean((1, 2))
    torch.testing.assert_close(metric, want)
    assert lik.metric_name == ("RMSE" if kind == "regression" else "accuracy")
    mapped = lik.check_targets(f, lik.targets_from_outputs(f))
    assert mapped.shape == yc.shape
    assert lik.has_noise == (kind == "regression")
    assert lik.predicts_probabilities == (kind != "regression")
