"""Fit across torch.distributed ranks: 2 gloo processes on 127.0.0.1 against one process.

Spawning costs seconds, so one spawned run executes every distributed scenario and saves its
results; the tests below compare them with single-process fits computed here.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import make_case
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn import distributed as D
from laplace_ggn.collectors.base import Collector, Reduction
from laplace_ggn.likelihoods import from_nll
from laplace_ggn.structures import STRUCTURES

WORLD = 2
SPLIT = 7  # rank 0 holds the first 7 of 12 points, rank 1 the other 5 (unequal shards)
SETTINGS = {
    # name: (case, wrapper keyword arguments)
    "clf": ("mlp_classification", {"prior_precision": 0.7}),
    "reg": (
        "mlp_regression",
        {"sigma_noise": 0.6, "prior_precision": torch.tensor([0.5, 1.0, 2.0, 3.0])},
    ),
    "bin": ("mlp_binary", {"subset": "last_layer"}),
}


def _structures() -> list[str]:
    # ella builds its features from each process's first samples: it refuses distributed fits
    return [s for s in STRUCTURES if s != "ella"]


def _wrapper(setting: str, structure: str, model=None) -> LaplaceWrapper:
    case_name, kwargs = SETTINGS[setting]
    case = make_case(case_name, 0)
    return LaplaceWrapper(
        model if model is not None else case.model, case.likelihood, structure=structure, **kwargs
    )


def _loader(X, y, batch_size=3) -> DataLoader:
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def _shard(setting: str, rank: int, split: int = SPLIT):
    case = make_case(SETTINGS[setting][0], 0)
    sl = slice(0, split) if rank == 0 else slice(split, None)
    return case.X[sl], case.y[sl]


def _summary(la: LaplaceWrapper) -> dict:
    return {
        "cov": la.posterior_covariance(),
        "lml": la.log_marginal_likelihood().detach(),
        "n_data": la.fitted.statistics.n_data,
        "n_outputs": la.fitted.statistics.n_outputs,
        "names": list(la.fitted.layout.names),
    }


def _try_summary(setting: str, structure: str, loader, **fit_kwargs) -> dict | str:
    """The summary of a fit, or the error it raised (so one failure does not stop the battery)."""
    try:
        return _summary(_wrapper(setting, structure).fit(loader, **fit_kwargs))
    except (ValueError, RuntimeError, TypeError) as exc:  # recorded, compared by the tests
        return f"{type(exc).__name__}: {exc}"


def _error_of(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


class _FakeCollector:
    """Collector with unequal gathered rows, to exercise the padded all-gather."""

    def __init__(self, rows: int, rank: int):
        self.rows = torch.arange(rows * 2, dtype=torch.float64).reshape(rows, 2) + 100 * rank
        self.count = torch.tensor(rows, dtype=torch.int64)
        self.vec = torch.full((3,), float(rank + 1), dtype=torch.float64)
        self.loaded = None

    def distributed_state(self):
        return {"V": (self.rows, "gather"), "n": (self.count, "sum"), "a": (self.vec, "sum")}

    def load_distributed_state(self, state):
        self.loaded = state


class _StateCollector:
    """Collector returning a given state, to exercise the agreement checks."""

    def __init__(self, state):
        self.state = state

    def distributed_state(self):
        return self.state

    def load_distributed_state(self, state):
        raise AssertionError("must not be reached")


class _Branchy(torch.nn.Module):
    """Identical weights, but the last layer run depends on the data."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(3, 2).double()
        self.b = torch.nn.Linear(3, 2).double()

    def forward(self, x):
        return self.a(x) if bool(x[0, 0] > 0) else self.b(x)


