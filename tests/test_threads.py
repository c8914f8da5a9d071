"""Reads of one fitted wrapper from several threads equal the sequential results exactly."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper

N_THREADS, N_CALLS = 4, 12


class _NotVmappable(nn.Module):
    """Data-dependent control flow: vmap over samples fails, the batched reverse mode runs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if bool((x.abs() > 100).any()):
            h = h * 0
        return self.b(h)


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return {"mlp": mlp, "not_vmappable": _NotVmappable().double()}


STRUCTURES = {
    "full": {"structure": "full"},
    "diag": {"structure": "diag"},
    "kfac": {"structure": "kfac"},
    "lowrank": {"structure": "lowrank"},
    "lowrank_k": {"structure": "lowrank", "rank": 5},
    "projected": {"structure": "projected"},
}


def _calls(la, X):
    """Every read path, with seeded generators, as a list of (name, thunk)."""
    return [
        ("glm", lambda: la.predict(X).mean),
        ("glm_var", lambda: la.predict(X).variance),
        ("mc", lambda: la.predict(X, link="mc", generator=torch.Generator().manual_seed(1)).mean),
        (
            "nn",
            lambda: (
                la.predict(X, "nn", n_samples=8, generator=torch.Generator().manual_seed(2)).mean
            ),
        ),
        ("jac", lambda: la.jacobians(X)[0]),
        ("fcov", lambda: la.functional_covariance(X)),
        ("sample", lambda: la.sample(3, generator=torch.Generator().manual_seed(3))),
    ]


