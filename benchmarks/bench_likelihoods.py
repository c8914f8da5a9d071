"""Likelihoods beyond three: heteroscedastic regression, one σ per output, from_nll's cost.

1. Heteroscedastic synthetic set: ``y = x + (0.1 + 0.5|x|) ε``, x ~ U[-2, 2], N = 500
   training and 3,000 test points.  An MLP 1-32-32-2 (mean, log-variance) trained with the
   Gaussian NLL against an MLP 1-32-32-1 trained with the squared error; both get a full
   Laplace posterior with the prior precision (and, homoscedastic, σ) tuned by the evidence,
   and each model's training weight decay is chosen from (1, 10, 100) by that tuned evidence
   (training data only).  Reported: test NLL per point (GLM predictive), the NLL of the true
   noise model and of the best constant-σ model, and the 90 % interval coverage in each third
   of the input range.
2. Diabetes (scikit-learn, 442 points, 10 features, standardised): the same procedure with
   MLPs 10-32-32-2 / 10-32-32-1 over 5 random 80/20 splits; test NLL in standardised units.
3. One σ per output: linear regression with 3 outputs and noise (0.1, 0.5, 1.0), N = 300, the
   evidence tuning every σ (full and kfac), over 5 seeds.
4. ``from_nll`` against the built-in categorical likelihood: fit time of a full and a diag
   posterior on an MLP 20-50-10 (P = 1,560, N = 2,000), median of 5, and the largest
   difference of the curvature.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_likelihoods.py [--quick]
[--only synthetic,diabetes,sigma,cost] [--structure full]`` (about 30 min on a quiet CPU).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper
from laplace_ggn.likelihoods import from_nll

DT = torch.float64
Z90 = 1.6448536269514722


def _mlp(d_in: int, d_out: int, width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, d_out),
    ).to(DT)  # fmt: skip


def _train(model, X, y, loss_fn, steps: int, weight_decay: float) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    N = X.shape[0]
    for _ in range(steps):
        opt.zero_grad()
        reg = sum((p**2).sum() for p in model.parameters())
        loss = loss_fn(model(X), y) + 0.5 * weight_decay * reg / N
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _hetero_loss(out, y):
    D = out.shape[1] // 2
    mu, s = out[:, :D], out[:, D:]
    return (0.5 * (math.log(2 * math.pi) + s + (y - mu) ** 2 * torch.exp(-s))).sum(-1).mean()


def _gauss_nll(mean, var, y):
    return 0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)


WEIGHT_DECAYS = (1.0, 10.0, 100.0)


def _select(make, loss_fn, lik, X, y, *, steps: int, seed: int, structure: str, **kw):
    """Train with each weight decay, keep the fit of the highest tuned evidence.

    The weight decay (the prior precision of training) is chosen on the training data
    alone, by the Laplace evidence after tuning the prior precision (and σ).

    Returns:
        ``(wrapper, weight decay)``.
    """
    loader = DataLoader(TensorDataset(X, y), batch_size=500)
    best = None
    for wd in WEIGHT_DECAYS:
        torch.manual_seed(seed)
        model = _train(make(), X, y, loss_fn, steps, weight_decay=wd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = LaplaceWrapper(model, lik, structure=structure, prior_precision=wd, **kw)
            la.fit(loader).optimize_prior_precision(
                n_steps=200, **({"tune_sigma_noise": True} if lik == "regression" else {})
            )
        evidence = float(la.log_marginal_likelihood())
        if best is None or evidence > best[0]:
            best = (evidence, la, wd)
    return best[1], best[2]


def _fit_pair(X, y, Xt, yt, *, steps: int, seed: int, structure: str):
    """Heteroscedastic and homoscedastic Laplace fits, each with its weight decay by evidence."""
    D = y.shape[1]

    def het():
        m = _mlp(X.shape[1], 2 * D)
        with torch.no_grad():
            m[-1].bias[D:] = torch.log(y.var(0))
        return m

    def hom_loss(out, t):
        return 0.5 * ((out - t) ** 2).sum(-1).mean()

    la_het, wd_het = _select(
        het, _hetero_loss, "heteroscedastic", X, y, steps=steps, seed=seed, structure=structure
    )
    la_hom, wd_hom = _select(
        lambda: _mlp(X.shape[1], D), hom_loss, "regression", X, y,
        steps=steps, seed=seed, structure=structure, sigma_noise=float(y.std()),
    )  # fmt: skip
    p_het, p_hom = la_het.predict(Xt), la_hom.predict(Xt)
    with torch.no_grad():
        f = la_het.model(Xt)
    map_het = _gauss_nll(f[:, :D], torch.exp(f[:, D:]), yt).sum(-1)
    return {
        "het": _gauss_nll(p_het.mean, p_het.variance, yt).sum(-1),
        "hom": _gauss_nll(p_hom.mean, p_hom.variance, yt).sum(-1),
        "map_het": map_het,
        "p_het": p_het,
        "p_hom": p_hom,
        "sigma_hom": float(la_hom.sigma_noise),
        "wd": (wd_het, wd_hom),
    }


def heteroscedastic_synthetic(seeds: int, steps: int, n_test: int, structure: str) -> None:
    print(
        f"\n## 1. Heteroscedastic synthetic set (N = 500, test {n_test}, structure={structure})\n"
    )
    rows, cover = [], []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(100 + seed)
        X = 4 * torch.rand(500, 1, generator=g, dtype=DT) - 2
        Xt = torch.linspace(-2, 2, n_test, dtype=DT).unsqueeze(1)
        noise = lambda x: 0.1 + 0.5 * x.abs()  # noqa: E731
        y = X + noise(X) * torch.randn(500, 1, generator=g, dtype=DT)
        yt = Xt + noise(Xt) * torch.randn(n_test, 1, generator=g, dtype=DT)
        r = _fit_pair(X, y, Xt, yt, steps=steps, seed=seed, structure=structure)
        true = _gauss_nll(Xt, noise(Xt) ** 2, yt)[:, 0]
        const = _gauss_nll(Xt, (noise(Xt) ** 2).mean(), yt)[:, 0]
        rows.append(
            [float(t.mean()) for t in (r["het"], r["hom"], r["map_het"], true, const)]
            + [r["sigma_hom"], r["wd"]]
        )
        thirds = []
        for lo, hi in ((-2, -2 / 3), (-2 / 3, 2 / 3), (2 / 3, 2.01)):
            m = (Xt[:, 0] >= lo) & (Xt[:, 0] < hi)
            row = []
            for p in (r["p_het"], r["p_hom"]):
                inside = (yt[m] - p.mean[m]).abs() <= Z90 * p.variance[m].sqrt()
                row.append(float(inside.double().mean()))
            thirds.append(row)
        cover.append(thirds)
    print(
        "| seed | NLL het. Laplace | NLL hom. Laplace | gain | NLL het. MAP | NLL true model |"
        " NLL best constant σ | tuned σ (hom.) | weight decay het. / hom. |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, r in enumerate(rows):
        print(
            f"| {seed} | {r[0]:.3f} | {r[1]:.3f} | {r[1] - r[0]:.3f} | {r[2]:.3f} | "
            f"{r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6][0]:g} / {r[6][1]:g} |"
        )
    gains = [r[1] - r[0] for r in rows]
    print(
        f"\nmedian gain of the heteroscedastic Laplace: {statistics.median(gains):.3f} nats "
        f"(min {min(gains):.3f}); true model over best constant σ: "
        f"{statistics.median(r[4] - r[3] for r in rows):.3f}"
    )
    print("\n90 % interval coverage per third of [-2, 2] (heteroscedastic / homoscedastic):\n")
    print("| seed | [-2, -2/3) | [-2/3, 2/3) | [2/3, 2] |")
    print("|---|---|---|---|")
    for seed, thirds in enumerate(cover):
        print(f"| {seed} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in thirds) + " |")
    worst = max(abs(t[0] - 0.9) for thirds in cover for t in thirds)
    print(f"\nlargest |coverage - 0.9| of the heteroscedastic Laplace: {worst:.3f}")


def diabetes(splits: int, steps: int, structure: str) -> None:
    from sklearn.datasets import load_diabetes

    print(f"\n## 2. Diabetes ({splits} random 80/20 splits, standardised, structure={structure})\n")
    Xa, ya = load_diabetes(return_X_y=True)
    Xa, ya = torch.tensor(Xa, dtype=DT), torch.tensor(ya, dtype=DT).unsqueeze(1)
    print(
        "| split | NLL het. Laplace | NLL hom. Laplace | gain | NLL het. MAP | weight decay het. / hom. |"
    )
    print("|---|---|---|---|---|---|")
    gains = []
    for split in range(splits):
        g = torch.Generator().manual_seed(split)
        perm = torch.randperm(Xa.shape[0], generator=g)
        tr, te = perm[:354], perm[354:]
        mx, sx = Xa[tr].mean(0), Xa[tr].std(0)
        my, sy = ya[tr].mean(0), ya[tr].std(0)
        X, Xt = (Xa[tr] - mx) / sx, (Xa[te] - mx) / sx
        y, yt = (ya[tr] - my) / sy, (ya[te] - my) / sy
        r = _fit_pair(X, y, Xt, yt, steps=steps, seed=split, structure=structure)
        h, o, m = (float(r[k].mean()) for k in ("het", "hom", "map_het"))
        gains.append(o - h)
        wd = r["wd"]
        print(f"| {split} | {h:.3f} | {o:.3f} | {o - h:.3f} | {m:.3f} | {wd[0]:g} / {wd[1]:g} |")
    print(f"\nmedian gain: {statistics.median(gains):.3f} nats (standardised targets)")


def per_output_sigma(seeds: int) -> None:
    print("\n## 3. One σ per output: 3 outputs, noise (0.1, 0.5, 1.0), N = 300\n")
    noise = torch.tensor([0.1, 0.5, 1.0], dtype=DT)
    print("| seed | structure | tuned σ | largest relative error |")
    print("|---|---|---|---|")
    worst = 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(300, 4, generator=g, dtype=DT)
        W = torch.randn(3, 4, generator=g, dtype=DT)
        y = X @ W.T + torch.randn(300, 3, generator=g, dtype=DT) * noise
        model = nn.Linear(4, 3).to(DT)
        sol = torch.linalg.lstsq(torch.cat([X, torch.ones(300, 1, dtype=DT)], 1), y).solution
        with torch.no_grad():
            model.weight.copy_(sol[:4].T)
            model.bias.copy_(sol[4])
        for structure in ("full", "kfac"):
            la = LaplaceWrapper(
                model, "regression", structure=structure, sigma_noise=torch.ones(3, dtype=DT)
            ).fit(DataLoader(TensorDataset(X, y), batch_size=100))
            la.optimize_prior_precision(tune_sigma_noise=True, n_steps=200)
            rel = float(((la.sigma_noise - noise).abs() / noise).max())
            worst = max(worst, rel)
            s = ", ".join(f"{v:.3f}" for v in la.sigma_noise.tolist())
            print(f"| {seed} | {structure} | ({s}) | {rel:.3f} |")
    print(f"\nlargest relative error over every run: {worst:.3f}")


def from_nll_cost(repeats: int) -> None:
    print("\n## 4. from_nll against the built-in categorical (MLP 20-50-10, N = 2,000)\n")

    def ce(f, y):
        return -torch.log_softmax(f, -1).gather(1, y.reshape(-1, 1))[:, 0]

    lik = from_nll(ce, mean=lambda f: torch.softmax(f, -1))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 20, generator=g, dtype=DT)
    y = torch.randint(0, 10, (2000,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.Tanh(), nn.Linear(50, 10)).to(DT)
    loader = DataLoader(TensorDataset(X, y), batch_size=200)
    print("| structure | built-in (s) | from_nll (s) | ratio | max |ΔG| |")
    print("|---|---|---|---|---|")
    for structure in ("full", "diag"):
        times = {"classification": [], "from_nll": []}
        curv = {}
        for _ in range(repeats):
            for name, arg in (("classification", "classification"), ("from_nll", lik)):
                t0 = time.perf_counter()
                la = LaplaceWrapper(model, arg, structure=structure).fit(loader)
                times[name].append(time.perf_counter() - t0)
                post = la.posterior
                curv[name] = post.ggn if structure == "full" else post.ggn_diag
        a, b = (statistics.median(times[k]) for k in ("classification", "from_nll"))
        d = float((curv["classification"] - curv["from_nll"]).abs().max())
        print(f"| {structure} | {a:.3f} | {b:.3f} | {b / a:.2f} | {d:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps")
    parser.add_argument("--structure", default="full")
    parser.add_argument(
        "--only", default="synthetic,diabetes,sigma,cost", help="comma-separated sections"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    q, only = args.quick, set(args.only.split(","))
    if "synthetic" in only:
        heteroscedastic_synthetic(
            1 if q else 3, 500 if q else 2000, 1000 if q else 3000, args.structure
        )
    if "diabetes" in only:
        diabetes(1 if q else 5, 500 if q else 2000, args.structure)
    if "sigma" in only:
        per_output_sigma(1 if q else 5)
    if "cost" in only:
        from_nll_cost(1 if q else 5)


if __name__ == "__main__":
    main()