class _PerFeature(torch.nn.Module):
    """C equals the input width."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(1, 1).double()

    def forward(self, x):
        return self.lin(x.unsqueeze(-1)).squeeze(-1)


def _faults(rank: int) -> dict:
    out = {}
    fit = D.DistributedFit()
    vec = torch.zeros(3 + rank, dtype=torch.float64)
    out["shape"] = _error_of(
        lambda: fit.finish(
            _StateCollector({"a": (vec, "sum")}), n_data=1, n_outputs=2, loss_sum=0.0
        )
    )
    names = {"a": (vec, "sum")} if rank == 0 else {"b": (vec, "sum")}
    out["names"] = _error_of(
        lambda: fit.finish(_StateCollector(names), n_data=1, n_outputs=2, loss_sum=0.0)
    )
    out["op"] = _error_of(
        lambda: fit.finish(
            _StateCollector({"a": (vec, "mean" if rank == 1 else "sum")}),
            n_data=1,
            n_outputs=2,
            loss_sum=0.0,
        )
    )
    x = torch.full((4, 3), 1.0 if rank == 0 else -1.0, dtype=torch.float64)
    out["trace"] = _error_of(
        lambda: LaplaceWrapper(_Branchy(), "regression", structure="diag", subset="last_layer").fit(
            [(x, torch.zeros(4, 2, dtype=torch.float64))]
        )
    )
    xw = torch.randn(4, 3 + rank, dtype=torch.float64)
    out["C"] = _error_of(
        lambda: LaplaceWrapper(_PerFeature(), "classification", structure="diag").fit(
            [(xw, torch.zeros(4, dtype=torch.long))]
        )
    )
    extra = _PerFeature()
    if rank == 1:
        extra.register_buffer("scale", torch.ones(1, dtype=torch.float64))
    out["buffer"] = _error_of(
        lambda: LaplaceWrapper(extra, "classification", structure="diag").fit(
            [(xw[:, :3], torch.zeros(4, dtype=torch.long))]
        )
    )
    return out


# -- the spawned battery ----------------------------------------------------------------------


def _battery(rank: int) -> dict:
    out: dict = {}
    empty = _loader(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0))
    for structure in _structures():
        for setting in SETTINGS:
            X, y = _shard(setting, rank)
            out[f"shard/{structure}/{setting}"] = _try_summary(setting, structure, _loader(X, y))
        # one rank with an empty shard (rank 1, then rank 0), including subset='last_layer'
        for setting in ("clf", "bin"):
            for empty_rank in (1, 0):
                case = make_case(SETTINGS[setting][0], 0)
                loader = empty if rank == empty_rank else _loader(case.X, case.y, 5)
                out[f"empty{empty_rank}/{structure}/{setting}"] = _try_summary(
                    setting, structure, loader
                )
            # rank 1 yields only batches of 0 rows (like an empty shard); rank 0 all the data,
            # with a batch of 0 rows in the middle
            case = make_case(SETTINGS[setting][0], 0)
            zero = (case.X[:0], case.y[:0])
            loader = (
                [zero, zero]
                if rank == 1
                else [(case.X[:5], case.y[:5]), zero, (case.X[5:], case.y[5:])]
            )
            out[f"zerorows/{structure}/{setting}"] = _try_summary(setting, structure, loader)
        # every label ignore_index on every rank: N = 0 in all, refused on every rank; on one
        # rank only: the fit of the other rank's data
        X, y = _shard("clf", rank)
        out[f"ignored/{structure}"] = _try_summary("clf", structure, _loader(X, y.fill_(-100)))
        X, y = _shard("clf", rank)
        out[f"ignored1/{structure}"] = _try_summary(
            "clf", structure, _loader(X, y.fill_(-100) if rank == 1 else y)
        )
        # an explicit process group gives the same result as the default one
        group = dist.new_group(list(range(WORLD)))
        X, y = _shard("clf", rank)
        out[f"group/{structure}"] = _try_summary(
            "clf", structure, _loader(X, y), process_group=group
        )
        # distributed=False: this rank's shard only
        out[f"local/{structure}"] = _try_summary("clf", structure, _loader(X, y), distributed=False)
    # a group of rank 0 only: rank 0 fits alone, rank 1 is not a member and is refused
    solo = dist.new_group([0])
    X, y = _shard("clf", rank)
    if rank == 0:
        out["solo"] = _try_summary("clf", "full", _loader(X, y), process_group=solo)
    else:
        out["solo"] = _error_of(
            lambda: _wrapper("clf", "full").fit(_loader(X, y), process_group=solo)
        )
    # mismatched models across ranks
    case = make_case("mlp_classification", 0)
    if rank == 1:
        with torch.no_grad():
            case.model[2].bias[0] += 1e-6
    X, y = _shard("clf", rank)
    la = LaplaceWrapper(case.model, case.likelihood, structure="diag")
    out["mismatch"] = _error_of(lambda: la.fit(_loader(X, y)))
    out["mismatch_fitted"] = la.is_fitted
    # an error on one rank during the pass is raised on every rank; previous fit kept
    la = _wrapper("clf", "full").fit(_loader(X, y))
    before = la.state_dict()
    Xb = X.clone()
    if rank == 1:
        Xb[4, 1] = float("nan")
    out["nan"] = _error_of(lambda: la.fit(_loader(Xb, y)))
    after = la.state_dict()
    out["nan_kept"] = torch.equal(before["posterior"]["ggn"], after["posterior"]["ggn"]) and (
        before["fit_statistics"] == after["fit_statistics"]
    )
    # an error on one rank before the pass (while tracing 'last_layer') reaches every rank
    Xs, ys = _shard("bin", rank)
    bad = [(Xs, ys, ys)] if rank == 1 else _loader(Xs, ys)
    out["pre"] = _error_of(lambda: _wrapper("bin", "diag").fit(bad))
    out["faults"] = _faults(rank)
    # empty loaders on every rank, and loaders of only 0-row batches on every rank
    out["all_empty"] = _error_of(lambda: _wrapper("clf", "diag").fit(empty))
    zero_rows = [(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long))] * 2
    out["all_empty_batches"] = _error_of(lambda: _wrapper("clf", "full").fit(zero_rows))
    out.update(_likelihood_battery(rank))  # likelihoods beyond three: end of this file
    # padded all-gather with unequal (and zero) row counts, sums of two dtypes
    for rows in ((3, 0), (0, 2), (0, 0), (1, 4)):
        fake = _FakeCollector(rows[rank], rank)
        n, C, loss = D.DistributedFit().finish(
            fake, n_data=rows[rank], n_outputs=2 if rows[rank] else None, loss_sum=0.5 * rank
        )
        out[f"fake/{rows}"] = {"state": fake.loaded, "n": n, "C": C, "loss": loss}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.save(_battery(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """Results of the battery on each of the 2 ranks (one spawn for the whole module)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False)
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail("the 2-rank gloo run did not finish within 240 s (a hang)")
        yield [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)
        ]


