"""Fitting: the data pass reads tuple, dict and mapping batches, checks every batch (finite
values, shapes, dtypes, the batch dimension, empty batches), keeps a previous fit when it fails,
and keeps to the memory budget."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import assert_same_state, fit_case, make_case, quiet_fit, same_state, saturated_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.structures import STRUCTURES

STRUCTS = list(STRUCTURES)
DT = torch.float64

# -- non-finite data; a failed fit keeps the previous one ------------------------------------------


class _Exp(nn.Module):
    def forward(self, x):
        return x.exp()


class _PerFeature(nn.Module):
    """One shared scalar map per input feature: C equals the input width."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x.unsqueeze(-1)).squeeze(-1)


class _SqrtNet(nn.Module):
    """f = sqrt(|W x|): finite outputs, but a NaN Jacobian where W x = 0."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.lin(x).abs().sqrt()


def _with_row(X, i, value):
    X = X.clone()
    X[i] = value
    return X


@pytest.mark.parametrize("structure", STRUCTS)
def test_nonfinite_data_named_by_batch_and_previous_fit_kept(structure):
    case = make_case("mlp_regression")
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure)
    # unfitted wrapper stays unfitted
    bad_x = _with_row(case.X, 6, float("nan"))
    with pytest.raises(ValueError, match=r"input in batch 1 must be finite; got 3 NaN"):
        la.fit(DataLoader(TensorDataset(bad_x, case.y), batch_size=5))
    assert not la.is_fitted
    la.fit(case.loader(5))
    before = la.state_dict()
    lml = la.log_marginal_likelihood()
    inf_x = _with_row(case.X, 11, float("inf"))
    with pytest.raises(ValueError, match=r"input in batch 2 must be finite; got 0 NaN and 3 Inf"):
        la.fit(DataLoader(TensorDataset(inf_x, case.y), batch_size=5))
    bad_y = _with_row(case.y, 7, float("nan"))
    with pytest.raises(ValueError, match=r"targets in batch 1 must be finite"):
        la.fit(DataLoader(TensorDataset(case.X, bad_y), batch_size=5))
    assert_same_state(before, la.state_dict())
    assert torch.equal(lml, la.log_marginal_likelihood())


@pytest.mark.parametrize("structure", STRUCTS)
def test_nonfinite_curvature_with_finite_outputs(structure):
    torch.manual_seed(0)
    model = _SqrtNet().double()
    X = torch.randn(8, 3, dtype=torch.float64)
    X[6] = 0.0  # W x = 0: output 0, Jacobian NaN
    y = torch.randn(8, 2, dtype=torch.float64)
    la = LaplaceWrapper(model, "regression", structure=structure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"(curvature|factor).* in batch 1 must be finite"):
            la.fit(DataLoader(TensorDataset(X, y), batch_size=4))
    assert not la.is_fitted


@pytest.mark.parametrize("structure", STRUCTS)
def test_model_output_nonfinite_named(structure):
    case = make_case("mlp_classification")
    model = nn.Sequential(nn.Linear(3, 3), _Exp()).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    X = case.X.clone()
    X[3] = 1e3  # exp(3000) overflows to Inf
    la = LaplaceWrapper(model, "classification", structure=structure)
    with pytest.raises(ValueError, match=r"in batch 0 must be finite; got \d+ NaN"):
        la.fit(DataLoader(TensorDataset(X, case.y), batch_size=5))
    assert not la.is_fitted


class _MaskedSoftmax(nn.Module):
    """A frozen ``-inf`` parameter masks one class before a softmax: every output is finite."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.mask = nn.Parameter(torch.tensor([0.0, 0.0, -math.inf]), requires_grad=False)

    def forward(self, x):
        return torch.softmax(self.lin(x) + self.mask, -1)


