"""Draw one figure of each display of ``laplace_ggn.plots`` on small, realistic data.

Classification: a small MLP trained on scikit-learn's bundled digits until it is
over-confident, against the same network after temperature scaling on a validation split.
Regression: Bayesian linear regression on RBF features (exact Gaussian posterior) with a
gap in the data. Spectrum: the exact GGN of the digits MLP.

Usage::

    python examples/plots_gallery.py --out DIR
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from laplace_ggn import calibration as cal  # noqa: E402
from laplace_ggn.plots import (  # noqa: E402
    ConfidenceHistogramDisplay,
    RegressionCalibrationDisplay,
    ReliabilityDisplay,
    SpectrumDisplay,
    UncertaintyBandDisplay,
)


def digits_split(generator: torch.Generator):
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=generator)
    tr, va, te = perm[:200], perm[200:700], perm[700:]
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def train_mlp(x, y, generator: torch.Generator, epochs: int = 500) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def corrupt(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Out-of-distribution digits: rotated by 90 degrees, with pixel noise.
    img = x.reshape(-1, 8, 8).transpose(1, 2).flip(2)
    noisy = img + 0.25 * torch.randn(img.shape, generator=generator)
    return noisy.clamp(0, 1).reshape(-1, 64)


def last_layer_ggn_spectrum(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Eigenvalues of the exact GGN restricted to the last layer's weight and bias.
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    last = [k for k in params if k.startswith("2.")]
    xd = x.double()

    def f(sub):
        return torch.func.functional_call(model, {**params, **sub}, (xd,))

    sub = {k: params[k] for k in last}
    jac = torch.func.jacrev(f)(sub)
    J = torch.cat([j.reshape(xd.shape[0], 10, -1) for j in jac.values()], dim=2)  # (N, C, P)
    p = f(sub).softmax(dim=1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    G = torch.einsum("ncp,ncd,ndq->pq", J, H, J)
    return torch.linalg.eigvalsh(G)


def rbf_features(x: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)


def blr_predict(x_tr, y_tr, x, sigma: float, alpha: float = 1.0):
    # Exact posterior predictive of Bayesian linear regression on RBF features.
    centres = torch.linspace(-4, 4, 25, dtype=torch.float64)
    phi_tr, phi = rbf_features(x_tr, centres, 0.6), rbf_features(x, centres, 0.6)
    precision = phi_tr.T @ phi_tr / sigma**2 + alpha * torch.eye(len(centres), dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    w = cov @ phi_tr.T @ y_tr / sigma**2
    mean = phi @ w
    var = torch.einsum("np,pq,nq->n", phi, cov, phi) + sigma**2
    return mean, var


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    (xtr, ytr), (xva, yva), (xte, yte) = digits_split(g)
    model = train_mlp(xtr, ytr, g)
    with torch.no_grad():
        logits_va, logits_te = model(xva), model(xte)
        logits_ood = model(corrupt(xte, g))
    t = fit_temperature(logits_va, yva)
    probs = {"MAP": logits_te.softmax(1), "Temperature-scaled": (logits_te / t).softmax(1)}
    for name, p in probs.items():
        m = cal.classification_metrics(p, yte)
        print(f"{name:32s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    d = ReliabilityDisplay.from_predictions(
        probs, yte, n_bins=15, title=f"Digits MLP: MAP vs temperature T = {t:.2f}"
    )
    d.figure_.savefig(out / "reliability.png", dpi=100, bbox_inches="tight")

    d = ConfidenceHistogramDisplay.from_predictions(
        {"in-distribution": logits_te.softmax(1), "rotated + noise (OOD)": logits_ood.softmax(1)},
        n_bins=20,
        log=True,
        title="Digits MLP (MAP): confidence in and out of distribution",
    )
    d.figure_.savefig(out / "confidence_histogram.png", dpi=100, bbox_inches="tight")

    ev = last_layer_ggn_spectrum(model, xtr)
    lam_max = float(ev.max())
    grid = torch.linspace(0, lam_max * 1.05, 400, dtype=torch.float64)
    width = lam_max / 40
    density = torch.exp(-0.5 * ((grid[:, None] - ev[None, :]) / width) ** 2).sum(1)
    density = density / (len(ev) * width * math.sqrt(2 * math.pi))
    d = SpectrumDisplay.from_spectrum(
        eigenvalues=ev, grid=grid, density=density, title="Last-layer GGN of the digits MLP"
    )
    d.figure_.savefig(out / "spectrum.png", dpi=100, bbox_inches="tight")

    rg = torch.Generator().manual_seed(1)
    x_tr = torch.cat(
        [
            torch.rand(40, generator=rg, dtype=torch.float64) * 2.5 - 3.5,
            torch.rand(40, generator=rg, dtype=torch.float64) * 2.0 + 1.0,
        ]
    )
    noise = 0.3

    def target(x):
        return torch.sin(1.5 * x) + 0.3 * x

    y_tr = target(x_tr) + noise * torch.randn(x_tr.shape, generator=rg, dtype=torch.float64)
    x_te = torch.rand(300, generator=rg, dtype=torch.float64) * 7 - 3.5
    y_te = target(x_te) + noise * torch.randn(x_te.shape, generator=rg, dtype=torch.float64)
    x_grid = torch.linspace(-4, 4, 300, dtype=torch.float64)
    mean, var = blr_predict(x_tr, y_tr, x_grid, sigma=noise)
    d = UncertaintyBandDisplay.from_predictions(
        x_grid,
        mean,
        var,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te[:60],
        y_test=y_te[:60],
        title="Bayesian RBF regression: a gap in the data widens the band",
    )
    d.figure_.savefig(out / "uncertainty_band.png", dpi=100, bbox_inches="tight")

    means, variances = {}, {}
    for label, sigma in (
        ("σ = 0.10 (too small)", 0.1),
        ("σ = 0.30 (true)", 0.3),
        ("σ = 0.60 (too large)", 0.6),
    ):
        means[label], variances[label] = blr_predict(x_tr, y_tr, x_te, sigma=sigma)
    d = RegressionCalibrationDisplay.from_predictions(
        means, variances, y_te, title="Coverage of central intervals"
    )
    d.figure_.savefig(out / "regression_calibration.png", dpi=100, bbox_inches="tight")
    print(f"wrote 5 figures to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gallery"), help="output folder")
    main(parser.parse_args().out)