def _assert_rel(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-8) -> None:
    err = float((a - b).norm() / b.norm().clamp_min(1e-300))
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def _single(setting: str, structure: str, X=None, y=None) -> dict:
    case = make_case(SETTINGS[setting][0], 0)
    X = case.X if X is None else X
    y = case.y if y is None else y
    return _summary(_wrapper(setting, structure).fit(_loader(X, y, 4)))


def _check_equal(got: dict | str, ref: dict) -> None:
    assert isinstance(got, dict), got
    assert got["names"] == ref["names"]
    assert (got["n_data"], got["n_outputs"]) == (ref["n_data"], ref["n_outputs"])
    _assert_rel(got["cov"], ref["cov"])
    _assert_rel(got["lml"], ref["lml"])


@pytest.mark.parametrize("structure", _structures())
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_ranks_equal_single_process(ranks, structure, setting):
    ref = _single(setting, structure)
    for res in ranks:
        _check_equal(res[f"shard/{structure}/{setting}"], ref)
    # every rank holds the same posterior, bit for bit
    assert torch.equal(
        ranks[0][f"shard/{structure}/{setting}"]["cov"],
        ranks[1][f"shard/{structure}/{setting}"]["cov"],
    )


@pytest.mark.parametrize("structure", _structures())
def test_empty_shard_and_last_layer_from_the_rank_with_data(ranks, structure):
    for setting in ("clf", "bin"):
        ref = _single(setting, structure)
        for empty_rank in (1, 0):
            for res in ranks:
                _check_equal(res[f"empty{empty_rank}/{structure}/{setting}"], ref)
    # 'bin' uses subset='last_layer': the empty rank received the names of the rank with data
    assert ranks[1][f"empty1/{structure}/bin"]["names"] == ["2.weight", "2.bias"]