@pytest.mark.parametrize("structure", STRUCTS)
def test_nonfinite_parameters_of_the_subset_refused_naming_them(structure):
    # a model with an inf / NaN parameter used to fit; sample, the evidence and the saved
    # state failed later
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure)
    quiet_fit(la, case.loader())
    before = la.state_dict()
    bad = make_case("mlp_classification").model
    with torch.no_grad():
        bad[2].weight[1, 2] = math.inf
        bad[0].bias[0] = math.nan
    msg = (
        r"parameter '0.bias' of the subset must be finite \(its trained value is the posterior "
        r"mean θ\*\); got 1 NaN and 0 Inf values out of 4 \(shape \(4,\)\) \(also non-finite: "
        r"\['2.weight'\]\)\. The training diverged"
    )
    la_bad = LaplaceWrapper(bad, case.likelihood, structure=structure)
    with pytest.raises(ValueError, match=msg):
        la_bad.fit(case.loader())
    assert not la_bad.is_fitted
    for subset in ("last_layer", ["2.weight"]):
        la_bad = LaplaceWrapper(bad, case.likelihood, structure=structure, subset=subset)
        with pytest.raises(ValueError, match=r"parameter '2.weight' of the subset must be finite"):
            la_bad.fit(case.loader())
    assert same_state(la.state_dict(), before)


