"""Function-space Laplace: structure="gp" and "ella" against laplace-torch 0.3's GP and ELLA.

The problem: a seeded 4-D regression, y = sin(x₁) + ½cos(2x₂) + x₃x₄/4 + 0.1·ε, with 2,000
training and 500 test points, and a tanh MLP 4-50-50-1 (P = 2,851) trained on it in the
script (full-batch Adam, cached under the temp directory). σ = 0.1, α = 1, batches of 100.

(a) Accuracy and memory of ELLA (printed under the table, float64 copy of the model):
``structure="ella"`` with K = 200 features from M = 400 context samples against the exact GP
(``structure="gp"`` with every sample as context): median relative error of the functional
and of the predictive (+σ²) variance on the 500 test points, and the bytes of the tensors each
posterior stores.  The peak extra memory of each fit is the harness's ``peak`` column.

(b) Speed, fit + GLM predictive on the 500 test points, interleaved with laplace-torch 0.3 on
the same model, data and M:

- ``gp M=N``: ``structure="gp"`` vs ``FunctionalLaplace(n_subset=2000)``;
- ``gp M=500``: ``structure="gp", n_context=500`` vs ``FunctionalLaplace(n_subset=500)``;
- ``ella K=200 M=400``: ``structure="ella"`` vs laplace-torch's ``ELLA(subsample_size=400,
  n_eigenvalues=200)`` (its exact ``FunctionalLaplace(n_subset=2000)`` is the ``gp M=N`` row);
- ``gp last layer``: ``structure="gp", subset="last_layer"`` vs ``FunctionalLLLaplace``.

``--check`` also prints the agreement of the exact GP with laplace-torch's (M = N, where both
are exact).

    PYTHONPATH=. .bench-venv/bin/python benchmarks/bench_gp.py --threads 1 --reps 3
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from _harness import MISSING, Case, main
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper

N_TRAIN, N_TEST, SIGMA, ALPHA, BATCH = 2000, 500, 0.1, 1.0, 100
K_ELLA, M_ELLA, M_SUB = 200, 400, 500


def problem(seed: int = 0):
    """``(model, X_train, y_train, X_test)``, the model trained and cached."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(N_TRAIN + N_TEST, 4, generator=g) * 4 - 2
    y = torch.sin(X[:, :1]) + 0.5 * torch.cos(2 * X[:, 1:2]) + X[:, 2:3] * X[:, 3:4] / 4
    y = y + SIGMA * torch.randn(y.shape, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1)
    )
    path = os.path.join(tempfile.gettempdir(), f"laplace_ggn_bench_gp_{seed}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(1500):
            opt.zero_grad()
            loss = ((model(X[:N_TRAIN]) - y[:N_TRAIN]) ** 2).mean()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), path)
    model.eval()
    return model, X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:]


def _loader(X, y):
    return DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=False)


def ours(model, X, y, Xt, **kw):
    la = LaplaceWrapper(model, "regression", sigma_noise=SIGMA, prior_precision=ALPHA, **kw)
    la.fit(_loader(X, y), progress=False)
    return la, la.predict(Xt).variance


def theirs(cls_name, model, X, y, Xt, **kw):
    import laplace

    la = getattr(laplace, cls_name)(
        model, "regression", sigma_noise=SIGMA, prior_precision=ALPHA, **kw
    )
    la.fit(_loader(X, y))
    _, var = la(Xt)
    return la, var


def _stored_bytes(la) -> int:
    post = la.fitted.posterior
    return sum(t.numel() * t.element_size() for t in post.state_dict().values())


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).abs() / b.abs()).flatten()


def _ella_vs_gp(m, X, y, Xt, alpha, sigma) -> list[str]:
    kw = {"prior_precision": alpha, "sigma_noise": sigma}
    gp = LaplaceWrapper(m, "regression", structure="gp", **kw).fit(_loader(X, y), progress=False)
    ella = LaplaceWrapper(
        m, "regression", structure="ella", rank=K_ELLA, n_context=M_ELLA, **kw
    ).fit(_loader(X, y), progress=False)
    fg = gp.functional_covariance(Xt).reshape(-1)
    fe = ella.functional_covariance(Xt).reshape(-1)
    rf, rp = _rel(fe, fg), _rel(fe + sigma**2, fg + sigma**2)
    bg, be = _stored_bytes(gp), _stored_bytes(ella)
    return [
        f"α={alpha:.4g}, σ={sigma:.4g}: relative error of the predictive variance (+σ²) median "
        f"{float(rp.median()):.2%} (90th percentile {float(rp.quantile(0.9)):.2%}, max "
        f"{float(rp.max()):.2%}); of the functional variance median {float(rf.median()):.2%} "
        f"(90th percentile {float(rf.quantile(0.9)):.2%}).",
        f"    stored posterior tensors: exact GP {bg / 2**20:.2f} MiB "
        f"({gp.fitted.posterior.rank} context rows), ELLA {be / 2**20:.2f} MiB "
        f"({ella.fitted.posterior.rank} features): ratio {be / bg:.3f}.",
    ]