@pytest.mark.parametrize("structure", _structures())
def test_rank_of_zero_row_batches_is_an_empty_shard(ranks, structure):
    for setting in ("clf", "bin"):
        ref = _single(setting, structure)
        for res in ranks:
            _check_equal(res[f"zerorows/{structure}/{setting}"], ref)
    assert ranks[1][f"zerorows/{structure}/bin"]["names"] == ["2.weight", "2.bias"]


@pytest.mark.parametrize("structure", _structures())
def test_process_group_and_opt_out(ranks, structure):
    ref = _single("clf", structure)
    for res in ranks:
        _check_equal(res[f"group/{structure}"], ref)
    for r, res in enumerate(ranks):
        X, y = _shard("clf", r)
        _check_equal(res[f"local/{structure}"], _single("clf", structure, X, y))


@pytest.mark.parametrize("structure", _structures())
def test_every_label_ignored_refused_on_every_rank(ranks, structure):
    for res in ranks:
        assert res[f"ignored/{structure}"].startswith(
            "ValueError: train_loader must hold a target that is not ignore_index=-100 on any "
            "of the 2 ranks; got none (N = 0)"
        )
    X, y = _shard("clf", 0)
    ref = _single("clf", structure, X, y)
    for res in ranks:
        _check_equal(res[f"ignored1/{structure}"], ref)


def test_group_of_one_rank_and_non_member_refused(ranks):
    X, y = _shard("clf", 0)
    _check_equal(ranks[0]["solo"], _single("clf", "full", X, y))
    assert ranks[1]["solo"].startswith("ValueError: process_group must contain this process")


def test_mismatched_models_detected_on_every_rank(ranks):
    for res in ranks:
        assert "ValueError" in res["mismatch"]
        assert "models differ between rank 0 and rank 1" in res["mismatch"]
        assert "'2.bias'" in res["mismatch"]
        assert res["mismatch_fitted"] is False


def test_error_on_one_rank_raised_on_every_rank(ranks):
    assert ranks[1]["nan"].startswith("ValueError: input in batch 1 must be finite")
    assert ranks[0]["nan"].startswith("ValueError: fit failed on rank 1 during the pass")
    assert "input in batch 1 must be finite" in ranks[0]["nan"]
    assert ranks[0]["nan_kept"] and ranks[1]["nan_kept"]
    assert ranks[1]["pre"].startswith(
        "ValueError: loader batches (batch 0) must be (input, target)"
    )
    assert ranks[0]["pre"].startswith(
        "ValueError: fit failed on rank 1 before the pass: ValueError: loader batches (batch 0)"
    )
    for res in ranks:
        for key in ("all_empty", "all_empty_batches"):
            assert res[key].startswith(
                "ValueError: train_loader must yield at least one non-empty batch on some rank; "
                "got no data on all 2 ranks"
            )


