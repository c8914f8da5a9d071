"""Property-based checks of the public API over random tiny models, data, options and faults.

Every example builds a tiny MLP or CNN (regression, classification or binary; float32 or
float64; a prior precision in 1e-12..1e12), a wrapper of one structure, and runs a random
sequence of public calls with valid and malformed arguments (wrong types and dtypes, NaN/Inf,
0 rows, 0-dim inputs, empty batches, NumPy / list / None targets, bad option values, ...).
After every call:

- only ``ValueError``, ``TypeError`` or ``RuntimeError`` escaped, the latter only for a use
  before ``fit`` or a numerical failure that names the quantity;
- a failed call left the wrapper as it was (its ``state_dict`` bit for bit, or unfitted);
- the user's model is bit-for-bit unchanged: parameters, buffers, modes, ``requires_grad``
  flags and ``.grad`` tensors, and so are the user's data tensors;
- what came back is finite, of the documented shape; variances are >= 0 and class
  probabilities lie in [0, 1] and sum to 1 (the mean of every link).

Some malformed cases must be refused whatever else happens: a loader whose every label is
``ignore_index`` (N = 0), a model whose subset holds an Inf parameter (refused naming it),
malformed saved states.  A refit after tuning equals a fresh wrapper fitted on the same data.

The examples are derandomized (a fixed sequence, no example database), so CI is deterministic.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper

SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("LAPLACE_GGN_NO_SHRINK")
    else list(Phase),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ALLOWED = (ValueError, TypeError, RuntimeError)
# RuntimeError is for a use before fit and for numerical failures that name the quantity
RUNTIME_OK = re.compile(
    r"needs a fitted posterior|known after fit\(train_loader\)|must be finite|"
    r"must be positive definite|must keep the evidence finite|gridsearch must find a grid point|"
    r"must have an eigendecomposition|must be factorisable"
)

# the library's messages name what was expected; raw torch / Python messages do not
OWN_MESSAGE = re.compile(r"\bmust\b|\bneeds\b|\bapplies to\b|is known after")
RAW_MESSAGE = re.compile(
    r"mat1 and mat2|expected scalar type|cannot reshape|slice\(\)|invalid combination|"
    r"object is not|out of bounds|size mismatch|non-empty list of Tensors|index \d+ is out"
)

OPS = [
    "predict", "predict", "fcov", "jacobians", "sample", "lml", "marglik", "gridsearch",
    "set_hyper", "cov", "state", "kernel", "bad_state", "refit",
]  # fmt: skip

# Loader kinds that every fit must refuse (the others may also be refused for a reason of
# their own, e.g. a label out of range).
MUST_REFUSE = {"empty", "all_empty", "all_ignored", "not_iterable", "none_y", "unbatched"}

STRUCTURES = [
    ("full", None), ("diag", None), ("kfac", None), ("lowrank", None), ("lowrank", 2),
    ("projected", None), ("projected", 2),
]  # fmt: skip


# -- models and data -------------------------------------------------------------------------------


@dataclass
class Problem:
    likelihood: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    C: int
    dtype: torch.dtype
    batch_size: int
    nonfinite: str | None = None  # the name of a parameter of the last layer set to Inf


class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def _model(arch: str, C: int, hidden: int, act: type, bn: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "cnn":
        return nn.Sequential(nn.Conv2d(1, 2, 3), act(), _Flatten(), nn.Linear(8, C))
    layers: list[nn.Module] = []
    d = 3
    if hidden:
        layers += [nn.Linear(d, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [act()]
        d = hidden
    layers.append(nn.Linear(d, C))
    return nn.Sequential(*layers)


@st.composite
def problems(draw) -> Problem:
    likelihood = draw(st.sampled_from(["regression", "classification", "binary"]))
    arch = draw(st.sampled_from(["mlp", "mlp", "cnn"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    C = (
        1
        if likelihood == "binary"
        else draw(st.integers(2 if likelihood != "regression" else 1, 3))
    )
    seed = draw(st.integers(0, 2**16))
    model = _model(
        arch,
        C,
        draw(st.integers(0, 3)),
        draw(st.sampled_from([nn.Tanh, nn.ReLU])),
        draw(st.booleans()),
        seed,
    ).to(dtype)
    scale = draw(st.sampled_from([1.0, 1.0, 1.0, 1e3, 1e20]))  # 1e20: saturated outputs
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    # the user's model as users leave it: maybe in train mode, with .grad, a frozen parameter
    model.train(draw(st.booleans()))
    params = list(model.parameters())
    for p in params:
        if draw(st.booleans()):
            p.grad = torch.randn_like(p)
    if draw(st.integers(0, 5)) == 0 and len(params) > 2:
        params[0].requires_grad_(False)
    nonfinite = None
    if draw(st.integers(0, 11)) == 0:  # θ* with an Inf entry: every fit must refuse it
        nonfinite = draw(st.sampled_from(["weight", "bias"]))
        with torch.no_grad():
            getattr(last, nonfinite).view(-1)[0] = draw(st.sampled_from([math.inf, -math.inf]))
        nonfinite = next(n for n, p in model.named_parameters() if p is getattr(last, nonfinite))
    N = draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(seed)
    shape = (N, 1, 4, 4) if arch == "cnn" else (N, 3)
    X = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if likelihood == "regression":
        y = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)
    elif likelihood == "classification":
        y = torch.randint(0, C, (N,), generator=g)
        y = y.to(draw(st.sampled_from([torch.int64, torch.int64, torch.int32, torch.uint8])))
    else:
        y = torch.randint(0, 2, (N,), generator=g).to(
            draw(st.sampled_from([dtype, torch.int64, torch.bool]))
        )
    return Problem(likelihood, model, X, y, C, dtype, draw(st.integers(1, 4)), nonfinite)


def _batches(X, y, bs):
    return [(X[i : i + bs], y[i : i + bs]) for i in range(0, X.shape[0], bs)]


VALID_LOADERS = ["ok", "dataloader", "empty_batches", "mapping"]
MALFORMED_LOADERS = [
    "empty", "all_empty", "nan_x", "inf_y", "other_dtype_x", "numpy_y", "list_y", "none_y",
    "int_y", "bad_label", "onehot", "zero_dim_x", "triple", "mapping_keys", "not_iterable",
    "rows_mismatch", "complex_y", "unbatched", "all_ignored",
]  # fmt: skip


def _loader(draw, pb: Problem, p_valid: float):
    """A training / validation loader: a valid one with probability ``p_valid``, else malformed."""
    X, y, bs = pb.X, pb.y, pb.batch_size
    valid = draw(st.integers(0, 99)) < 100 * p_valid
    kind = draw(st.sampled_from(VALID_LOADERS if valid else MALFORMED_LOADERS))
    zero = (X[:0], y[:0])
    if kind == "ok":
        return kind, _batches(X, y, bs)
    if kind == "dataloader":
        return kind, DataLoader(TensorDataset(X, y), batch_size=bs)
    if kind == "empty_batches":
        return kind, [zero, *_batches(X, y, bs)[:1], zero, *_batches(X, y, bs)[1:], zero]
    if kind == "mapping":
        return kind, [{"input": a, "target": b} for a, b in _batches(X, y, bs)]
    if kind == "empty":
        return kind, []
    if kind == "all_empty":
        return kind, [zero, zero]
    if kind == "nan_x":
        Xb = X.clone()
        Xb.view(-1)[0] = float("nan")
        return kind, _batches(Xb, y, bs)
    if kind == "inf_y":
        yb = y.to(X.dtype).clone()
        yb.view(-1)[0] = float("inf")
        return kind, _batches(X, yb, bs)
    if kind == "other_dtype_x":
        other = torch.float64 if X.dtype == torch.float32 else torch.float32
        return kind, _batches(X.to(other), y, bs)
    if kind == "numpy_y":
        return kind, [(a, b.numpy()) for a, b in _batches(X, y, bs)]
    if kind == "list_y":
        return kind, [(a, b.tolist()) for a, b in _batches(X, y, bs)]
    if kind == "none_y":
        return kind, [(a, None) for a, _ in _batches(X, y, bs)]
    if kind == "int_y":
        return kind, [(X[:1], 0)]
    if kind == "bad_label":
        if pb.likelihood == "regression":
            yb = torch.cat([y, y[:, :1]], 1)  # one column too many
        else:
            yb = y.long().clone()
            yb[0] = pb.C if pb.likelihood == "classification" else 2
        return kind, _batches(X, yb, bs)
    if kind == "onehot":
        return kind, _batches(X, torch.nn.functional.one_hot(y.long().clamp(0, 1), 3), bs)
    if kind == "zero_dim_x":
        return kind, [(X[0].flatten()[0], y[0])]
    if kind == "triple":
        return kind, [(a, b, b) for a, b in _batches(X, y, bs)]
    if kind == "mapping_keys":
        return kind, [{"x": a, "y": b} for a, b in _batches(X, y, bs)]
    if kind == "not_iterable":
        return kind, 3
    if kind == "rows_mismatch":
        return kind, [(X, y[:-1] if y.shape[0] > 1 else y[:0])]
    if kind == "unbatched":
        return kind, list(zip(X, y))
    if kind == "all_ignored":  # every label ignore_index (regression has none: no data at all)
        if pb.likelihood == "regression":
            return kind, [(X[:0], y[:0])]
        return kind, _batches(X, torch.full((X.shape[0],), -100), bs)
    return kind, [(X, y.to(torch.complex64))]


def _inputs(draw, pb: Problem):
    """Test inputs: valid ones (1..4 rows), 0 rows, 0-dim, NaN/Inf, not tensors, ..."""
    kinds = ["ok", "ok", "ok", "zero_rows", "zero_dim", "nan", "inf", "numpy", "none"]
    kinds += ["other_dtype", "one_dim", "wide"]
    kind = draw(st.sampled_from(kinds))
    B = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(B)
    x = torch.randn((B, *pb.X.shape[1:]), generator=g, dtype=torch.float64).to(pb.dtype)
    if kind == "ok":
        return kind, x
    if kind == "other_dtype":
        return kind, x.to(torch.float64 if pb.dtype == torch.float32 else torch.float32)
    if kind == "one_dim":
        return kind, x[0]
    if kind == "wide":  # one feature (or image column) too many
        return kind, torch.cat([x, x[..., :1]], -1)
    if kind == "zero_rows":
        return kind, x[:0]
    if kind == "zero_dim":
        return kind, x.flatten()[0]
    if kind in ("nan", "inf"):
        x = x.clone()
        x.view(-1)[-1] = float(kind)
        return kind, x
    if kind == "numpy":
        return kind, x.numpy()
    return kind, None


# -- the invariants ---------------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> list:
    out = []
    for n, p in model.named_parameters():
        out.append(
            (n, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        )
    out += [(n, b.clone()) for n, b in model.named_buffers()]
    out += [m.training for m in model.modules()]
    return out


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _wrapper_state(la: LaplaceWrapper) -> tuple:
    results = (getattr(la, "marglik_result_", None), getattr(la, "gridsearch_result_", None))
    if la.is_fitted:
        return ("fitted", la.state_dict(), results)
    return ("unfitted", la.prior_precision.clone(), la.sigma_noise.clone(), results)


def _states_equal(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and _same(a[1:-1], b[1:-1]) and all(u is v for u, v in zip(a[-1], b[-1]))


class Checker:
    """Runs public calls and checks the invariants after each."""

    def __init__(self, pb: Problem, structure: str, rank: int | None):
        self.pb = pb
        self.options: dict = {}
        self.model_before = _snapshot(pb.model)
        self.data_before = (pb.X.clone(), pb.y.clone())
        self.log: list[str] = []

    def call(self, what: str, la: LaplaceWrapper | None, fn):
        before = _wrapper_state(la) if la is not None else None
        self.log.append(what)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn()
            ok, err = True, None
        except Exception as exc:  # noqa: BLE001 -- the type is what is checked
            out, ok, err = None, False, exc
        if not ok:
            assert type(err) in ALLOWED, f"{what}: {type(err).__name__}: {err}\n{self.log}"
            if type(err) is RuntimeError:
                assert RUNTIME_OK.search(str(err)), f"{what}: RuntimeError: {err}\n{self.log}"
            # a message may quote the model's own error after it ("... on which the model
            # raised RuntimeError: mat1 and mat2 ..."); what the library says must come first
            msg = str(err).split(" the model raised ")[0]
            assert OWN_MESSAGE.search(msg) and not RAW_MESSAGE.search(msg), (
                f"{what}: not a message of the library: {type(err).__name__}: {msg}\n{self.log}"
            )
            if la is not None:
                assert _states_equal(before, _wrapper_state(la)), f"{what} changed the wrapper"
        assert _same(self.model_before, _snapshot(self.pb.model)), f"{what} changed the model"
        assert _same(self.data_before, (self.pb.X, self.pb.y)), f"{what} changed the data"
        return ok, out

    # -- checks of results --------------------------------------------------------------------

    def finite(self, t: torch.Tensor, what: str) -> None:
        assert bool(torch.isfinite(t).all()), f"{what} is not finite: {t}\n{self.log}"

    def prediction(self, pred, B: int, la: LaplaceWrapper) -> None:
        C = self.pb.C
        assert pred.mean.shape == pred.variance.shape == (B, C), (pred.mean.shape, B, C)
        self.finite(pred.mean, "predictive mean")
        self.finite(pred.variance, "predictive variance")
        assert bool((pred.variance >= 0).all()), f"negative variance {pred.variance}\n{self.log}"
        if self.pb.likelihood != "regression":
            assert bool(((pred.mean >= 0) & (pred.mean <= 1)).all()), pred.mean
        if self.pb.likelihood == "classification" and B:
            tol = 1e-5 if self.pb.dtype == torch.float32 else 1e-10
            err = float((pred.mean.sum(-1) - 1).abs().max())
            assert err <= tol, f"probabilities sum to 1 ± {err}\n{self.log}"


# -- one example ------------------------------------------------------------------------------------


def _options(draw, pb: Problem, structure: str, rank: int | None) -> tuple[dict, bool]:
    """Wrapper options, sometimes one of them malformed (returns ``(kwargs, valid)``)."""
    expo = draw(st.integers(-12, 12))
    kw = {
        "structure": structure,
        "rank": rank,
        "prior_precision": 10.0**expo,
        "subset": draw(st.sampled_from(["all", "all", "last_layer"])),
        "temperature": draw(st.sampled_from([1.0, 1.0, 0.5, 3.0])),
        # small budgets: chunked Jacobians and predictives, or a refusal naming the memory
        "memory_budget": draw(st.sampled_from([1 << 30, 1 << 30, 1 << 16, 1 << 12])),
    }
    if pb.likelihood == "regression":
        kw["sigma_noise"] = draw(st.sampled_from([1.0, 0.3, 2.0]))
    if draw(st.integers(0, 5)):  # one in six: one malformed option
        return kw, True
    bad = draw(st.integers(0, 11))
    bads = [
        ("prior_precision", -1.0), ("prior_precision", float("nan")), ("prior_precision", "a"),
        ("prior_precision", torch.ones(997, dtype=pb.dtype)), ("sigma_noise", "a"),
        ("sigma_noise", -1.0), ("sigma_noise", 0.5 if pb.likelihood != "regression" else True),
        ("memory_budget", True), ("memory_budget", 0), ("temperature", "hot"),
        ("subset", "lastlayer"), ("rank", 0 if structure in ("lowrank", "projected") else 3),
    ]  # fmt: skip
    key, value = bads[bad]
    kw[key] = value
    return kw, False


def _run_example(data, structure: str, rank: int | None) -> None:
    draw = data.draw
    pb = draw(problems())
    chk = Checker(pb, structure, rank)
    kw, valid = _options(draw, pb, structure, rank)
    ok, la = chk.call(
        f"LaplaceWrapper({kw})", None, lambda: LaplaceWrapper(pb.model, pb.likelihood, **kw)
    )
    if not valid:
        if ok:  # a prior of the wrong shape for subset='last_layer' is found at fit
            assert kw["subset"] == "last_layer", f"accepted malformed options {kw}"
            ok, _ = chk.call("fit(ok)", la, lambda: la.fit(_batches(pb.X, pb.y, pb.batch_size)))
            assert not ok and not la.is_fitted
        return
    assert ok
    # a first fit (mostly valid), then maybe a second one (mostly malformed)
    for p_valid in [0.85] + [0.3] * draw(st.integers(0, 1)):
        kind, loader = _loader(draw, pb, p_valid)
        ok, err = chk.call(f"fit({kind})", la, lambda loader=loader: la.fit(loader))
        assert not (ok and kind in MUST_REFUSE), f"fit accepted a {kind} loader\n{chk.log}"
        if pb.nonfinite is not None:
            assert not ok, f"fit accepted θ* with an Inf in {pb.nonfinite!r}\n{chk.log}"
    if pb.nonfinite is not None:
        assert not la.is_fitted
        name = re.escape(pb.nonfinite)
        with pytest.raises(ValueError, match=rf"parameter '{name}' of the subset must be finite"):
            la.fit(_batches(pb.X, pb.y, pb.batch_size))
        return
    chk.options = kw
    ops = draw(st.lists(st.sampled_from(OPS), min_size=3, max_size=7))
    for op in ops:
        _run_op(draw, chk, la, op)


def _run_op(draw, chk: Checker, la: LaplaceWrapper, op: str) -> None:
    pb = chk.pb
    if op in ("predict", "fcov", "jacobians"):
        kind, x = _inputs(draw, pb)
        B = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else None
        if op == "predict":
            method = draw(st.sampled_from(["glm", "glm", "nn", "GLM", "glmm"]))
            link = draw(st.sampled_from([None, "probit", "bridge", "mc", "mc", "probitt", 3]))
            n = draw(st.sampled_from([1, 3, np.int64(2), torch.tensor(2), 0, -1, 2.5, True]))
            gen = draw(st.sampled_from([None, "gen", torch.Generator().manual_seed(0)]))
            call = lambda: la.predict(x, method, link=link, n_samples=n, generator=gen)  # noqa: E731
            ok, pred = chk.call(f"predict({kind}, {method}, {link}, {n!r})", la, call)
            if ok:
                chk.prediction(pred, B, la)
        elif op == "fcov":
            ok, cov = chk.call(
                f"functional_covariance({kind})", la, lambda: la.functional_covariance(x)
            )
            if ok:
                assert cov.shape == (B, pb.C, pb.C)
                chk.finite(cov, "functional covariance")
                diag = torch.diagonal(cov, dim1=1, dim2=2)
                assert bool((diag >= 0).all()), f"negative functional variance {diag}\n{chk.log}"
        else:
            ok, out = chk.call(f"jacobians({kind})", la, lambda: la.jacobians(x))
            if ok:
                J, f = out
                assert J.shape == (B, pb.C, la.n_params) and f.shape == (B, pb.C)
                chk.finite(J, "Jacobians")
    elif op == "sample":
        n = draw(st.sampled_from([1, 3, np.int64(2), torch.tensor(1), 0, -2, 1.5, True, None]))
        gen = draw(st.sampled_from([None, torch.Generator().manual_seed(1), 5]))
        ok, S = chk.call(f"sample({n!r})", la, lambda: la.sample(n, generator=gen))
        if ok:
            assert S.shape == (int(n), la.n_params)
            chk.finite(S, "samples")
    elif op == "lml":
        prior = draw(
            st.sampled_from([None, None, 0.5, 1e6, -1.0, float("nan"), "a", torch.ones(5), torch.tensor(2.0, requires_grad=True)])
        )  # fmt: skip
        sigma = draw(st.sampled_from([None, None, 0.7, -1.0, "a", True]))
        ok, e = chk.call(
            f"lml({prior!r}, {sigma!r})", la, lambda: la.log_marginal_likelihood(prior, sigma)
        )
        if ok:
            assert e.shape == ()
            chk.finite(e.detach(), "evidence")
    elif op == "marglik":
        kw = {
            "n_steps": draw(st.sampled_from([1, 2, np.int64(2), 0, True])),
            "lr": draw(st.sampled_from([None, 0.1, -1.0, float("nan"), 1e3])),
            "prior_structure": draw(
                st.sampled_from([None, "scalar", "layerwise", "diagonal", "sclar"])
            ),
            "tune_sigma_noise": draw(st.booleans()),
        }
        chk.call(f"marglik({kw})", la, lambda: la.optimize_prior_precision("marglik", **kw))
    elif op == "gridsearch":
        kind, val = _loader(draw, pb, 0.7)
        kw = draw(
            st.sampled_from(
                [{"grid": [0.1, 10.0]}, {"n_points": 2}, {"n_points": 3, "log_range": (-1, 1)},
                 {"grid": [-1.0]}, {"grid": []}, {"log_range": (1, -1)}, {"n_points": 0},
                 {"grid": [1.0], "predict_method": "nn", "n_samples": 2},
                 {"grid": [1.0, 2.0], "link": "bridge"}, {"grid": [1.0], "link": "mc", "n_samples": 2}]
            )
        )  # fmt: skip
        chk.call(
            f"gridsearch({kind}, {kw})",
            la,
            lambda: la.optimize_prior_precision("gridsearch", val_loader=val, **kw),
        )
    elif op == "refit":  # after whatever tuning ran: the same as a fresh wrapper's fit
        loader = _batches(pb.X, pb.y, pb.batch_size)
        ok, _ = chk.call("refit", la, lambda: la.fit(loader))
        if ok:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fresh = LaplaceWrapper(pb.model, pb.likelihood, **chk.options).fit(loader)
            assert _same(la.state_dict(), fresh.state_dict()), f"refit != fresh fit\n{chk.log}"
            for name in ("marglik_result_", "gridsearch_result_", "temperature_result_"):
                assert not hasattr(la, name), f"refit kept {name}\n{chk.log}"
    elif op == "set_hyper":
        prior = draw(st.sampled_from([None, 2.0, 1e-9, -1.0, "a", torch.ones(997)]))
        sigma = draw(st.sampled_from([None, 1.0, 0.5, -1.0, "a"]))
        chk.call(
            f"set_hyperparameters({prior!r}, {sigma!r})",
            la,
            lambda: la.set_hyperparameters(prior_precision=prior, sigma_noise=sigma),
        )
    elif op == "cov":
        ok, S = chk.call("posterior_covariance()", la, la.posterior_covariance)
        if ok:
            assert S.shape == (la.n_params, la.n_params)
            chk.finite(S, "Σ")
            assert bool((S.diagonal() >= 0).all()), f"negative posterior variance\n{chk.log}"
    elif op == "state":
        ok, state = chk.call("state_dict()", la, la.state_dict)
        if ok:
            ok2, la2 = chk.call(
                "from_state_dict()", None, lambda: LaplaceWrapper.from_state_dict(pb.model, state)
            )
            assert ok2 and _same(la2.state_dict(), state)
    elif op == "bad_state":
        ok, state = chk.call("state_dict()", la, la.state_dict)
        if ok:
            bad = draw(st.sampled_from(["nan_mean", "missing", "list", "version"]))
            if bad == "nan_mean":
                state["mean"] = torch.full_like(state["mean"], float("nan"))
            elif bad == "missing":
                del state["posterior"]
            elif bad == "list":
                state = list(state.items())
            else:
                state["format_version"] = "1"
            ok2, _ = chk.call(
                f"from_state_dict({bad})",
                None,
                lambda: LaplaceWrapper.from_state_dict(pb.model, state),
            )
            assert not ok2, f"from_state_dict accepted a malformed state ({bad})"
    else:
        kind, x = _inputs(draw, pb)
        n = draw(st.sampled_from([0, 2, np.int64(2), -1]))
        chk.call(
            f"kernel_decomposition({kind}, {n!r})",
            la,
            lambda: la.kernel_decomposition(x, n_samples=n),
        )


# -- the tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("structure", "rank"),
    STRUCTURES,
    ids=["full", "diag", "kfac", "lowrank", "lowrank-k2", "projected", "projected-k2"],
)
@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_public_api_invariants(structure, rank, data):
    _run_example(data, structure, rank)


class _SharedWeights(nn.Module):
    """A tiny network with one weight used outside its layer's forward (``kind``).

    ``functional``: the decoder is ``F.linear(h, inp.weight.t(), b)`` after ``inp`` ran;
    ``two_holders``: ``l2.weight`` is ``l1.weight`` (tied modules); ``head_in_body``: the head's
    weight also enters the body; ``called_twice``: one layer run twice (no use outside it).
    """

    def __init__(self, kind: str, d: int, C: int, act: type):
        super().__init__()
        self.kind, self.act = kind, act()
        self.inp = nn.Linear(d, 3)
        if kind == "functional":
            self.mid = nn.Linear(3, d)
            self.out_b = nn.Parameter(torch.randn(C) * 0.3)
        elif kind in ("two_holders", "called_twice"):
            self.l1 = nn.Linear(3, 3)
            if kind == "two_holders":
                self.l2 = nn.Linear(3, 3)
                self.l2.weight = self.l1.weight
        if kind != "functional":
            self.head = nn.Linear(3, C)

    def forward(self, x):
        h = self.act(self.inp(x))
        if self.kind == "functional":  # inp.weight (3, d) reused as a (C = 3, ...) decoder
            return nn.functional.linear(
                self.act(self.mid(h)), self.inp.weight.t()[:, :3], self.out_b
            )
        if self.kind == "two_holders":
            h = self.act(self.l2(self.act(self.l1(h))))
        elif self.kind == "called_twice":
            h = self.act(self.l1(self.act(self.l1(h))))
        else:  # head_in_body
            h = self.act(h + x[:, : self.head.weight.shape[0]] @ self.head.weight)
        return self.head(h)


@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_shared_weights_equal_the_dense_ggn(data):
    from cases import dense_ggn_of
    from test_kfac import kfac_dense_reference

    draw = data.draw
    kind = draw(st.sampled_from(["functional", "two_holders", "head_in_body", "called_twice"]))
    lik = draw(st.sampled_from(["regression", "classification", "binary"]))
    structure, rank = draw(
        st.sampled_from(
            [("full", None), ("diag", None), ("kfac", None), ("lowrank", None), ("lowrank", 60)]
        )
    )
    C = 1 if lik == "binary" else 3
    if kind == "functional":  # the decoder's outputs are the d inputs
        C, lik = 3, ("classification" if lik == "binary" else lik)
    d = 3
    seed = draw(st.integers(0, 2**16))
    act = draw(st.sampled_from([nn.Tanh, nn.Sigmoid]))
    torch.manual_seed(seed)
    model = _SharedWeights(kind, d, C, act).double()
    g = torch.Generator().manual_seed(seed)
    N, bs = draw(st.integers(2, 7)), draw(st.integers(1, 4))
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    if lik == "regression":
        y = torch.randn(N, C, generator=g, dtype=torch.float64)
    elif lik == "classification":
        y = torch.randint(0, C, (N,), generator=g)
    else:
        y = torch.randint(0, 2, (N,), generator=g).double()
    loader = DataLoader(TensorDataset(X, y), batch_size=bs)
    rank = None if rank is None else sum(p.numel() for p in model.parameters())
    la = LaplaceWrapper(model, lik, structure=structure, rank=rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kfac names its diagonal blocks
        la.fit(loader)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def fn(th):
        parts = {n: t.view(params[n].shape) for n, t in zip(names, th.split(sizes))}
        out = torch.func.functional_call(model, parts, (X,))
        return out

    G = dense_ggn_of(fn, theta, lik, y)
    post = la.posterior
    if structure == "full":
        got = post.ggn
    elif structure == "diag":
        got, G = torch.diag(post.ggn_diag), torch.diag(G.diagonal())
    elif structure == "kfac":
        shared = {"functional": ("inp",), "two_holders": ("l1", "l2"), "head_in_body": ("head",)}
        shared["called_twice"] = ("l1",)
        got = post.curvature.to_dense()
        G = kfac_dense_reference(model, X, y, lik, diagonal=shared[kind])
    else:
        got = post.eigenvectors @ torch.diag(post.eigenvalues) @ post.eigenvectors.T
    scale = max(1.0, float(G.abs().max()))
    torch.testing.assert_close(got, G, rtol=1e-7, atol=1e-9 * scale)
