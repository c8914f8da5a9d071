"""float16 / bfloat16 models: every computation runs in float32 on the private copy, and results
come back in the model's dtype.

torch has no CPU Cholesky, eigh, SVD or QR in half precision (full and kfac used to fit and
then fail at predict with ``"cholesky_cpu" not implemented for 'Half'``; lowrank and projected
failed inside fit), and a curvature summed with an 8-bit mantissa would be rounding noise.  A
half-precision model therefore gives exactly the numbers of the float32 model with the same
(rounded) weights and inputs, rounded to its dtype at the end.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from cases import assert_same_state
from torch import nn

from laplace_ggn import LaplaceWrapper

VARIANTS = [
    ("full", None), ("diag", None), ("kfac", None), ("lowrank", None), ("lowrank", 3),
    ("projected", None), ("projected", 3),
]  # fmt: skip
HALF = [torch.bfloat16, torch.float16]

# three cycles of alternating projections are enough to compare two runs
pytestmark = pytest.mark.filterwarnings("ignore:alternating projections stopped")


def _pair(dtype, likelihood="classification"):
    """A half-precision model and the float32 model of the same (rounded) weights, with data."""
    torch.manual_seed(0)
    C = 3 if likelihood == "classification" else 2
    half = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)).to(dtype)
    full = copy.deepcopy(half).float()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g).to(dtype)
    y = torch.randint(0, C, (12,), generator=g)
    if likelihood == "regression":
        y = torch.randn(12, C, generator=g).to(dtype)
    return half, full, X, y


def _float(t):
    return t.float() if t.is_floating_point() else t


def _run(la, X, y, structure):
    """Every public computation; the results by name."""
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    val = [(X[:6], y[:6])]
    out = {
        "probit": la.predict(X),
        "nn": la.predict(X, "nn", n_samples=3, generator=g()),
        "fcov": la.functional_covariance(X),
        "jacobians": la.jacobians(X),
        "evidence": la.log_marginal_likelihood().detach(),
        "sample": la.sample(2, generator=g()),
        "cov": la.posterior_covariance(),
    }
    if la.likelihood.value == "classification":
        out["bridge"] = la.predict(X, link="bridge")
        out["mc"] = la.predict(X, link="mc", n_samples=3, generator=g())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # edges of the tuning grid
        la.optimize_prior_precision("gridsearch", val_loader=val, n_points=3)
        if la.likelihood.value == "classification":
            la.optimize_prior_precision("marglik_temperature", val_loader=val, n_steps=3)
        else:
            la.optimize_prior_precision("marglik", n_steps=3, tune_sigma_noise=True)
    out["tuned"] = (la.prior_precision, la.sigma_noise, la.predictive_temperature)
    out["tuned_probit"] = la.predict(X)
    if structure in ("full", "lowrank"):
        out["kernel"] = la.kernel_decomposition(X, tol=1e-4, n_samples=0).predictive_variance_kernel
    if structure == "projected":
        out["projected"] = la.sample_projected(2, [(X, y)], generator=g(), n_iterations=3)
    return out


def _flat(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat(o)]
    return [obj.mean, obj.variance]  # a Prediction


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("structure,rank", VARIANTS, ids=[f"{s}{r or ''}" for s, r in VARIANTS])
def test_half_precision_model_equals_its_float32_copy_rounded(structure, rank, dtype, subset):
    half, full, X, y = _pair(dtype)
    before = copy.deepcopy(half.state_dict())
    kw = {"structure": structure, "rank": rank, "subset": subset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfac names the blocks it keeps diagonal
        la = LaplaceWrapper(half, **kw).fit([(X[:7], y[:7]), (X[7:], y[7:])])
        ref = LaplaceWrapper(full, **kw).fit([(_float(X[:7]), y[:7]), (_float(X[7:]), y[7:])])
    got, want = _run(la, X, y, structure), _run(ref, _float(X), y, structure)
    for key in want:
        for a, b in zip(_flat(got[key]), _flat(want[key])):
            if key in ("evidence", "tuned", "kernel"):  # numbers of the fit: float32
                assert a.dtype == torch.float32, key
                assert torch.equal(a, b), key
            else:  # results of the model's kind: its dtype, the float32 values rounded
                assert a.dtype == dtype, (key, a.dtype)
                assert torch.equal(a, b.to(dtype)), key
    state = la.state_dict()
    assert_same_state(state, ref.state_dict())  # float32 throughout
    back = LaplaceWrapper.from_state_dict(half, state)
    assert torch.equal(back.predict(X).mean, la.predict(X).mean)
    for k, v in half.state_dict().items():  # the user's model keeps its dtype and values
        assert v.dtype == dtype and torch.equal(v, before[k]), k


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank"])
def test_half_precision_regression_and_float16_overflow(structure):
    half, full, X, y = _pair(torch.float16, "regression")
    la = LaplaceWrapper(half, "regression", structure=structure, sigma_noise=0.5).fit([(X, y)])
    ref = LaplaceWrapper(full, "regression", structure=structure, sigma_noise=0.5).fit(
        [(_float(X), _float(y))]
    )
    assert torch.equal(la.predict(X).variance, ref.predict(_float(X)).variance.half())
    if structure in ("diag", "kfac"):  # no kernel: variances stay small at any prior
        return
    # a variance of ~1e12 (prior 1e-12, in the kernel of G) exceeds float16's range: refused,
    # never returned as inf
    la.set_hyperparameters(prior_precision=1e-12)
    far = (5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(2))).half()
    with pytest.raises(
        RuntimeError,
        match=r"result in the model's dtype torch\.float16 must be finite; got 0 NaN and \d+ Inf "
        r"values .* A value computed in torch\.float32 exceeds the range of torch\.float16 "
        r"\(largest 65504\)\. Use the float32 model \(model\.float\(\)\), or a larger prior "
        r"precision\.",
    ):
        la.predict(far)
    assert bool(torch.isfinite(la.log_marginal_likelihood()))  # the evidence stays float32
