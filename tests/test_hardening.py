"""Every public entry point is safe: bad options, bad data, faults, and the user's model untouched."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from cases import make_case
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.posteriors import FullPosterior, make_prior
from laplace_ggn.posteriors._common import robust_cholesky
from laplace_ggn.structures import STRUCTURES

STRUCTS = list(STRUCTURES)


def _fit(case, structure="full", batch_size=5, **kwargs) -> LaplaceWrapper:
    return LaplaceWrapper(case.model, case.likelihood, structure=structure, **kwargs).fit(
        case.loader(batch_size)
    )


def _assert_same_state(a, b) -> None:
    """Recursive exact equality of state dicts (tensors bit for bit)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same_state(u, v)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


# -- unknown options ---------------------------------------------------------------------------


def test_unknown_likelihood_structure_subset_list_the_valid_ones():
    case = make_case("mlp_classification")
    with pytest.raises(
        ValueError,
        match=r"likelihood must be one of \['regression', "
        r"'classification', 'binary'\]; got 'classifcation'\. Did you mean "
        r"'classification'\?",
    ):
        LaplaceWrapper(case.model, "classifcation")
    with pytest.raises(
        ValueError,
        match=r"structure must be one of \['full', 'diag', 'kfac', "
        r"'lowrank', 'projected'\]; got 'ful'",
    ):
        LaplaceWrapper(case.model, "classification", structure="ful")
    with pytest.raises(
        ValueError,
        match=r"subset must be 'all', 'last_layer' or a list of "
        r"parameter names; got 'lastlayer'\. Did you mean 'last_layer'\?",
    ):
        LaplaceWrapper(case.model, "classification", subset="lastlayer")
    with pytest.raises(ValueError, match=r"unknown: '0\.weigth' \(did you mean '0\.weight'"):
        LaplaceWrapper(case.model, "classification", subset=["0.weigth"])
    with pytest.raises(TypeError, match="subset must be 'all', 'last_layer' or a list"):
        LaplaceWrapper(case.model, "classification", subset=3)


def test_unknown_link_and_method_list_the_valid_ones():
    case = make_case("mlp_classification")
    la = _fit(case, "diag")
    x = case.X[:4]
    with pytest.raises(ValueError, match=r"method must be one of \['glm', 'nn'\]; got 'glmm'"):
        la.predict(x, method="glmm")
    with pytest.raises(
        ValueError,
        match=r"link must be one of \['probit', 'bridge', 'mc'\]; "
        r"got 'probitt'",
    ):
        la.predict(x, link="probitt")
    with pytest.raises(
        ValueError,
        match=r"link must be 'mc' \(or None\) with method='nn'.*"
        r"valid combinations",
    ):
        la.predict(x, method="nn", link="probit")
    with pytest.raises(
        ValueError,
        match=r"method must be one of \['marglik', 'gridsearch', 'marglik_temperature'\]",
    ):
        la.optimize_prior_precision(method="grid")


# -- NaN / Inf, and state kept on failure ------------------------------------------------------


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
    _assert_same_state(before, la.state_dict())
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


# -- malformed data ----------------------------------------------------------------------------


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


# -- the user's model is never touched ---------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (
                list(m._forward_hooks.items()),
                list(m._forward_pre_hooks.items()),
                list(m._backward_hooks.items()),
            )
            for n, m in model.named_modules()
        },
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def _assert_untouched(model: nn.Module, snap: dict, what: str) -> None:
    now = _snapshot(model)
    for k, v in snap["state"].items():
        assert torch.equal(v, now["state"][k]), f"{what} changed {k}"
    for key in ("ptrs", "training", "grad", "hooks", "grads"):
        assert now[key] == snap[key], f"{what} changed the model's {key}"


