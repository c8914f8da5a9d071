import numpy as np
import pytest
import torch
from cases import make_case, quiet_fit, same_state
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn._checks import Likelihood
from laplace_ggn.likelihoods import Bernoulli, Categorical, Gaussian, get_likelihood
from laplace_ggn.structures import STRUCTURES
from laplace_ggn.testing import dense_output_hessians, nll_per_sample

STRUCTS = list(STRUCTURES)

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


# -- labels and targets of every dtype -------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTS)
def test_class_labels_of_every_integer_dtype_equal_the_int64_fit(structure):
    case = make_case("mlp_classification")
    ref = quiet_fit(LaplaceWrapper(case.model, case.likelihood, structure=structure), case.loader())
    for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        loader = DataLoader(TensorDataset(case.X, case.y.to(dtype)), batch_size=5)
        la = quiet_fit(LaplaceWrapper(case.model, case.likelihood, structure=structure), loader)
        assert same_state(la.state_dict(), ref.state_dict()), dtype
    # bool labels are classes 0 and 1
    yb = case.y % 2
    ref_b = quiet_fit(
        LaplaceWrapper(case.model, case.likelihood, structure=structure),
        DataLoader(TensorDataset(case.X, yb), batch_size=5),
    )
    la = quiet_fit(
        LaplaceWrapper(case.model, case.likelihood, structure=structure),
        DataLoader(TensorDataset(case.X, yb.bool()), batch_size=5),
    )
    assert same_state(la.state_dict(), ref_b.state_dict())


def test_binary_targets_of_integer_and_bool_dtype_accepted():
    case = make_case("mlp_binary")
    ref = LaplaceWrapper(case.model, "binary", structure="full").fit(case.loader())
    for y in (case.y.long(), case.y.int(), case.y.bool(), case.y.to(torch.uint8)):
        la = LaplaceWrapper(case.model, "binary", structure="full").fit(
            DataLoader(TensorDataset(case.X, y), batch_size=5)
        )
        assert same_state(la.state_dict(), ref.state_dict())


@pytest.mark.parametrize(
    ("targets", "name"),
    [
        (np.zeros(4, dtype=np.int64), "ndarray"),
        ([0, 1, 2, 0], "list"),
        (None, "NoneType"),
        (3, "int"),
    ],
)
def test_targets_that_are_not_tensors_raise_type_error_naming_the_type(targets, name):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="diag")
    msg = rf"targets in batch 0 must be a torch\.Tensor; got {name}\. Convert them with torch\.as_tensor"
    with pytest.raises(TypeError, match=msg):
        la.fit([(case.X[:4], targets)])
    assert not la.is_fitted
    la.fit(case.loader())
    before = la.state_dict()
    with pytest.raises(TypeError, match=msg):
        la.fit([(case.X[:4], targets)])
    assert same_state(la.state_dict(), before)
    # the validation loader of the grid search is checked the same way
    with pytest.raises(TypeError, match=r"targets in val_loader batch 0 must be a torch\.Tensor"):
        la.optimize_prior_precision("gridsearch", val_loader=[(case.X[:4], targets)])
    assert same_state(la.state_dict(), before)
    with pytest.raises(TypeError, match=r"targets in batch 0 must be real-valued; got dtype"):
        la.fit([(case.X[:4], torch.zeros(4, dtype=torch.complex64))])


def test_nonfinite_float_labels_reported_as_such():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure="diag")
    y = case.y.double()
    y[2] = float("inf")
    y[3] = -float("inf")
    with pytest.raises(
        ValueError,
        match=r"classification targets \(batch 0\) must be finite class indices; got 0 NaN and "
        r"2 Inf values\.",
    ):
        la.fit([(case.X, y)])
    y[2] = float("nan")
    with pytest.raises(ValueError, match=r"got 1 NaN and 1 Inf values"):
        la.fit([(case.X, y)])
    assert not la.is_fitted


# -- reference NLL ---------------------------------------------------------------------------------


def test_reference_nll_unknown_likelihood():
    with pytest.raises(
        ValueError, match="likelihood must be regression/classification/binary; got 'poisson'"
    ):
        nll_per_sample("poisson", torch.zeros(2, 1), torch.zeros(2))
