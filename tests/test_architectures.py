"""The model families users fit, every structure and subset, against dense references.

Each case fits, checks the posterior covariance against the dense reference of the same
approximation (GGN from per-sample Jacobians, its diagonal, its KFAC form, its top-k
eigenpairs), the evidence against its closed form, the GLM functional covariance at test
inputs against reference Jacobians, and that tuning and both predictives run.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from zoo import (
    ARCH_NAMES,
    dense_ggn_of,
    dense_kfac_of,
    make_arch,
    outputs,
    per_sample_jacobians,
    top_k,
)

from laplace_ggn import LaplaceWrapper
from laplace_ggn.testing import nll_per_sample

ALPHA = 0.7
RANK = 14  # with 10 oversampling columns >= N·(C-1) = 24 = rank of G: the sketch is exact
STRUCTURES = {
    "full": {"structure": "full"},
    "diag": {"structure": "diag"},
    "kfac": {"structure": "kfac"},
    "lowrank": {"structure": "lowrank"},
    "lowrank_k": {"structure": "lowrank", "rank": RANK},
}
SUBSETS = ("all", "last_layer", "names")


@functools.cache
def _arch(name: str):
    return make_arch(name)


@functools.cache
def _reference(name: str, names: tuple[str, ...], structure: str) -> torch.Tensor:
    arch = _arch(name)
    if structure == "kfac":
        return dense_kfac_of(arch, names)
    G = dense_ggn_of(arch, names)
    if structure == "diag":
        return torch.diag(G.diagonal())
    if structure == "lowrank_k":
        return top_k(G, min(RANK, G.shape[0]))
    return G


@functools.cache
def _test_jacobians(name: str, names: tuple[str, ...]) -> torch.Tensor:
    arch = _arch(name)
    return per_sample_jacobians(arch.model, arch.x_test, names)


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_architecture_matrix(name, structure, subset):
    arch = _arch(name)
    chosen = arch.names if subset == "names" else subset
    la = LaplaceWrapper(
        arch.model, "classification", subset=chosen, prior_precision=ALPHA, **STRUCTURES[structure]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfac names its diagonal blocks; nn may loop
        la.fit(arch.batches)
        names = tuple(la.state_dict()["subset"])
        if subset == "last_layer":
            assert names == arch.last_layer
        elif subset == "names":
            assert names == tuple(arch.names)
        P = la.n_params
        G = _reference(name, names, structure)
        Sigma = torch.linalg.inv(G + ALPHA * torch.eye(P, dtype=G.dtype))
        torch.testing.assert_close(la.posterior_covariance(), Sigma, rtol=1e-6, atol=1e-8)

        # evidence in closed form (theta_0 = 0, scalar prior)
        theta = torch.cat(
            [dict(arch.model.named_parameters())[n].detach().reshape(-1) for n in names]
        )
        nll = nll_per_sample("classification", outputs(arch.model, arch.X), arch.y).sum()
        ref_lml = (
            -nll
            - 0.5 * ALPHA * theta.square().sum()
            - 0.5 * torch.logdet(G + ALPHA * torch.eye(P, dtype=G.dtype))
            + 0.5 * P * torch.log(torch.tensor(ALPHA, dtype=G.dtype))
        )
        torch.testing.assert_close(la.log_marginal_likelihood(), ref_lml, rtol=1e-7, atol=1e-6)

        # linearised predictive at test inputs: J Σ Jᵀ with reference Jacobians
        J = _test_jacobians(name, names)
        ref_cov = torch.einsum("bcp,pq,bdq->bcd", J, Sigma, J)
        torch.testing.assert_close(
            la.functional_covariance(arch.x_test), ref_cov, rtol=1e-6, atol=1e-9
        )
        glm = la.predict(arch.x_test)
        nn_pred = la.predict(
            arch.x_test, "nn", n_samples=3, generator=torch.Generator().manual_seed(0)
        )
        for pred in (glm, nn_pred):
            assert pred.mean.shape == (J.shape[0], 3)
            torch.testing.assert_close(
                pred.mean.sum(-1), torch.ones(J.shape[0], dtype=J.dtype), rtol=0, atol=1e-10
            )
            assert bool((pred.variance >= 0).all())
        la.optimize_prior_precision(n_steps=3)
        assert torch.isfinite(la.log_marginal_likelihood())


# ---------------------------------------------------------------------------------------------
# Outputs with a position dimension (B, T, C): the token tagger of test_sequences.py
# ---------------------------------------------------------------------------------------------

SEQ_SUBSETS = {
    "all": "all",
    "last_layer": "last_layer",
    "names": ["v.weight", "head.weight", "head.bias"],
}


@pytest.mark.parametrize("subset", list(SEQ_SUBSETS))
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_sequence_output_model(structure, subset):
    from test_sequences import _data, _dense, _kfac_reference

    from laplace_ggn.testing import dense_jacobian

    model, batches = _data()
    la = LaplaceWrapper(
        model,
        "classification",
        subset=SEQ_SUBSETS[subset],
        prior_precision=ALPHA,
        **STRUCTURES[structure],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfac names the embedding's diagonal block
        la.fit(batches)
    names = tuple(la.state_dict()["subset"])
    if subset == "last_layer":
        assert names == ("head.weight", "head.bias")
    P = la.n_params
    G = _dense(model, batches, names=names)
    eye = torch.eye(P, dtype=G.dtype)
    if structure == "kfac":
        curv = la.posterior.curvature
        ref = _kfac_reference(model, batches)
        for blk in curv.blocks:
            A, B = ref[(blk.weight or blk.bias).split(".")[0]]
            torch.testing.assert_close(blk.A, A, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(blk.B, B, rtol=1e-9, atol=1e-11)
        G = curv.to_dense()
    elif structure == "diag":
        G = torch.diag(G.diagonal())
    elif structure == "lowrank_k":
        G = top_k(G, min(RANK, P))
    Sigma = torch.linalg.inv(G + ALPHA * eye)
    torch.testing.assert_close(la.posterior_covariance(), Sigma, rtol=1e-6, atol=1e-8)
    theta = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    with torch.no_grad():
        nll = sum(
            torch.nn.functional.cross_entropy(
                model(x).reshape(-1, 3), y.reshape(-1), reduction="sum", ignore_index=-100
            )
            for x, y in batches
        )
    ref_lml = (
        -nll
        - 0.5 * ALPHA * theta.square().sum()
        - 0.5 * torch.logdet(G + ALPHA * eye)
        + 0.5 * P * torch.log(torch.tensor(ALPHA, dtype=G.dtype))
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), ref_lml, rtol=1e-7, atol=1e-6)
    x = batches[0][0]
    J = dense_jacobian(model, x, names)  # (B, T, C, P)
    torch.testing.assert_close(
        la.functional_covariance(x),
        torch.einsum("btcp,pq,btdq->btcd", J, Sigma, J),
        rtol=1e-6,
        atol=1e-9,
    )
    for pred in (la.predict(x), la.predict(x, "nn", n_samples=3)):
        assert pred.mean.shape == (3, 5, 3)
        torch.testing.assert_close(pred.mean.sum(-1), torch.ones(3, 5, dtype=J.dtype))
    la.optimize_prior_precision(n_steps=3)
    assert torch.isfinite(la.log_marginal_likelihood())