def test_disagreements_across_ranks_refused_on_every_rank(ranks):
    for res in ranks:
        f = res["faults"]
        assert f["shape"].startswith(
            "ValueError: collector state 'a' must agree across ranks; "
            "got sum (3,) torch.float64 on rank 0 and sum (4,)"
        )
        assert f["names"].startswith(
            "ValueError: collector state must have the same entries on "
            "every rank; got ['a'] on rank 0 and ['b'] on rank 1"
        )
        assert f["trace"].startswith(
            "ValueError: subset='last_layer' must resolve to the same "
            "parameters on every rank; got {0: ['a.weight', 'a.bias'], "
            "1: ['b.weight', 'b.bias']}"
        )
        assert f["C"].startswith(
            "ValueError: model output must have the same number of columns "
            "C on every rank; got {0: 3, 1: 4}"
        )
        assert f["buffer"].startswith(
            "ValueError: model must be identical on every rank; the "
            "models differ between rank 0 and rank 1: buffer 'scale' "
            "is missing on one of them"
        )
    assert ranks[1]["faults"]["op"].startswith(
        "ValueError: collector state 'a' must be reduced by one of ['sum', 'gather']; got 'mean'"
    )
    assert ranks[0]["faults"]["op"].startswith(
        "ValueError: fit failed on rank 1 during the pass: ValueError: collector state 'a' must "
        "be reduced by one of"
    )


def test_padded_gather_and_sums(ranks):
    for rows in ((3, 0), (0, 2), (0, 0), (1, 4)):
        parts = [_FakeCollector(rows[r], r).rows for r in range(WORLD)]
        for res in ranks:
            got = res[f"fake/{rows}"]
            assert torch.equal(got["state"]["V"], torch.cat(parts))
            assert got["state"]["n"].dtype == torch.int64 and int(got["state"]["n"]) == sum(rows)
            assert torch.equal(got["state"]["a"], torch.full((3,), 3.0, dtype=torch.float64))
            assert got["n"] == sum(rows) and got["loss"] == 0.5
            assert got["C"] == (2 if sum(rows) else 0)


# -- in-process checks (no spawn) -------------------------------------------------------------


def test_distributed_true_without_process_group_refused():
    la = _wrapper("clf", "diag")
    case = make_case("mlp_classification", 0)
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        la.fit(case.loader(4), distributed=True)
    with pytest.raises(ValueError, match="process_group must be None with distributed=False"):
        la.fit(case.loader(4), distributed=False, process_group=object())
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        la.fit(case.loader(4), distributed="yes")
    assert not la.is_fitted
    # not initialised and distributed=None: a local fit
    assert la.fit(case.loader(4)).is_fitted


def test_model_digests_name_every_tensor_and_see_small_changes():
    case = make_case("mlp_classification", 0)
    model = torch.nn.Sequential(case.model, torch.nn.BatchNorm1d(3).double())
    d0 = D.model_digests(model)
    assert list(d0) == [f"param:{n}" for n, _ in model.named_parameters()] + [
        f"buffer:{n}" for n, _ in model.named_buffers()
    ]
    with torch.no_grad():
        model[0][0].weight[1, 2] = torch.nextafter(
            model[0][0].weight[1, 2], torch.tensor(2.0).double()
        )
    d1 = D.model_digests(model)
    assert [k for k in d0 if d0[k] != d1[k]] == ["param:0.0.weight"]


class _ToyCollector(Collector):
    """Declares one state of each kind a collector may hold."""

    def __init__(self):
        super().__init__()
        self.add_state("s", torch.zeros(2, dtype=torch.float64), reduce="sum")
        self.add_state("rows", torch.zeros(0, 2, dtype=torch.float64), reduce=Reduction.GATHER)
        self.add_state("n", torch.zeros(1, dtype=torch.float64), reduce=Reduction.SUM)
        self.n = 0
        self.loads = 0

    def update(self, x, where="", *, y=None):
        self.s += x.sum(0)
        self.rows.append(x)
        self.n += x.shape[0]
        return x

    def finalize(self):
        return self.s

    def _after_load(self):
        self.loads += 1