@pytest.mark.filterwarnings("ignore:kfac. parameters")
@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_user_model_untouched_by_every_entry_point(structure, subset):
    torch.manual_seed(0)
    model = _Net().double()
    model.train()
    model.head.register_forward_hook(lambda m, i, o: None)
    model.body[0].register_forward_pre_hook(lambda m, i: None)
    X = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    model(X).sum().backward()  # the user's grads exist and must stay as they are
    snap = _snapshot(model)
    loader = [(X[:6], y[:6]), (X[6:], y[6:])]  # a DataLoader itself draws from the global RNG
    rng = torch.get_rng_state()
    la = LaplaceWrapper(model, "classification", structure=structure, subset=subset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
    assert torch.equal(rng, torch.get_rng_state()), "fit consumed the global random state"
    _assert_untouched(model, snap, "fit")
    g = torch.Generator().manual_seed(1)
    steps = {
        "predict glm": lambda: la.predict(X[:4], "glm"),
        "predict nn": lambda: la.predict(X[:4], "nn", n_samples=5, generator=g),
        "sample": lambda: la.sample(3, generator=g),
        "functional_covariance": lambda: la.functional_covariance(X[:4]),
        "evidence": lambda: la.log_marginal_likelihood(),
        "marglik tuning": lambda: la.optimize_prior_precision("marglik", n_steps=3),
        "gridsearch tuning": lambda: la.optimize_prior_precision(
            "gridsearch", val_loader=loader, n_points=3
        ),
        "state_dict": lambda: LaplaceWrapper.from_state_dict(model, la.state_dict()).sample(2),
    }
    for what, step in steps.items():
        step()
        _assert_untouched(model, snap, what)
    bad_x = X.clone()
    bad_x[3] = float("nan")
    errors = {
        "fit NaN": lambda: la.fit(DataLoader(TensorDataset(bad_x, y), batch_size=6)),
        "fit labels": lambda: la.fit([(X, y + 5)]),
        "predict NaN": lambda: la.predict(bad_x),
        "predict method": lambda: la.predict(X, "bad"),
        "sample n": lambda: la.sample(0),
        "evidence prior": lambda: la.log_marginal_likelihood(prior_precision=-1.0),
    }
    for what, step in errors.items():
        with pytest.raises(ValueError, match="must"):
            step()
        _assert_untouched(model, snap, what)
    assert all(m.training for m in model.modules())
    # still usable with torch.func afterwards
    params = {n: p.detach() for n, p in model.named_parameters()}
    model.eval()
    J = jacrev(lambda p: functional_call(model, p, (X[:2],)))(params)
    assert J["head.weight"].shape == (2, 3, 3, 5)
    model.train()


# -- non-PD factors ----------------------------------------------------------------------------


def test_robust_cholesky_escalates_jitter_then_raises_naming_the_quantity():
    A = torch.diag(torch.tensor([1.0, 2.0, -1e-13], dtype=torch.float64))
    with pytest.warns(
        RuntimeWarning,
        match=r"test matrix was not positive definite; added "
        r"jitter 1e-10 to its diagonal",
    ):
        L = robust_cholesky(A, "test matrix")
    torch.testing.assert_close(L @ L.T, A, rtol=0, atol=1e-9)
    with pytest.raises(
        RuntimeError,
        match=r"test matrix must be positive definite; Cholesky "
        r"failed even with jitter 1e-05",
    ):
        robust_cholesky(-torch.eye(3, dtype=torch.float64), "test matrix")


def test_indefinite_precision_raises_runtime_error_not_exit():
    case = make_case("mlp_classification")
    la = _fit(case, "full")
    P = la.n_params
    G = -10.0 * torch.eye(P, dtype=torch.float64)
    prior = make_prior(
        torch.ones(4, dtype=torch.float64),
        la.fitted.layout,
        dtype=torch.float64,
        device=torch.device("cpu"),
    )
    post = FullPosterior(la.posterior.mean, G, prior, 1.0)
    with pytest.raises(RuntimeError, match="posterior precision must be positive definite"):
        post.log_det()
    with pytest.raises(RuntimeError, match="posterior precision must be positive definite"):
        post.sample(2)


# -- float32 numerics across prior precisions (every structure) -----------------------------------

VARIANTS32 = [("full", {}), ("diag", {}), ("kfac", {}), ("lowrank", {}), ("lowrank", {"rank": 5})]


def _float32_case(name):
    case = make_case(name)
    model = copy.deepcopy(case.model).float()
    y = case.y if case.likelihood == "classification" else case.y.float()
    loader = DataLoader(TensorDataset(case.X.float(), y), batch_size=4)
    X_test = torch.cat([case.X.float(), 3 * torch.randn(6, 3, generator=torch.Generator())])
    return case.likelihood, model, loader, X_test


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # jitter of the full Cholesky at 1e-12
@pytest.mark.parametrize(
    "structure,kwargs", [pytest.param(s, k, id=s + str(k.get("rank", ""))) for s, k in VARIANTS32]
)
@pytest.mark.parametrize("name", ["mlp_regression", "mlp_binary", "mlp_classification"])
def test_float32_variances_nonnegative_and_evidence_finite_across_priors(name, structure, kwargs):
    lik, model, loader, X = _float32_case(name)
    la = LaplaceWrapper(model, lik, structure=structure, **kwargs).fit(loader)
    T = len(list(model.parameters()))
    priors = [1e-12, 1e-6, 1.0, 1e6, 1e12]
    for lo, hi in [(1e-12, 1e12), (1e12, 1e-12), (1e-12, 1.0)]:  # weights vs biases
        priors.append(torch.tensor([lo, hi] * (T // 2)))
    for prec in priors:
        la.set_hyperparameters(prior_precision=prec)
        what = f"{structure} {kwargs} prior {prec}"
        fvar = torch.diagonal(la.functional_covariance(X), dim1=1, dim2=2)
        assert bool((fvar >= 0).all()), f"{what}: J Σ Jᵀ variance {float(fvar.min())}"
        pvar = la.predict(X).variance
        assert bool((pvar >= 0).all()), f"{what}: predictive variance {float(pvar.min())}"
        svar = la.posterior_covariance().diagonal()
        assert bool((svar >= 0).all()), f"{what}: parameter variance {float(svar.min())}"
        assert bool(torch.isfinite(la.log_marginal_likelihood())), f"{what}: evidence"
        if structure in ("full", "lowrank"):
            rep = la.kernel_decomposition(X, tol=1e-4, n_samples=0)
            for part in (rep.predictive_variance_kernel, rep.predictive_variance_nonkernel):
                assert bool((part >= 0).all()), f"{what}: decomposition {float(part.min())}"


# -- results do not depend on the history of calls ------------------------------------------------


def _history_variants():
    return [pytest.param(s, {}, id=s) for s in STRUCTS] + [
        pytest.param("lowrank", {"rank": 4}, id="lowrank-k4"),
        pytest.param("full", {"prior_precision": torch.tensor([0.5, 2.0, 1.0, 3.0])}, id="full-lw"),
    ]


def _outputs(la, X):
    g = torch.Generator().manual_seed(5)
    return {
        "sample": la.sample(4, generator=g),
        "functional_covariance": la.functional_covariance(X),
        "posterior_covariance": la.posterior_covariance(),
        "log_det": la.posterior.log_det(),
        "evidence": la.log_marginal_likelihood(),
        "predict": la.predict(X).variance,
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("structure,kwargs", _history_variants())
def test_results_and_state_do_not_depend_on_call_history(structure, kwargs):
    # full switched to its eigenbasis once posterior.eig or kernel_decomposition had run:
    # seeded draws differed by up to 3.5 after it
    case = make_case("mlp_classification", 1)
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    fresh = _fit(case, structure, **kwargs)
    used = _fit(case, structure, **kwargs)
    if structure == "full":
        _ = used.posterior.eig
    if structure in ("full", "lowrank"):
        used.kernel_decomposition(case.X, n_samples=2, generator=torch.Generator().manual_seed(0))
    used.predict(case.X, link="mc", generator=torch.Generator().manual_seed(1))
    used.log_marginal_likelihood(prior_precision=3.0)
    prec = used.prior_precision
    used.set_hyperparameters(prior_precision=7.0)  # a derived posterior shares the caches
    used.posterior_covariance()
    used.functional_covariance(case.X)
    used.set_hyperparameters(prior_precision=prec)
    a, b = _outputs(fresh, case.X), _outputs(used, case.X)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{structure} {kwargs}: {key} depends on history"
    _assert_same_state(fresh.state_dict(), used.state_dict())
    loaded = LaplaceWrapper.from_state_dict(case.model, used.state_dict())
    c = _outputs(loaded, case.X)
    for key in a:
        assert torch.equal(a[key], c[key]), f"{structure} {kwargs}: {key} after a round trip"


# -- loaders of single samples (no batch dimension) ------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTS)
def test_loader_of_single_samples_refused_for_every_structure(structure):
    case = make_case("mlp_classification")
    la = _fit(case, structure)  # a previous fit must survive the failed ones
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
    _assert_same_state(before, la.state_dict())


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


# -- state_dict ----------------------------------------------------------------------------------


def _variants():
    out = [pytest.param(s, {}, id=s) for s in STRUCTS]
    if "lowrank" in STRUCTS:
        out.append(pytest.param("lowrank", {"rank": 4}, id="lowrank-k4"))
    out.append(
        pytest.param(
            "full",
            {
                "subset": "last_layer",
                "prior_precision": torch.tensor([0.5, 2.0], dtype=torch.float64),
            },
            id="full-last_layer-layerwise",
        )
    )
    return out


@pytest.mark.parametrize("structure,kwargs", _variants())
def test_state_dict_round_trip_bit_exact(structure, kwargs):
    case = make_case("mlp_classification", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = _fit(case, structure, **kwargs)
    state = la.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    other = copy.deepcopy(case.model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name in state["subset"]:
                p.add_(1.0)  # θ* of the subset must come from the state, not from the model
    la2 = LaplaceWrapper.from_state_dict(other, loaded)
    _assert_same_state(state, la2.state_dict())
    assert torch.equal(la.posterior_covariance(), la2.posterior_covariance())
    assert torch.equal(la.log_marginal_likelihood(), la2.log_marginal_likelihood())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(la.sample(4, generator=g1), la2.sample(4, generator=g2))
    assert torch.equal(la.functional_covariance(case.X), la2.functional_covariance(case.X))
    assert torch.equal(la.predict(case.X).mean, la2.predict(case.X).mean)


def test_state_dict_refuses_other_shapes_and_newer_versions():
    case = make_case("mlp_classification")
    state = _fit(case, "diag").state_dict()
    wider = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(
        ValueError,
        match=r"parameter '0\.weight' must have shape \(4, 3\) as in "
        r"the saved state; got \(5, 3\)",
    ):
        LaplaceWrapper.from_state_dict(wider, state)
    renamed = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with pytest.raises(
        ValueError,
        match=r"model must have parameter '2\.weight' of the saved "
        r"state",
    ):
        LaplaceWrapper.from_state_dict(renamed.double(), state)
    newer = dict(state, format_version=state["format_version"] + 1)
    with pytest.raises(
        ValueError,
        match=r"format_version must be <= 2; got 3\. It was written "
        r"by a newer laplace_ggn",
    ):
        LaplaceWrapper.from_state_dict(case.model, newer)