@pytest.mark.parametrize("model_name", ["mlp", "not_vmappable"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_concurrent_reads_equal_sequential(structure, model_name):
    model = _models()[model_name]
    g = torch.Generator().manual_seed(5)
    X = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(model, "classification", **STRUCTURES[structure]).fit(
            DataLoader(TensorDataset(X, y), 8)
        )
    Xt = torch.randn(10, 3, generator=g, dtype=torch.float64)
    expected = {name: fn() for name, fn in _calls(la, Xt)}
    errors, mismatches = [], []
    barrier = threading.Barrier(N_THREADS)

    def work(offset):
        try:
            barrier.wait()
            calls = _calls(la, Xt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(N_CALLS):
                    name, fn = calls[(i + offset) % len(calls)]
                    got = fn()
                    if not torch.equal(got, expected[name]):
                        mismatches.append((name, float((got - expected[name]).abs().max())))
        except Exception as exc:  # reported below with the thread's traceback text
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not mismatches, mismatches
    # and the wrapper still works as before afterwards
    for name, fn in _calls(la, Xt):
        assert torch.equal(fn(), expected[name]), name


def test_threads_on_a_transformer_with_padding_mask():
    from zoo import make_arch

    arch = make_arch("transformer")
    la = LaplaceWrapper(arch.model, "classification", structure="diag").fit(arch.batches)
    expected = la.predict(arch.x_test).mean
    results, errors = [], []

    def work():
        try:
            for _ in range(4):
                results.append(la.predict(arch.x_test).mean)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(r, expected) for r in results)


def test_plain_attention_passes_leave_other_threads_fast_paths_alone():
    """While a pass differentiates a transformer, forwards in other threads (the library's own
    plain forwards and the user's) keep the fused path; the process-wide flag is not touched."""
    from zoo import make_arch

    from laplace_ggn._autodiff import plain_attention

    arch = make_arch("transformer")
    la = LaplaceWrapper(arch.model, "classification", structure="diag").fit(arch.batches)
    src = torch.randn(3, 6, 8)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 4:] = True
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def differentiating_thread():
        with plain_attention():
            inside.set()
            done.wait(10)

    t = threading.Thread(target=differentiating_thread)
    t.start()
    assert inside.wait(10)
    try:
        seen["flag"] = torch.backends.mha.get_fastpath_enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's nested-tensor prototype note
            with torch.no_grad():
                seen["user_forward"] = encoder(src, src_key_padding_mask=mask)
            seen["predict"] = la.predict(arch.x_test).mean
    finally:
        done.set()
        t.join()
    assert seen["flag"] is True
    # the user's encoder took the nested fast path: padded positions come back as zeros
    assert torch.equal(seen["user_forward"][:, 4:], torch.zeros_like(seen["user_forward"][:, 4:]))
    assert torch.allclose(seen["predict"], la.predict(arch.x_test).mean, atol=1e-6)


@pytest.mark.parametrize("structure", ["full", "kfac", "lowrank_k"])
def test_concurrent_first_reads_of_lazy_factorisations(structure):
    """Threads start before any factorisation was computed; results equal sequential ones."""
    model = _models()["mlp"]
    g = torch.Generator().manual_seed(7)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    la = LaplaceWrapper(model, "classification", **STRUCTURES[structure]).fit([(X, y)])
    fresh = LaplaceWrapper(model, "classification", **STRUCTURES[structure]).fit([(X, y)])
    results, errors = [], []
    barrier = threading.Barrier(N_THREADS)

    def work():
        try:
            barrier.wait()
            results.append([fn() for _, fn in _calls(la, X)])
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    expected = [fn() for _, fn in _calls(fresh, X)]
    for got in results:
        for (name, _), a, b in zip(_calls(la, X), got, expected):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
def test_concurrent_reads_of_a_linear_head_subset(structure):
    """Head-only subsets read the head's features through a hook on every thread's copy."""
    model = _models()["mlp"]
    g = torch.Generator().manual_seed(9)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    la = LaplaceWrapper(model, "classification", structure=structure, subset="last_layer")
    la.fit([(X, y)])
    assert la.fitted.head is not None
    expected = {name: fn() for name, fn in _calls(la, X)}
    calls_done, errors, mismatches = [], [], []

    def work(offset):
        try:
            calls = _calls(la, X)
            for i in range(N_CALLS):
                name, fn = calls[(i + offset) % len(calls)]
                if not torch.equal(fn(), expected[name]):
                    mismatches.append(name)
                calls_done.append(name)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not mismatches, mismatches
    assert len(calls_done) == N_THREADS * N_CALLS


@pytest.mark.parametrize("structure", ["diag", "kfac"])
def test_concurrent_first_predictions_of_a_linear_head(structure):
    """The Kronecker head's (D, C) factors are computed once per posterior, on first use:
    threads starting together on a fresh posterior get the sequential results exactly."""
    model = _models()["mlp"]
    g = torch.Generator().manual_seed(11)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)

    def fitted():
        la = LaplaceWrapper(model, "classification", structure=structure, subset="last_layer")
        return la.fit([(X, y)])

    links = ("probit", "bridge", "bridge_norm")
    ref = fitted()
    expected = {k: (ref.predict(X, link=k).mean, ref.predict(X, link=k).variance) for k in links}
    la = fitted()
    results, errors = [], []
    barrier = threading.Barrier(N_THREADS)

    def work(offset):
        try:
            barrier.wait()
            for i in range(len(links)):
                link = links[(i + offset) % len(links)]
                pred = la.predict(X, link=link)
                results.append((link, pred.mean, pred.variance))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == N_THREADS * len(links)
    for link, mean, var in results:
        assert torch.equal(mean, expected[link][0]) and torch.equal(var, expected[link][1]), link
    if structure == "kfac":  # the fast path ran and kept its factors
        assert la.posterior._head_factors is not None


def test_forward_mode_passes_in_several_threads():
    """Forward-AD levels are process-wide: forward-mode passes of several threads (top-k lowrank
    fits of separate wrappers, Hessian products) run one at a time and equal the sequential ones."""
    from laplace_ggn.operators import HessianOperator

    torch.manual_seed(0)
    X, y = torch.randn(48, 5, dtype=torch.float64), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    op = HessianOperator(model, loader, likelihood="classification")
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)

    def run():
        la = LaplaceWrapper(model, "classification", structure="lowrank", rank=4).fit(loader)
        return op @ V, la.predict(X[:6]).variance

    ref = run()
    results, errors = [], []

    def work():
        for _ in range(6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    results.append(run())
            except Exception as err:  # noqa: BLE001 -- collected and reported below
                errors.append(repr(err))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 18
    for hv, var in results:
        torch.testing.assert_close(hv, ref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var, ref[1], rtol=1e-8, atol=1e-12)