@pytest.mark.parametrize("structure", STRUCTS)
def test_nonfinite_parameters_outside_the_subset_named_when_the_pass_fails(structure):
    case = make_case("mlp_classification")
    bad = case.model
    with torch.no_grad():
        bad[0].weight[0, 0] = math.nan
    la = LaplaceWrapper(bad, case.likelihood, structure=structure, subset=["2.weight", "2.bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError,
            match=r"must be finite; .* The model's parameters \['0.weight'\] \(outside the "
            r"subset\) hold NaN or Inf",
        ):
            la.fit(case.loader())
    assert not la.is_fitted
    # a frozen -inf mask outside the subset keeps every output finite: it fits
    torch.manual_seed(0)
    masked = _MaskedSoftmax().double()
    y = torch.softmax(torch.randn(12, 3, dtype=DT), -1)
    la = quiet_fit(
        LaplaceWrapper(masked, "regression", structure=structure),
        DataLoader(TensorDataset(case.X, y), batch_size=5),
    )
    assert la.fitted.layout.names == ("lin.weight", "lin.bias")
    pred = la.predict(case.X)
    assert bool(torch.isfinite(pred.mean).all() and torch.isfinite(pred.variance).all())
    assert bool(torch.isfinite(la.log_marginal_likelihood()))


def test_training_loss_that_overflows_float64_refused():
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.bias.fill_(1e200)
    la = LaplaceWrapper(model, "regression", structure="diag", subset=["weight"])
    with pytest.raises(
        ValueError,
        match=r"training loss in batch 0 must be finite; got inf\. The model's outputs are too "
        r"large for the loss",
    ):
        la.fit([(torch.randn(4, 3, dtype=DT), torch.zeros(4, 1, dtype=DT))])
    assert not la.is_fitted


def test_regression_loss_accumulated_in_float64():
    # outputs ~1e20 through a bias outside the subset: Σ(y - f)² overflows float32 only
    model, X, y = saturated_model("regression", scale=1.0)
    with torch.no_grad():
        model[2].bias.fill_(1e20)
    la = LaplaceWrapper(model, "regression", structure="diag", subset=["2.weight"])
    la.fit([(X, y)])
    loss = la.state_dict()["fit_statistics"]["loss_sum"]
    ref = float(((y.double() - model(X).detach().double()) ** 2).sum())
    assert math.isfinite(loss) and abs(loss - ref) <= 1e-12 * ref
    # the evidence itself cannot be represented in float32: reported, naming the term
    with pytest.raises(
        RuntimeError,
        match=r"log marginal likelihood must be finite; got -inf in torch\.float32: the training "
        r"loss ℓ\(θ\*\) = inf\.",
    ):
        la.log_marginal_likelihood()
    # the predictive does not involve the loss and stays finite
    assert bool(torch.isfinite(la.predict(X[:2]).variance).all())


# -- malformed batches -----------------------------------------------------------------------------


def test_labels_targets_and_loaders_checked():
    clf = make_case("mlp_classification")
    la = LaplaceWrapper(clf.model, "classification", structure="diag")
    y = clf.y.clone()
    y[8] = 3
    with pytest.raises(
        ValueError,
        match=r"targets \(batch 1\) must lie in \[0, 2\] for a model "
        r"with 3 outputs; got values in \[1, 3\]",
    ):
        la.fit(DataLoader(TensorDataset(clf.X, y), batch_size=5))
    onehot = torch.nn.functional.one_hot(clf.y, 3)
    with pytest.raises(ValueError, match=r"class indices of shape \(5,\); got \(5, 3\)"):
        la.fit(DataLoader(TensorDataset(clf.X, onehot), batch_size=5))
    reg = make_case("mlp_regression")
    la_r = LaplaceWrapper(reg.model, "regression", structure="diag")
    with pytest.raises(
        ValueError,
        match=r"regression targets \(batch 0\) must have the output's "
        r"shape \(5, 2\); got \(5, 3\)",
    ):
        la_r.fit(DataLoader(TensorDataset(reg.X, torch.zeros(12, 3).double()), batch_size=5))
    binary = make_case("mlp_binary")
    la_b = LaplaceWrapper(binary.model, "binary", structure="diag")
    with pytest.raises(ValueError, match=r"binary targets \(batch 0\) must be 0 or 1"):
        la_b.fit(DataLoader(TensorDataset(binary.X, binary.y * 2), batch_size=5))
    with pytest.raises(
        ValueError, match="train_loader must yield at least one batch; got an empty loader"
    ):
        la.fit([])
    with pytest.raises(
        ValueError,
        match=r"must be \(input, target\) pairs or mappings; got "
        r"tuple of length 3",
    ):
        la.fit([(clf.X, clf.y, clf.y)])
    with pytest.raises(TypeError, match="train_loader must be an iterable of batches"):
        la.fit(42)
    per_feature = _PerFeature().double()  # C = the input width
    batches = [(clf.X[:5], clf.y[:5]), (torch.randn(5, 4).double(), clf.y[5:10])]
    la_c = LaplaceWrapper(per_feature, "classification", structure="full")
    with pytest.raises(
        ValueError,
        match=r"model output in batch 1 must have 3 columns like "
        r"batch 0; got 4",
    ):
        la_c.fit(batches)
    assert not la_c.is_fitted
    assert not la.is_fitted and not la_r.is_fitted and not la_b.is_fitted


def test_batches_of_mixed_dtype_refused_naming_both_dtypes():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="full")
    batches = [(case.X[:6], case.y[:6]), (case.X[6:].float(), case.y[6:])]
    with pytest.raises(
        ValueError,
        match=r"input in batch 1 must have the model's dtype "
        r"torch\.float64; got torch\.float32\. Cast the data",
    ):
        la.fit(batches)
    assert not la.is_fitted
    # integer inputs (e.g. indices) are not floating and pass the check
    emb = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(4, 3)).double()
    Xi = torch.randint(0, 5, (10, 2))
    la = LaplaceWrapper(emb, "classification", structure="diag", subset=["2.weight", "2.bias"])
    assert la.fit([(Xi, torch.randint(0, 3, (10,)))]).is_fitted


