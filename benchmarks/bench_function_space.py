"""Function space: the joint GLM predictive and joint function samples against laplace-torch 0.3.

Regression MLP 6-64-64-2 (tanh, P = 4,738) trained on N = 500 points of a smooth 6-D function
(float32, 2 threads); laplace-torch and laplace_ggn fit the same model on the same data with the
same prior precision and σ, for the structures full / kron-kfac / diag over all weights and full
over the last layer. On B = 500 test inputs (B·C = 1,000 outputs) it times:

- ``joint predictive``: ``la.predict(x, joint=True)`` (mean ``(B, C)``, covariance
  ``(B·C, B·C)`` with σ²) against laplace-torch's ``la(x, pred_type="glm", joint=True)``;
- ``joint samples n=100``: ``la.functional_samples(x, 100)`` (one posterior draw per sample on
  all inputs) against laplace-torch's way to jointly consistent draws: its joint predictive and
  a Cholesky factor of the covariance (``MultivariateNormal`` refuses it as it stands: J Σ Jᵀ has
  rank <= P, singular when B·C > P; jitter from 1e-6 x its mean diagonal, x10 until it factors). laplace-torch's
  own ``functional_samples(x, n_samples=100)`` is timed too, but it draws every input
  independently from its own ``(C, C)`` covariance (not joint), so it is listed as its own task.

The agreement check compares the joint covariances of the two libraries (full over all weights).
The GP / ELLA comparison (``FunctionalLaplace``, ELLA) is ``benchmarks/bench_gp.py``.

    .bench-venv/bin/python benchmarks/bench_function_space.py [--reps 5] [--quick] [--no-memory]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from _harness import OURS, Case, main
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper

#: (laplace-torch subset, laplace-torch structure, laplace_ggn subset, laplace_ggn structure)
STRUCTURES = [
    ("all", "full", "all", "full"),
    ("all", "kron", "all", "kfac"),
    ("all", "diag", "all", "diag"),
    ("last_layer", "full", "last_layer", "full"),
]
PRIOR, SIGMA, N_SAMPLES = 1.0, 0.1, 100


def problem(quick: bool, seed: int = 0):
    """The trained regression MLP, its training loader and the test inputs."""
    g = torch.Generator().manual_seed(seed)
    n, b = (200, 100) if quick else (500, 500)
    X = torch.rand(n, 6, generator=g)
    w = torch.randn(6, 2, generator=g)
    y = torch.sin(3 * X @ w) + SIGMA * torch.randn(n, 2, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50 if quick else 300):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    model.eval()
    loader = DataLoader(TensorDataset(X, y), batch_size=100)
    return model, loader, torch.rand(b, 6, generator=g)


def lt_fit(model, loader, subset, structure):
    from laplace import Laplace

    la = Laplace(model, "regression", subset_of_weights=subset, hessian_structure=structure,
                 prior_precision=PRIOR, sigma_noise=SIGMA)  # fmt: skip
    la.fit(loader, progress_bar=False)
    return la


def ours_fit(model, loader, subset, structure):
    la = LaplaceWrapper(model, "regression", structure=structure, subset=subset,
                        prior_precision=PRIOR, sigma_noise=SIGMA)  # fmt: skip
    return la.fit(loader)


def lt_joint_samples(la, x, n: int):
    """laplace-torch's joint predictive, then a Cholesky draw (jitter 1e-6·mean diag, ×10 until PD)."""
    mean, cov = la(x, pred_type="glm", joint=True)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    jitter = 1e-6 * cov.diagonal().mean()
    while True:  # J Σ Jᵀ has rank <= P: singular when B·C > P, so it needs its jitter
        L, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) == 0:
            return mean + torch.randn(n, cov.shape[0], dtype=cov.dtype) @ L.T
        jitter = jitter * 10


def build(args) -> list[Case]:
    model, loader, x = problem(args.quick, args.seed)
    cases: list[Case] = []
    for lt_sub, lt_s, sub, s in STRUCTURES:
        name = f"{s}" + (" last layer" if sub == "last_layer" else "")
        lt = f"laplace-torch ({lt_s}{', last layer' if lt_sub == 'last_layer' else ''})"

        def lt_setup(a=lt_sub, b=lt_s):
            return lt_fit(model, loader, a, b)

        def our_setup(a=sub, b=s):
            return ours_fit(model, loader, a, b)

        # ---- joint GLM predictive (regression): mean (B, C), covariance (B·C, B·C)
        cases.append(
            Case(
                f"joint predictive {name}",
                lt,
                lambda la: la(x, pred_type="glm", joint=True),
                setup=lt_setup,
            )
        )
        cases.append(
            Case(
                f"joint predictive {name}",
                "laplace_ggn",
                lambda la: la.predict(x, joint=True),
                setup=our_setup,
                role=OURS,
            )
        )
        # ---- jointly consistent function samples
        cases.append(
            Case(
                f"joint samples n={N_SAMPLES} {name}",
                f"{lt}: joint + Cholesky",
                lambda la: lt_joint_samples(la, x, N_SAMPLES),
                setup=lt_setup,
            )
        )
        cases.append(
            Case(
                f"joint samples n={N_SAMPLES} {name}",
                "laplace_ggn",
                lambda la: la.functional_samples(x, N_SAMPLES),
                setup=our_setup,
                role=OURS,
            )
        )
        # ---- laplace-torch's per-input (not joint) samples, for reference
        cases.append(
            Case(
                f"per-input samples n={N_SAMPLES} {name}",
                lt,
                lambda la: la.functional_samples(x, n_samples=N_SAMPLES),
                setup=lt_setup,
            )
        )
    return cases


def check(args) -> str:
    """Largest relative difference of the joint covariances (full over all weights).

    laplace-torch's ``la(x, joint=True)`` returns the functional covariance J Σ Jᵀ without σ²
    (ours: ``functional_covariance(x, joint=True)``; ``predict(x, joint=True)`` adds σ²).
    """
    model, loader, x = problem(True, args.seed)
    _, cov_t = lt_fit(model, loader, "all", "full")(x[:50], pred_type="glm", joint=True)
    ours = ours_fit(model, loader, "all", "full").functional_covariance(x[:50], joint=True)
    diff = float((ours.reshape(cov_t.shape) - cov_t).abs().max() / cov_t.abs().max())
    return (
        "agreement (full, 50 inputs, the --quick model, float32): max |Δ J Σ Jᵀ| / max = "
        f"{diff:.2e}"
    )


if __name__ == "__main__":
    main(
        "Function space: joint GLM predictive and joint samples, regression MLP 6-64-64-2",
        build,
        script=os.path.abspath(__file__),
        check=check,
    )
