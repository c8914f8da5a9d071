"""Property tests over random small MLPs, batch sizes and seeds, for every structure.

Σ is symmetric positive semi-definite, functional covariances J Σ Jᵀ are PSD, the evidence is
finite; for the full structure Σ also equals the dense reference (s·G + Λ₀)⁻¹ computed with
``torch.func.jacrev``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.structures import STRUCTURES
from laplace_ggn.testing import dense_ggn, dense_posterior_covariance

STRUCTS = list(STRUCTURES)
LIKELIHOODS = ["regression", "classification", "binary"]


@st.composite
def problems(draw):
    """A random tiny float64 MLP (<= ~60 parameters), its data and a batch size."""
    seed = draw(st.integers(0, 2**16))
    likelihood = draw(st.sampled_from(LIKELIHOODS))
    d_in = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    C = (
        1
        if likelihood == "binary"
        else draw(st.integers(2 if likelihood == "classification" else 1, 3))
    )
    act = draw(st.sampled_from([nn.Tanh, nn.ReLU, nn.Sigmoid]))
    n = draw(st.integers(1, 9))
    batch_size = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers, prev = [], d_in
    for w in widths:
        layers += [nn.Linear(prev, w), act()]
        prev = w
    layers.append(nn.Linear(prev, C))
    model = nn.Sequential(*layers).double()
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if likelihood == "regression":
        y = torch.randn(n, C, generator=g, dtype=torch.float64)
    elif likelihood == "classification":
        y = torch.randint(0, C, (n,), generator=g)
    else:
        y = torch.randint(0, 2, (n,), generator=g).double()
    prior = draw(st.floats(0.1, 10.0))
    return model, likelihood, X, y, batch_size, prior


def _psd(S: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(S, S.transpose(-1, -2), rtol=1e-10, atol=1e-12, msg=what)
    ev = torch.linalg.eigvalsh(0.5 * (S + S.transpose(-1, -2)))
    top = ev.abs().max().clamp_min(1e-300)
    assert bool((ev >= -1e-10 * top).all()), f"{what} has eigenvalue {float(ev.min()):.3g}"


@pytest.mark.parametrize("structure", STRUCTS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_posterior_properties(structure, problem):
    model, likelihood, X, y, batch_size, prior = problem
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size)
    sigma = 0.8 if likelihood == "regression" else 1.0
    la = LaplaceWrapper(
        model, likelihood, structure=structure, prior_precision=prior, sigma_noise=sigma
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
    Sigma = la.posterior_covariance()
    P = la.n_params
    assert Sigma.shape == (P, P)
    _psd(Sigma, "Σ")
    if structure in ("projected", "ella"):  # supported on a subspace: Σ may be singular
        assert bool((Sigma.diagonal() >= 0).all())
    else:
        assert bool((Sigma.diagonal() > 0).all())
    fc = la.functional_covariance(X)
    assert fc.shape[0] == X.shape[0]
    for b in range(fc.shape[0]):
        _psd(fc[b], f"J Σ Jᵀ of sample {b}")
    lml = la.log_marginal_likelihood()
    assert lml.ndim == 0 and bool(torch.isfinite(lml))
    if structure == "full":
        G = dense_ggn(model, X, y, likelihood)
        ref = dense_posterior_covariance(G, prior, 1.0 / sigma**2)
        torch.testing.assert_close(Sigma, ref, rtol=1e-7, atol=1e-10)