def check(args) -> str:
    """ELLA against the exact GP (float64), and the exact GP against laplace-torch's."""
    model, X, y, Xt = problem(args.seed)
    m64, X64, y64, Xt64 = model.double(), X.double(), y.double(), Xt.double()
    tuned = LaplaceWrapper(
        m64, "regression", structure="gp", prior_precision=ALPHA, sigma_noise=SIGMA
    )
    tuned.fit(_loader(X64, y64), progress=False)
    tuned.optimize_prior_precision("marglik", tune_sigma_noise=True, n_steps=200)
    a, s = float(tuned.prior_precision), float(tuned.sigma_noise)
    lines = [
        f"(a) ELLA K={K_ELLA}, M={M_ELLA} vs the exact GP (M=N={N_TRAIN}), float64, {N_TEST} "
        "test points; α and σ tuned by the evidence of the exact GP, then as set:"
    ]
    lines += _ella_vs_gp(m64, X64, y64, Xt64, a, s)
    lines += _ella_vs_gp(m64, X64, y64, Xt64, ALPHA, SIGMA)
    try:
        for dtype in (torch.float64, torch.float32):
            md, Xd, yd, Xtd = (t.to(dtype) for t in (model, X, y, Xt))
            _, v_ours = ours(md, Xd, yd, Xtd, structure="gp")
            _, v_lt = theirs("FunctionalLaplace", md, Xd, yd, Xtd, n_subset=N_TRAIN)
            r = _rel(v_ours.flatten(), v_lt.flatten() + SIGMA**2)
            lines.append(
                f"(b) exact GP vs laplace-torch FunctionalLaplace (M=N, {dtype}): predictive "
                f"variance relative difference median {float(r.median()):.2e}, max "
                f"{float(r.max()):.2e}."
            )
    except MISSING as e:
        lines.append(f"laplace-torch agreement skipped: {type(e).__name__}: {e}")
    model.float()
    return "\n".join(lines)


def build(args) -> list[Case]:
    model, X, y, Xt = problem(args.seed)
    n = N_TRAIN

    def o(**kw):
        return lambda _: ours(model, X, y, Xt, **kw)

    def t(name, **kw):
        return lambda _: theirs(name, model, X, y, Xt, **kw)

    full_gp = f"FunctionalLaplace(n_subset={n})"
    cases = [
        Case("gp M=N", "laplace_ggn gp", o(structure="gp"), role="ours"),
        Case("gp M=N", f"laplace-torch {full_gp}", t("FunctionalLaplace", n_subset=n)),
        Case(
            "gp M=500",
            "laplace_ggn gp n_context=500",
            o(structure="gp", n_context=M_SUB),
            role="ours",
        ),
        Case(
            "gp M=500",
            "laplace-torch FunctionalLaplace(n_subset=500)",
            t("FunctionalLaplace", n_subset=M_SUB),
        ),
        Case(
            f"ella K={K_ELLA} M={M_ELLA}",
            "laplace_ggn ella",
            o(structure="ella", rank=K_ELLA, n_context=M_ELLA),
            role="ours",
        ),
        Case(
            f"ella K={K_ELLA} M={M_ELLA}",
            f"laplace-torch ELLA({M_ELLA}, {K_ELLA})",
            t("ELLA", subsample_size=M_ELLA, n_eigenvalues=K_ELLA),
        ),
        Case(
            "gp last layer M=N",
            "laplace_ggn gp last_layer",
            o(structure="gp", subset="last_layer"),
            role="ours",
        ),
        Case(
            "gp last layer M=N",
            "laplace-torch FunctionalLLLaplace",
            t("FunctionalLLLaplace", n_subset=n),
        ),
    ]
    return cases


if __name__ == "__main__":
    main(
        "Function-space Laplace: gp / ella fit + predict vs laplace-torch 0.3",
        build,
        check=check,
        script=os.path.abspath(__file__),
    )
