"""The registry of structures: a new structure is one collector, one posterior, one line."""

from __future__ import annotations

import pytest
import torch
from cases import make_case

from laplace_ggn import LaplaceWrapper, Structure
from laplace_ggn.collectors import DiagGGNCollector
from laplace_ggn.posteriors import DiagPosterior
from laplace_ggn.structures import (
    STRUCTURES,
    StructureOptions,
    StructureSpec,
    register_structure,
    resolve_structure,
)
from laplace_ggn.testing import dense_ggn, dense_jacobian

DT = torch.float64


class IsotropicCollector:
    """The GGN as a multiple of the identity: its diagonal averaged over the parameters."""

    def __init__(self, fmodel, curvature):
        self.diag = DiagGGNCollector(fmodel, curvature)

    def update(self, x, where="", *, y=None):
        return self.diag.update(x, where, y=y)

    def finalize(self):
        d = self.diag.finalize()
        return torch.full_like(d, float(d.mean()))


ISOTROPIC = StructureSpec(
    name="isotropic",
    make_collector=lambda fm, curv, opts: IsotropicCollector(fm, curv),
    build=lambda d, mean, prior, scale, opts: DiagPosterior(mean, d, prior, scale),
    posterior_cls=DiagPosterior,
    memory_bytes=lambda P, dtype, opts: P * torch.finfo(dtype).bits // 8,
)


@pytest.fixture
def isotropic():
    register_structure(ISOTROPIC)
    try:
        yield ISOTROPIC
    finally:
        STRUCTURES.pop(ISOTROPIC.name, None)


def test_a_registered_toy_structure_fits_and_predicts(isotropic):
    case = make_case("mlp_regression")
    alpha, sigma = 0.7, 0.5
    la = LaplaceWrapper(
        case.model, "regression", structure="isotropic", prior_precision=alpha, sigma_noise=sigma
    )
    la.fit(case.loader())
    assert la.structure == "isotropic"
    G = dense_ggn(case.model, case.X, case.y, "regression", sigma=sigma)
    P = G.shape[0]
    lam = torch.diagonal(G).mean()
    Sigma = torch.eye(P, dtype=DT) / (lam + alpha)
    torch.testing.assert_close(la.posterior_covariance(), Sigma, rtol=1e-10, atol=1e-12)
    x = case.X[:4]
    J = dense_jacobian(case.model, x)
    cov = torch.einsum("bcp,pq,bdq->bcd", J, Sigma, J)
    torch.testing.assert_close(la.functional_covariance(x), cov, rtol=1e-9, atol=1e-12)
    pred = la.predict(x)
    var = torch.diagonal(cov, dim1=-2, dim2=-1) + sigma**2
    torch.testing.assert_close(pred.variance, var, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_an_unregistered_structure_is_refused_naming_the_registered_ones(isotropic):
    case = make_case("mlp_classification")
    STRUCTURES.pop("isotropic")
    try:
        with pytest.raises(
            ValueError, match=r"structure must be one of \['full', .*'projected', 'gp', 'ella'\]"
        ):
            LaplaceWrapper(case.model, "classification", structure="isotropic")
    finally:
        register_structure(ISOTROPIC)


def test_rank_and_sampled_curvature_follow_the_spec(isotropic):
    case = make_case("mlp_classification")
    with pytest.raises(
        ValueError, match="rank applies to structure='lowrank', 'projected' or 'ella'"
    ):
        LaplaceWrapper(case.model, "classification", structure="isotropic", rank=2)
    la = LaplaceWrapper(case.model, "classification", structure="isotropic", curvature="mc")
    assert la.fit(case.loader(), generator=torch.Generator().manual_seed(0)).is_fitted


def test_register_refuses_a_taken_name_and_a_non_spec():
    with pytest.raises(ValueError, match="spec.name must not name a registered structure"):
        register_structure(STRUCTURES["diag"])
    assert register_structure(STRUCTURES["diag"], replace=True) is STRUCTURES["diag"]
    with pytest.raises(TypeError, match="spec must be a StructureSpec; got dict"):
        register_structure({"name": "x"})
    with pytest.raises(ValueError, match="spec.name must be a non-empty lower-case str"):
        register_structure(StructureSpec("Mine", None, None, object, None))


def test_the_structure_enum_names_the_built_in_structures_in_registry_order():
    assert [s.value for s in Structure] == list(STRUCTURES)[: len(Structure)]
    assert resolve_structure(Structure.KFAC) == "kfac" and resolve_structure("KFAC") == "kfac"
    with pytest.raises(ValueError, match="Did you mean 'kfac'"):
        resolve_structure("kfca")


def test_structure_options_are_what_the_spec_functions_read():
    model = torch.nn.Linear(3, 2).double()
    opts = StructureOptions(model, torch.tensor(1.0, dtype=DT), rank=4, memory_budget=1 << 20)
    P = 8
    assert STRUCTURES["lowrank"].memory_bytes(P, DT, opts) > 0
    assert STRUCTURES["full"].memory_bytes(P, DT, opts) == P * P * 8
    with pytest.raises(AttributeError):
        opts.rank = 3


def test_a_toy_structure_saves_and_loads_through_the_registry(isotropic):
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="isotropic").fit(case.loader())
    state = la.state_dict()
    back = LaplaceWrapper.from_state_dict(case.model, state)
    assert back.structure == "isotropic"
    torch.testing.assert_close(back.posterior_covariance(), la.posterior_covariance())
    state["posterior"]["ggn_diag"] = state["posterior"]["ggn_diag"] * float("nan")
    with pytest.raises(ValueError, match=r"state\['posterior'\]\['ggn_diag'\] must be finite"):
        LaplaceWrapper.from_state_dict(case.model, state)
    STRUCTURES.pop("isotropic")
    with pytest.raises(ValueError, match=r"state\['structure'\] must be one of \['full'"):
        LaplaceWrapper.from_state_dict(case.model, la.state_dict())


# -- a structure missing from the registry ---------------------------------------------------------


def test_structure_missing_from_the_registry(monkeypatch):
    from laplace_ggn import structures

    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="diag")
    monkeypatch.delitem(structures.STRUCTURES, "diag")
    with pytest.raises(NotImplementedError, match="structure='diag' is not available"):
        la.fit(case.loader())