def test_collector_state_is_derived_from_its_declarations():
    col = _ToyCollector()
    empty = col.distributed_state()
    assert list(empty) == ["s", "rows", "n"]
    assert [op for _, op in empty.values()] == [Reduction.SUM, Reduction.GATHER, Reduction.SUM]
    assert empty["rows"][0].shape == (0, 2) and float(empty["n"][0]) == 0.0
    x = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    col.update(x[:2])
    col.update(x[2:])
    state = col.distributed_state()
    torch.testing.assert_close(state["rows"][0], x, rtol=0, atol=0)
    assert len(col.rows) == 1  # the row blocks were stacked in place
    assert float(state["n"][0]) == 3.0
    col.load_distributed_state(
        {"s": 2 * state["s"][0], "rows": torch.cat([x, x]), "n": 2 * state["n"][0]}
    )
    assert col.n == 6 and isinstance(col.n, int) and col.rows[0].shape == (6, 2) and col.loads == 1
    with pytest.raises(ValueError, match=r"reduce must be one of \['sum', 'gather'\]; got 'mean'"):
        col.add_state("m", torch.zeros(1), reduce="mean")
    with pytest.raises(ValueError, match=r"default of the gathered state 'r' must have shape"):
        col.add_state("r", torch.zeros(1, 2), reduce=Reduction.GATHER)
    col.remove_state("s")
    assert list(col.distributed_state()) == ["rows", "n"]


# -- likelihoods beyond three: a user likelihood, heteroscedastic, pairs, one σ per output -----


def _student_t(f, y):
    r = y.reshape(f.shape) - f
    return (2.5 * torch.log1p(r * r / 4)).sum(-1)


def _likelihood_case(name: str):
    """(model, X, y, likelihood, wrapper keywords) of a likelihood beyond the three, float64."""
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(12, 3, generator=g, dtype=torch.float64), None
    C, lik, kw = 1, name, {}
    if name == "student_t":
        lik = from_nll(_student_t)
    elif name == "heteroscedastic":
        C = 2
    elif name == "reward_modeling":
        X = torch.randn(12, 2, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (12,), generator=g)
    else:  # one σ per output
        C, lik = 2, "regression"
        kw = {"sigma_noise": torch.tensor([0.5, 2.0], dtype=torch.float64)}
    if y is None:
        y = torch.randn(12, 1 if name != "per_output" else 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, C))
    return model.double(), X, y, lik, kw


LIKELIHOOD_CASES = ("student_t", "heteroscedastic", "reward_modeling", "per_output")


def _likelihood_summary(name: str, structure: str, X, y) -> dict | str:
    model, _, _, lik, kw = _likelihood_case(name)
    try:
        la = LaplaceWrapper(model, lik, structure=structure, **kw).fit(_loader(X, y))
        return {"cov": la.posterior_covariance(), "lml": la.log_marginal_likelihood().detach()}
    except (ValueError, RuntimeError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _likelihood_battery(rank: int) -> dict:
    out = {}
    for name in LIKELIHOOD_CASES:
        _, X, y, _, _ = _likelihood_case(name)
        sl = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        for structure in ("full", "kfac"):
            out[f"lik/{name}/{structure}"] = _likelihood_summary(name, structure, X[sl], y[sl])
    return out


@pytest.mark.parametrize("structure", ["full", "kfac"])
@pytest.mark.parametrize("name", LIKELIHOOD_CASES)
def test_two_ranks_equal_single_process_for_every_likelihood(ranks, structure, name):
    _, X, y, _, _ = _likelihood_case(name)
    ref = _likelihood_summary(name, structure, X, y)
    for res in ranks:
        got = res[f"lik/{name}/{structure}"]
        assert isinstance(got, dict), got
        _assert_rel(got["cov"], ref["cov"])
        _assert_rel(got["lml"], ref["lml"])