# -- the batch dimension ---------------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTS)
def test_loader_of_single_samples_refused_for_every_structure(structure):
    case = make_case("mlp_classification")
    la = fit_case(case, structure)  # a previous fit must survive the failed ones
    before = la.state_dict()
    single = list(TensorDataset(case.X, case.y))  # x: (3,), y: 0-dim
    with pytest.raises(
        ValueError,
        match=r"targets in batch 0 must have a batch dimension.*"
        r"got a 0-dim target with input of shape \(3,\).*DataLoader\(dataset",
    ):
        la.fit(single)
    reg = make_case("mlp_regression")  # y: (2,) against x: (3,)
    with pytest.raises(
        ValueError,
        match=r"input and targets in batch 0 must have the same batch "
        r"size B \(leading dimension\); got input \(3,\) and targets \(2,\)",
    ):
        LaplaceWrapper(reg.model, "regression", structure=structure).fit(
            list(TensorDataset(reg.X, reg.y))
        )
    # D == C: shapes alone cannot tell one sample from a batch; the first layer can
    square = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    Y3 = torch.randn(12, 3, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"input of layer '0' \(nn\.Linear\) in batch 0 must "
        r"have a batch dimension, shape \(B, \.\.\., 3\); got \(3,\)",
    ):
        LaplaceWrapper(square, "regression", structure=structure).fit(
            list(TensorDataset(case.X, Y3))
        )
    assert_same_state(before, la.state_dict())


@pytest.mark.parametrize("structure", STRUCTS)
def test_single_images_refused_at_the_convolution_that_accepted_them(structure):
    # nn.Conv2d runs on an unbatched (C, H, W) sample, the shape error comes later (a Linear)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 1)).double()
    X, y = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    la = LaplaceWrapper(cnn, "regression", structure=structure).fit([(X, y)])
    before = la.state_dict()
    with pytest.raises(
        ValueError,
        match=r"input of layer '0' \(nn\.Conv2d\) must have a batch dimension, shape "
        r"\(B, C, H, W\); got \(1, 4, 4\)\..*DataLoader\(dataset",
    ):
        la.fit([(X[0], y[0])])  # one image (1, 4, 4) and its target (1,)
    assert_same_state(before, la.state_dict())


