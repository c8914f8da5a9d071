"""Saved states: every key validated at load time, dtype casting, architecture, format versions,
bit-exact round trips of every structure."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from cases import assert_same_state, fit_case, make_case
from torch import nn

from laplace_ggn import LaplaceWrapper
from laplace_ggn.persistence import STATE_FORMAT_VERSION, check_state
from laplace_ggn.structures import STRUCTURES

ALL_STRUCTS = list(STRUCTURES)

STRUCTS = ["full", "diag", "kfac", "lowrank"]
POSTERIOR_TENSOR = {
    "full": "ggn",
    "diag": "ggn_diag",
    "kfac": "block.0.A",
    "lowrank": "eigenvectors",
}


def _state(structure="diag", **kwargs):
    case = make_case("mlp_classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(case.model, "classification", structure=structure, **kwargs)
        la.fit(case.loader())
    return case, la.state_dict()


def _load(case, state):
    return LaplaceWrapper.from_state_dict(case.model, state)


def test_state_must_be_a_dict_with_an_integer_format_version():
    case, state = _state()
    with pytest.raises(
        TypeError, match=r"state must be a dict from LaplaceWrapper\.state_dict\(\); got list\."
    ):
        _load(case, [state])
    no_version = {k: v for k, v in state.items() if k != "format_version"}
    with pytest.raises(ValueError, match=r"state must hold the key 'format_version'.*got keys \["):
        _load(case, no_version)
    for bad, shown in [("2", r"'2' \(str\)"), (2.0, r"2\.0 \(float\)"), (True, r"True \(bool\)")]:
        with pytest.raises(
            TypeError, match=r"state\['format_version'\] must be an int in \[1, 2\]; got " + shown
        ):
            _load(case, {**state, "format_version": bad})
    with pytest.raises(ValueError, match=r"state\['format_version'\] must be an int in \[1, 2\]; "):
        _load(case, {**state, "format_version": 0})
    with pytest.raises(ValueError, match=r"format_version must be <= 2; got 3\. It was written by"):
        _load(case, {**state, "format_version": 3})
    assert state["format_version"] == STATE_FORMAT_VERSION == 2


@pytest.mark.parametrize("key", ["mean", "posterior", "fit_statistics", "model_parameters"])
def test_missing_keys_are_named(key):
    case, state = _state()
    with pytest.raises(
        ValueError, match=rf"state must hold the keys \[.*\]; missing \['{key}'\] \(got keys"
    ):
        _load(case, {k: v for k, v in state.items() if k != key})


@pytest.mark.parametrize("structure", STRUCTS)
def test_nan_in_mean_curvature_or_statistics_is_refused(structure):
    case, state = _state(structure)
    mean = state["mean"].clone()
    mean[2] = float("nan")
    with pytest.raises(ValueError, match=r"state\['mean'\] must be finite; got 1 NaN and 0 Inf"):
        _load(case, {**state, "mean": mean})
    key = POSTERIOR_TENSOR[structure]
    bad = state["posterior"][key].clone()
    bad.view(-1)[0] = float("inf")
    post = {**state["posterior"], key: bad}
    with pytest.raises(
        ValueError, match=rf"state\['posterior'\]\['{key}'\] must be finite; got 0 NaN and 1 Inf"
    ):
        _load(case, {**state, "posterior": post})
    stats = {**state["fit_statistics"], "loss_sum": float("nan")}
    with pytest.raises(
        ValueError,
        match=r"state\['fit_statistics'\]\['loss_sum'\] must be finite and >= 0; got nan",
    ):
        _load(case, {**state, "fit_statistics": stats})
    for key, value in [("prior_precision", float("nan")), ("sigma_noise", torch.tensor(0.0))]:
        with pytest.raises(ValueError, match=rf"state\['{key}'\] must be finite and > 0; got"):
            _load(case, {**state, key: value})


@pytest.mark.parametrize("saved", STRUCTS)
@pytest.mark.parametrize("claimed", STRUCTS)
def test_state_of_another_structure_is_refused_naming_the_keys(saved, claimed):
    if saved == claimed:
        return
    case, state = _state(saved)
    if claimed == "kfac":
        match = r"state\['posterior'\] must hold the keys \['n_blocks', 'diag_names', 'diag'\]"
    else:
        match = (
            rf"state\['posterior'\] must hold the keys .*; missing .*Was the state saved with "
            rf"another structure than '{claimed}'\?"
        )
    with pytest.raises(ValueError, match=match):
        _load(case, {**state, "structure": claimed})


def test_wrong_types_and_shapes_are_named():
    case, state = _state("full")
    with pytest.raises(TypeError, match=r"state\['posterior'\] must be a dict; got \[\] \(list\)"):
        _load(case, {**state, "posterior": []})
    with pytest.raises(TypeError, match=r"state\['mean'\] must be a floating tensor; got \[0\.0\]"):
        _load(case, {**state, "mean": [0.0]})
    with pytest.raises(
        ValueError, match=r"state\['mean'\] must have shape \(31,\); got \(30,\)\. Was the state"
    ):
        _load(case, {**state, "mean": state["mean"][:30]})
    with pytest.raises(
        ValueError, match=r"state\['posterior'\]\['ggn'\] must have shape \(31, 31\); got \(31,"
    ):
        _load(case, {**state, "posterior": {"ggn": state["posterior"]["ggn"][:, :30]}})
    with pytest.raises(ValueError, match=r"state\['structure'\] must be one of \['full'"):
        _load(case, {**state, "structure": "ful"})
    with pytest.raises(ValueError, match=r"state\['likelihood'\] must be one of \['regression'"):
        _load(case, {**state, "likelihood": 3})
    with pytest.raises(ValueError, match=r"state\['rank'\] must be None, or a positive int with "):
        _load(case, {**state, "rank": 3})
    with pytest.raises(ValueError, match=r"state\['memory_budget'\] must be a positive int; got"):
        _load(case, {**state, "memory_budget": -1})
    with pytest.raises(TypeError, match=r"state\['temperature'\] must be a float; got 'x'"):
        _load(case, {**state, "temperature": "x"})
    with pytest.raises(TypeError, match=r"state\['input_key'\] must be a str or None; got 3"):
        _load(case, {**state, "input_key": 3})
    with pytest.raises(
        ValueError, match=r"state\['prior_precision'\] must be a scalar or have shape \(4,\)"
    ):
        _load(case, {**state, "prior_precision": torch.ones(5, dtype=torch.float64)})
    with pytest.raises(TypeError, match=r"state\['subset'\] must be a non-empty list of param"):
        _load(case, {**state, "subset": "all"})
    with pytest.raises(ValueError, match=r"state\['shapes'\] must be a list of 4 shapes"):
        _load(case, {**state, "shapes": state["shapes"][:3]})
    stats = {**state["fit_statistics"], "n_data": 0}
    with pytest.raises(ValueError, match=r"\['n_data'\] must be an int >= 1; got 0 \(int\)"):
        _load(case, {**state, "fit_statistics": stats})
    stats = {**state["fit_statistics"], "extra": 1}
    with pytest.raises(ValueError, match=r"must hold exactly the keys .*unexpected \['extra'\]"):
        _load(case, {**state, "fit_statistics": stats})
    post = {**state["posterior"], "ggn_diag": torch.ones(31, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"exactly the keys \['ggn'\] .*unexpected \['ggn_diag'\]"):
        _load(case, {**state, "posterior": post})


def test_lowrank_and_diag_values_out_of_range_are_refused():
    case, state = _state("lowrank")
    lam = state["posterior"]["eigenvalues"].clone()
    lam[0] = -1.0
    with pytest.raises(
        ValueError, match=r"\['eigenvalues'\] must be a vector \(R,\) of values >= 0; got a "
    ):
        _load(case, {**state, "posterior": {**state["posterior"], "eigenvalues": lam}})
    U = state["posterior"]["eigenvectors"]
    with pytest.raises(ValueError, match=r"\['eigenvectors'\] must have shape \(31, \d+\); got"):
        _load(case, {**state, "posterior": {**state["posterior"], "eigenvectors": U[:, :1]}})
    case, state = _state("diag")
    with pytest.raises(ValueError, match=r"\['ggn_diag'\] must be >= 0 \(a GGN diagonal\)"):
        _load(case, {**state, "posterior": {"ggn_diag": -state["posterior"]["ggn_diag"]}})


def test_kfac_blocks_must_match_the_subset():
    case, state = _state("kfac")
    post = state["posterior"]
    A = post["block.0.A"]
    with pytest.raises(
        ValueError, match=r"state\['posterior'\]\['block\.0\.A'\] must have shape \(4, 4\); got"
    ):
        _load(case, {**state, "posterior": {**post, "block.0.A": A[:3, :3]}})
    with pytest.raises(ValueError, match=r"block 0 must name a weight and/or a bias of state"):
        _load(case, {**state, "posterior": {**post, "block.0.weight": "nope"}})
    with pytest.raises(
        ValueError, match=r"must cover every name of state\['subset'\] exactly once"
    ):
        _load(case, {**state, "posterior": {**post, "n_blocks": 1}})
    missing = {k: v for k, v in post.items() if k != "block.1.B"}
    with pytest.raises(ValueError, match=r"missing \['block\.1\.B'\]"):
        _load(case, {**state, "posterior": missing})
    with pytest.raises(ValueError, match=r"\['n_blocks'\] must be an int >= 0; got '2' \(str\)"):
        _load(case, {**state, "posterior": {**post, "n_blocks": "2"}})


@pytest.mark.parametrize("structure", STRUCTS)
def test_float32_state_loads_into_a_float64_model(structure):
    case = make_case("mlp_classification")
    model32 = copy.deepcopy(case.model).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(model32, "classification", structure=structure)
        la.fit(
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(case.X.float(), case.y), batch_size=5
            )
        )
    la64 = LaplaceWrapper.from_state_dict(case.model, la.state_dict())
    for v in la64.posterior.state_dict().values():
        assert not isinstance(v, torch.Tensor) or v.dtype == torch.float64
    p64 = la64.predict(case.X)  # crashed for lowrank: float32 eigenvectors, float64 Jacobians
    p32 = la.predict(case.X.float())
    torch.testing.assert_close(p64.mean.float(), p32.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p64.variance.float(), p32.variance, rtol=1e-3, atol=1e-5)


def test_model_with_other_or_extra_parameters_is_refused():
    case, state = _state("full", subset="last_layer")
    bigger = copy.deepcopy(case.model).append(nn.Linear(3, 3).double())  # 3.weight, 3.bias
    with pytest.raises(
        ValueError,
        match=r"model must have the same parameters \(names and shapes\) as the saved model; "
        r"got extra \['3\.weight', '3\.bias'\], missing \[\], other shapes \[\]\.",
    ):
        LaplaceWrapper.from_state_dict(bigger, state)
    wider = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"parameter '2\.weight' must have shape \(3, 4\)"):
        LaplaceWrapper.from_state_dict(wider, state)
    first = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match=r"other shapes \['0\.weight \(5, 3\) \(saved \(4, 3\)\)'"):
        LaplaceWrapper.from_state_dict(first, state)
    with pytest.raises(TypeError, match=r"state\['model_parameters'\] must be a list of \(name"):
        LaplaceWrapper.from_state_dict(case.model, {**state, "model_parameters": "x"})


def test_format_1_states_still_load_without_the_architecture_check():
    case, state = _state("kfac")
    v1 = {k: v for k, v in state.items() if k != "model_parameters"}
    v1["format_version"] = 1
    la = LaplaceWrapper.from_state_dict(case.model, v1)
    ref = LaplaceWrapper.from_state_dict(case.model, state)
    assert torch.equal(la.posterior_covariance(), ref.posterior_covariance())
    assert la.state_dict()["format_version"] == 2  # saved again in the current format
    bigger = copy.deepcopy(case.model).append(nn.Linear(3, 3).double())
    LaplaceWrapper.from_state_dict(bigger, v1)  # format 1 has no record of the architecture


def test_check_state_returns_posterior_tensors_cast_and_leaves_the_state_alone():
    case, state = _state("full")
    out = check_state(state, case.model, STRUCTURES)
    assert out["posterior"]["ggn"] is state["posterior"]["ggn"]  # same dtype: no copy
    out32 = check_state(state, copy.deepcopy(case.model).float(), STRUCTURES)
    assert out32["posterior"]["ggn"].dtype == torch.float32
    assert state["posterior"]["ggn"].dtype == torch.float64


# -- round trip and refusals of every structure ----------------------------------------------------


def _variants():
    out = [pytest.param(s, {}, id=s) for s in ALL_STRUCTS]
    if "lowrank" in ALL_STRUCTS:
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
        la = fit_case(case, structure, **kwargs)
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
    assert_same_state(state, la2.state_dict())
    assert torch.equal(la.posterior_covariance(), la2.posterior_covariance())
    assert torch.equal(la.log_marginal_likelihood(), la2.log_marginal_likelihood())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(la.sample(4, generator=g1), la2.sample(4, generator=g2))
    assert torch.equal(la.functional_covariance(case.X), la2.functional_covariance(case.X))
    assert torch.equal(la.predict(case.X).mean, la2.predict(case.X).mean)


def test_state_dict_refuses_other_shapes_and_newer_versions():
    case = make_case("mlp_classification")
    state = fit_case(case, "diag").state_dict()
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


def test_state_dict_round_trip_exact():
    case = make_case("mlp_classification")
    for structure in ["full", "diag"]:
        la = LaplaceWrapper(
            case.model, "classification", structure=structure, prior_precision=2.0
        ).fit(case.loader())
        state = la.state_dict()
        other = copy.deepcopy(case.model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.0)  # values differ, shapes agree: θ* comes from the state
        la2 = LaplaceWrapper.from_state_dict(other, state)
        torch.testing.assert_close(
            la2.posterior_covariance(), la.posterior_covariance(), rtol=0, atol=0
        )
        torch.testing.assert_close(
            la2.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0
        )
        Xt = torch.randn(3, 3, dtype=torch.float64)
        torch.testing.assert_close(
            la2.functional_covariance(Xt), la.functional_covariance(Xt), rtol=0, atol=0
        )
    bad = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(
        ValueError, match=r"parameter '0.weight' must have shape \(4, 3\).*got \(5, 3\)"
    ):
        LaplaceWrapper.from_state_dict(bad, state)
    with pytest.raises(ValueError, match="format_version must be <= 2; got 99"):
        LaplaceWrapper.from_state_dict(case.model, {**state, "format_version": 99})


# -- pickle ----------------------------------------------------------------------------------------


def _outputs_of(la, X) -> dict:
    g = torch.Generator().manual_seed(3)
    pred = la.predict(X)
    return {
        "mean": pred.mean,
        "variance": pred.variance,
        "nn": la.predict(X, "nn", n_samples=4, generator=torch.Generator().manual_seed(4)).mean,
        "sample": la.sample(3, generator=g),
        "fcov": la.functional_covariance(X),
        "evidence": la.log_marginal_likelihood().detach(),
        "prior": la.prior_precision,
        "T": la.predictive_temperature,
    }


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ALL_STRUCTS)
def test_pickle_round_trip_of_a_fitted_and_an_unfitted_wrapper(structure, subset):
    # pickle.dumps(la) failed on a lambda of the structure registry (and, for a Linear-head
    # subset, on the head's thread-local records)
    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure=structure, subset=subset)
    fresh = pickle.loads(pickle.dumps(la))
    assert not fresh.is_fitted and fresh.structure == structure and fresh.subset == subset
    fresh.fit(case.loader())
    la.fit(case.loader())
    la.optimize_prior_precision(
        "marglik_temperature", val_loader=[(case.X[:6], case.y[:6])], n_steps=5
    )
    before = _outputs_of(la, case.X)
    back = pickle.loads(pickle.dumps(la))
    assert back.fitted.structure is STRUCTURES[structure]  # by name, from the registry
    after = _outputs_of(back, case.X)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert back.marglik_result_ is not la.marglik_result_
    assert torch.equal(back.marglik_result_.evidence, la.marglik_result_.evidence)
    assert_same_state(back.state_dict(), la.state_dict())
    assert torch.equal(fresh.predict(case.X).mean, _outputs_of(fresh, case.X)["mean"])


def test_an_unregistered_structure_does_not_pickle(monkeypatch):
    from laplace_ggn import structures

    case = make_case("mlp_classification")
    la = LaplaceWrapper(case.model, "classification", structure="diag").fit(case.loader())
    data = pickle.dumps(la)
    monkeypatch.delitem(structures.STRUCTURES, "diag")
    with pytest.raises(
        TypeError,
        match=r"StructureSpec 'diag' must be registered \(register_structure\) to be pickled; "
        r"it is pickled by its name\. Save la\.state_dict\(\) instead\.",
    ):
        pickle.dumps(la)
    with pytest.raises(
        ValueError,
        match=r"structure 'diag' must be registered to load a pickled wrapper of it; got the "
        r"registered structures \['full', 'kfac', 'lowrank', 'projected', 'gp', 'ella'\]",
    ):
        pickle.loads(data)
