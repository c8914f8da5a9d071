"""A likelihood written by a user: Student-t regression in about twenty lines.

Data with outliers (10 % of the targets shifted by ±3): an MLP trained with the Student-t
negative log likelihood ignores them where a squared error would bend towards them.  The
likelihood is only its per-sample NLL (and, for ``curvature="mc"``, a sampler);
``laplace_ggn.likelihoods.from_nll`` derives the output curvature by ``torch.func`` (the
Hessian of the NLL in the outputs, clamped to positive semi-definite: the Student-t Hessian
is negative at the outliers, which the clamp drops instead of letting them shrink the
posterior's precision).  The Laplace posterior, its evidence-tuned prior and its predictive
then come as for any built-in likelihood; the predictive variance is the epistemic one
(``from_nll`` knows the NLL, not the noise), so the example adds the Student-t variance
``s² ν/(ν - 2)`` for intervals.

Run: ``python examples/custom_likelihood/main.py [--small]``
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.likelihoods import from_nll

NU, SCALE = 4.0, 0.1  # the user's choice of degrees of freedom and scale


# ---- the user's likelihood: ~20 lines --------------------------------------------------------
def student_t_nll(f, y):
    """-log Student-t(y; f, SCALE, NU) of each row: outputs (n, 1), targets (n, 1)."""
    r = (y.reshape(f.shape) - f) / SCALE
    const = math.lgamma(NU / 2) - math.lgamma((NU + 1) / 2) + 0.5 * math.log(NU * math.pi)
    return (0.5 * (NU + 1) * torch.log1p(r * r / NU) + math.log(SCALE) + const).sum(-1)


def student_t_sample(f, generator):
    """Targets drawn from the model: f + SCALE · t_NU (a normal over a chi-square)."""
    z = torch.randn(f.shape, dtype=f.dtype, generator=generator)
    chi2 = 2 * torch._standard_gamma(torch.full(f.shape, NU / 2, dtype=f.dtype))
    return f + SCALE * z / torch.sqrt(chi2 / NU)


student_t = from_nll(student_t_nll, sample=student_t_sample, name="student_t")
# -----------------------------------------------------------------------------------------------


def _data(n: int, g: torch.Generator):
    x = 6 * torch.rand(n, 1, generator=g, dtype=torch.float64) - 3
    y = torch.sin(x) + SCALE * torch.randn(n, 1, generator=g, dtype=torch.float64)
    outlier = torch.rand(n, 1, generator=g, dtype=torch.float64) < 0.1
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return x, torch.where(outlier, y + 3 * sign, y)


def _train(loss_fn, x, y, steps: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    """Fit Student-t and Gaussian Laplace posteriors; print and return their test figures.

    Returns:
        ``{"student_t": {...}, "gaussian": {...}}`` with the test RMSE against the clean
        function, the NLL under the Student-t noise model and the 90 % coverage of clean
        targets.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="fewer points and steps (tests)")
    args = parser.parse_args(argv)
    n, steps, width = (80, 200, 16) if args.small else (400, 2000, 32)
    g = torch.Generator().manual_seed(0)
    x, y = _data(n, g)
    xt = torch.linspace(-3, 3, 200, dtype=torch.float64).unsqueeze(1)
    yt = torch.sin(xt) + SCALE * torch.randn(200, 1, generator=g, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    report = {}
    for name, lik, loss in (
        ("student_t", student_t, lambda f, y: student_t_nll(f, y).mean()),
        ("gaussian", "regression", nn.MSELoss()),
    ):
        model = _train(loss, x, y, steps, width)
        la = LaplaceWrapper(model, lik, structure="full").fit(loader)
        la.optimize_prior_precision(tune_sigma_noise=lik == "regression")
        pred = la.predict(xt)
        noise = SCALE**2 * NU / (NU - 2) if name == "student_t" else 0.0
        var = pred.variance + noise  # the Gaussian's variance already holds σ²
        inside = (yt - pred.mean).abs() <= 1.645 * var.sqrt()
        report[name] = {
            "rmse_clean": float((pred.mean - torch.sin(xt)).pow(2).mean().sqrt()),
            "coverage_90": float(inside.double().mean()),
            "prior_precision": float(la.prior_precision),
            "log_evidence": float(la.log_marginal_likelihood()),
        }
    print("| likelihood | RMSE to sin(x) | 90 % coverage (clean test targets) | prior precision |")
    print("|---|---|---|---|")
    for name, r in report.items():
        print(
            f"| {name} | {r['rmse_clean']:.3f} | {r['coverage_90']:.3f} | {r['prior_precision']:.3g} |"
        )
    print(f"\n{student_t!r}")
    return report


if __name__ == "__main__":
    main()