class _ScalarFeature(nn.Module):
    """1-D inputs ``(B,)``, 1-D outputs ``(B,)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x.unsqueeze(-1)).squeeze(-1)


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, t):
        return self.out(self.emb(t).mean(1))


@pytest.mark.filterwarnings("ignore:kfac. parameters")
@pytest.mark.parametrize("structure", STRUCTS)
def test_batched_one_dimensional_and_token_inputs_still_fit(structure):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, generator=g, dtype=torch.float64)
    la = LaplaceWrapper(_ScalarFeature().double(), "regression", structure=structure)
    la.fit(DataLoader(TensorDataset(x, torch.sin(x)), batch_size=4))
    assert la.fitted.statistics.n_data == 10 and la.fitted.statistics.n_outputs == 1
    tokens, labels = torch.randint(0, 7, (10, 5), generator=g), torch.randint(0, 2, (10,))
    la = LaplaceWrapper(_Tokens().double(), "classification", structure=structure)
    la.fit(DataLoader(TensorDataset(tokens, labels), batch_size=4))
    assert la.fitted.statistics.n_data == 10 and la.fitted.statistics.n_outputs == 2


# -- batches of 0 rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_empty_batches_are_skipped_anywhere(structure, subset):
    case = make_case("mlp_classification")
    X, y = case.X, case.y
    zero = (X[:0], y[:0])
    ref = LaplaceWrapper(case.model, case.likelihood, structure=structure, subset=subset)
    ref = quiet_fit(ref, [(X[:5], y[:5]), (X[5:], y[5:])])
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure, subset=subset)
    la = quiet_fit(la, [zero, (X[:5], y[:5]), zero, zero, (X[5:], y[5:]), zero])
    assert same_state(la.state_dict(), ref.state_dict())


@pytest.mark.parametrize("structure", STRUCTS)
def test_loader_of_only_empty_batches_refused_and_previous_fit_kept(structure):
    case = make_case("mlp_regression")
    zero = (case.X[:0], case.y[:0])
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure)
    msg = r"train_loader must yield at least one non-empty batch; got 3 batch\(es\), all with 0 rows\."
    with pytest.raises(ValueError, match=msg):
        la.fit([zero, zero, zero])
    assert not la.is_fitted
    la.fit(case.loader())
    before = la.state_dict()
    with pytest.raises(ValueError, match=msg):
        la.fit([zero, zero, zero])
    assert same_state(la.state_dict(), before)
    with pytest.raises(
        ValueError,
        match=r"targets in batch 1 must have as many rows as the input \(0\); got shape \(3, 2\)",
    ):
        la.fit([(case.X[:3], case.y[:3]), (case.X[:0], case.y[:3])])
    assert same_state(la.state_dict(), before)


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("name", ["mlp_classification", "mlp_binary"])
def test_every_label_ignored_refused_and_previous_fit_kept(structure, name):
    # every structure used to fit with N = 0, and tuning then ran on nothing
    case = make_case(name)
    ignored = torch.full_like(case.y, 7 if name == "mlp_binary" else -100)
    kw = {"ignore_index": 7} if name == "mlp_binary" else {}
    la = LaplaceWrapper(case.model, case.likelihood, structure=structure, **kw)
    msg = r"train_loader must hold a target that is not ignore_index=(-100|7); got none \(N = 0\)"
    with pytest.raises(ValueError, match=msg):
        la.fit(DataLoader(TensorDataset(case.X, ignored), batch_size=5))
    assert not la.is_fitted
    quiet_fit(la, case.loader())
    before = la.state_dict()
    with pytest.raises(ValueError, match=msg):
        la.fit([(case.X[:4], ignored[:4]), (case.X[:0], ignored[:0]), (case.X[4:], ignored[4:])])
    assert same_state(la.state_dict(), before)
    # one batch with a label left is a fit on that label (N = 1)
    partly = ignored.clone()
    partly[3] = case.y[3]
    la.fit(DataLoader(TensorDataset(case.X, partly), batch_size=5))
    assert la.fitted.statistics.n_data == 1


# -- memory budget ---------------------------------------------------------------------------------


def test_memory_refusal_names_gb_and_structures_that_fit():
    case = make_case("mlp_classification")  # P = 31
    la = LaplaceWrapper(case.model, "classification", structure="full", memory_budget=1000)
    with pytest.raises(
        ValueError,
        match=r"structure='full' needs 7\.16e-06 GB for P=31 "
        r"parameters in torch\.float64, over the memory budget of 9\.31e-07 GB\. "
        r"Structures that fit: .*'diag' \(2\.31e-07 GB\)",
    ):
        la.fit(case.loader(5))
    assert not la.is_fitted
    # a model whose dense GGN would need ~300 TB: refused before anything of that size exists
    big = nn.Sequential(nn.Linear(3000, 3000))
    la = LaplaceWrapper(big, "regression", structure="full")
    data = [(torch.randn(2, 3000), torch.randn(2, 3000))]
    with pytest.raises(
        ValueError,
        match=r"structure='full' needs 3\.02e\+05 GB for "
        r"P=9003000.*Structures that fit: .*'diag'",
    ):
        la.fit(data)


def test_small_memory_budget_chunks_jacobians_identically():
    case = make_case("mlp_classification")
    big = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    small = LaplaceWrapper(
        case.model, "classification", structure="full", memory_budget=30_000
    ).fit(case.loader())
    torch.testing.assert_close(
        small.posterior_covariance(), big.posterior_covariance(), rtol=1e-12, atol=1e-14
    )


# -- batches as tuples, dicts and mappings; the model output's shape; a failed refit ---------------


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_tuple_dict_and_mapping_inputs_agree():
    torch.manual_seed(0)
    model = TwoInputNet().double()
    X = torch.randn(9, 3, dtype=torch.float64)
    Z = torch.randn(9, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (9,))
    tuple_batches = [((X[i : i + 4], Z[i : i + 4]), y[i : i + 4]) for i in range(0, 9, 4)]
    dict_batches = [({"x": X[i : i + 4], "z": Z[i : i + 4]}, y[i : i + 4]) for i in range(0, 9, 4)]
    map_batches = [
        {"inp": (X[i : i + 4], Z[i : i + 4]), "lab": y[i : i + 4]} for i in range(0, 9, 4)
    ]
    covs = []
    for batches, kw in [
        (tuple_batches, {}),
        (dict_batches, {}),
        (map_batches, dict(input_key="inp", target_key="lab")),
    ]:
        la = LaplaceWrapper(model, "classification", structure="full", **kw).fit(batches)
        covs.append(la.posterior_covariance())
    torch.testing.assert_close(covs[0], covs[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(covs[0], covs[2], rtol=1e-12, atol=1e-14)
    fc = la.functional_covariance((X[:2], Z[:2]))
    assert fc.shape == (2, 2, 2)


def test_model_output_shape_error():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 4)

        def forward(self, x):
            return self.l(x).reshape(-1, 2, 2, 1)

    X = torch.randn(4, 3)
    with pytest.raises(
        ValueError,
        match=r"model output must have shape \(B, C\), \(B,\) or \(B, T, C\) .*; got \(4, 2, 2, 1\)",
    ):
        LaplaceWrapper(Bad(), "regression", structure="diag").fit([(X, torch.randn(4, 4))])


def test_failed_refit_keeps_previous_fit():
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="full").fit(case.loader())
    before = la.posterior_covariance().clone()
    y = case.y.clone()
    y[-1] = 9
    with pytest.raises(ValueError, match="batch 2"):
        la.fit(DataLoader(TensorDataset(case.X, y), 5))
    torch.testing.assert_close(la.posterior_covariance(), before, rtol=0, atol=0)


# -- a refit starts from the constructor's hyperparameters ----------------------------------------


def _tune(la: LaplaceWrapper, case) -> None:
    if case.likelihood == "regression":
        la.optimize_prior_precision("marglik", n_steps=20, lr=0.5, tune_sigma_noise=True)
    else:  # evidence for the prior precision, then a predictive temperature on validation data
        val = [(case.X[:6], case.y[:6])]
        la.optimize_prior_precision("marglik_temperature", val_loader=val, n_steps=20, lr=0.5)
    la.optimize_prior_precision("gridsearch", val_loader=[(case.X, case.y)], n_points=3)


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("name", ["mlp_classification", "mlp_regression"])
def test_refit_equals_a_fresh_fit(structure, name):
    # a refit kept the tuned prior precision, σ, the predictive temperature (T = 7.3 in one
    # run) and the tuning curves of the first data: predictions differed by up to 0.25
    a, b = make_case(name, seed=0), make_case(name, seed=1)
    kw = {"structure": structure, "prior_precision": 2.0}
    if name == "mlp_regression":
        kw["sigma_noise"] = 0.7
    la = LaplaceWrapper(a.model, a.likelihood, **kw)
    quiet_fit(la, a.loader())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _tune(la, a)
    tuned = la.hyperparameters
    assert float(tuned.prior_precision) != 2.0
    assert hasattr(la, "gridsearch_result_") and hasattr(la, "marglik_result_")
    quiet_fit(la, b.loader())
    fresh = quiet_fit(LaplaceWrapper(a.model, a.likelihood, **kw), b.loader())
    for attr in ("prior_precision", "sigma_noise", "predictive_temperature"):
        assert torch.equal(getattr(la, attr), getattr(fresh, attr)), attr
    for attr in ("marglik_result_", "gridsearch_result_", "temperature_result_"):
        assert not hasattr(la, attr), attr
    torch.testing.assert_close(
        la.log_marginal_likelihood(), fresh.log_marginal_likelihood(), rtol=0, atol=0
    )
    for link in ("probit", "bridge") if a.likelihood == "classification" else (None,):
        p, q = la.predict(b.X, link=link), fresh.predict(b.X, link=link)
        torch.testing.assert_close(p.mean, q.mean, rtol=0, atol=0)
        torch.testing.assert_close(p.variance, q.variance, rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(la.sample(3, generator=g1), fresh.sample(3, generator=g2))
    assert_same_state(la.state_dict(), fresh.state_dict())
