r"""Calibrated without a validation split? Training with the evidence against a tuned baseline.

8×8 scikit-learn digits: 500 test images, 200 validation images (used by the baseline only),
1,097 training images, standardised with the training statistics; out-of-distribution
inputs are uniform noise over the pixel range. Two networks (float64):

- ``cnn``: conv 8 → pool → conv 16 → pool → linear 64 → 10 (P = 1,898);
- ``mlp``: ReLU MLP 64-32-32-32-10 (P = 4,522).

The baseline trains the network with Adam for each weight decay of a 5-point grid
(prior precision δ ∈ {0.01, 0.1, 1, 10, 100}, decay δ/N on the mean loss), keeps the one with
the best validation NLL and fits a temperature on the validation split ("MAP+T").
``laplace_ggn.marglik_training`` trains the same network once on the training split, learning
a per-tensor prior precision and the likelihood's temperature T from the training data
alone, and predicts with ``result.laplace.predict`` (GLM, probit link). The script prints
NLL, accuracy, ECE and the uniform-noise OOD AUROC of every row, and draws the training
curves (``marglik_digits_<arch>.png``).

Run:  python examples/marglik_training/digits.py --out OUT_DIR [--arch cnn|mlp] [--seed N]
      [--structure kfac] [--prior-structure layerwise] [--no-temperature] [--small]
(about a minute per network on a CPU; ``--small`` a few seconds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import calibration as cal
from laplace_ggn import marglik_training
from laplace_ggn.marglik import tune_predictive_temperature

DT = torch.float64
GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def load_digits(seed: int, *, images: bool = True, n_train: int | None = None) -> dict:
    """Standardised train / validation / test splits and uniform-noise OOD inputs."""
    from sklearn.datasets import load_digits as sk_digits

    X, y = sk_digits(return_X_y=True)
    raw = torch.as_tensor(X, dtype=DT)
    y = torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    p = torch.randperm(raw.shape[0], generator=g)
    test, val, train = p[:500], p[500:700], p[700:]
    if n_train is not None:
        train = train[:n_train]
    mean, std = raw[train].mean(0), raw[train].std(0).clamp_min(1.0)
    shape = (-1, 1, 8, 8) if images else (-1, 64)

    def norm(r: torch.Tensor) -> torch.Tensor:
        return ((r - mean) / std).reshape(shape)

    ood = torch.rand(500, 64, generator=g, dtype=DT) * 16
    return {
        "x_train": norm(raw[train]), "y_train": y[train], "x_val": norm(raw[val]),
        "y_val": y[val], "x_test": norm(raw[test]), "y_test": y[test], "x_ood": norm(ood),
    }  # fmt: skip


def make_model(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "cnn":
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
    else:
        net = nn.Sequential(
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
            nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10),
        )  # fmt: skip
    return net.to(DT)


SETTINGS = {"cnn": {"epochs": 60, "lr": 1e-2}, "mlp": {"epochs": 100, "lr": 1e-3}}


def _loader(x, y, seed: int, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle, generator=g)


def train_map(arch: str, data: dict, seed: int, prior_precision: float, epochs: int) -> nn.Module:
    """Adam on mean cross-entropy + weight decay δ/N (the MAP under N(0, δ⁻¹ I))."""
    model = make_model(arch, seed)
    opt = torch.optim.Adam(model.parameters(), lr=SETTINGS[arch]["lr"])
    n = data["x_train"].shape[0]
    for _ in range(epochs):
        for x, y in _loader(data["x_train"], data["y_train"], seed):
            loss = nn.functional.cross_entropy(model(x), y)
            loss = loss + 0.5 * prior_precision / n * sum((p**2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def scores(p_test: torch.Tensor, p_ood: torch.Tensor, y: torch.Tensor) -> dict:
    m = cal.classification_metrics(p_test, y)
    from sklearn.metrics import roc_auc_score

    conf = torch.cat([p_test.max(-1).values, p_ood.max(-1).values])
    truth = torch.cat([torch.ones(p_test.shape[0]), torch.zeros(p_ood.shape[0])])
    return {
        "nll": float(m["nll"]), "accuracy": float(m["accuracy"]), "ece": float(m["ece"]),
        "auroc": float(roc_auc_score(truth.numpy(), conf.numpy())),
    }  # fmt: skip


def baseline(arch: str, data: dict, seed: int, epochs: int, grid=GRID) -> dict:
    """Best weight decay of the grid on validation NLL, then a temperature on validation."""
    best = None
    for prec in grid:
        model = train_map(arch, data, seed, prec, epochs)
        with torch.no_grad():
            val = float(nn.functional.cross_entropy(model(data["x_val"]), data["y_val"]))
        if best is None or val < best[0]:
            best = (val, prec, model)
    _, prec, model = best
    with torch.no_grad():
        logits = {k: model(data[f"x_{k}"]) for k in ("val", "test", "ood")}
    # plain temperature scaling (the validation NLL alone), the usual baseline
    T = tune_predictive_temperature(logits["val"].softmax(-1), data["y_val"], regularize=False)
    T = float(T.temperature)
    row = scores((logits["test"] / T).softmax(-1), (logits["ood"] / T).softmax(-1), data["y_test"])
    return {**row, "weight_decay_prior": prec, "T": T}


def train_marglik(arch: str, data: dict, seed: int, *, epochs: int, structure: str, prior: str,
                  temperature: bool, progress: bool = False, small: bool = False) -> dict:  # fmt: skip
    model = make_model(arch, seed)
    kw = {"curvature": "mc"} if structure in ("kfac", "diag") else {}
    start = time.perf_counter()
    res = marglik_training(
        model, _loader(data["x_train"], data["y_train"], seed), "classification",
        structure=structure, prior_structure=prior, n_epochs=epochs,
        optimizer_kwargs={"lr": SETTINGS[arch]["lr"]}, n_epochs_burnin=1 if small else 10,
        marglik_frequency=2 if small else 5, n_hypersteps=5 if small else 50,
        tune_temperature=temperature, progress=progress,
        generator=torch.Generator().manual_seed(seed), **kw,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    la, T = res.laplace, res.temperature
    glm = scores(la.predict(data["x_test"]).mean, la.predict(data["x_ood"]).mean, data["y_test"])
    with torch.no_grad():
        net = scores(
            (model(data["x_test"]) / T).softmax(-1), (model(data["x_ood"]) / T).softmax(-1),
            data["y_test"],
        )  # fmt: skip
    return {"glm": glm, "network": net, "T": T, "seconds": seconds, "result": res}


def plot(res, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = res.history
    epochs = torch.arange(1, h.loss.shape[0] + 1)
    marg = torch.tensor(h.marglik_epochs, dtype=torch.long) - 1
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    ax[0].plot(epochs, h.loss)
    ax[0].set_title("training loss per observation")
    ax[1].plot(marg + 1, h.log_evidence[marg], "o-")
    ax[1].set_title("log evidence")
    prec = h.prior_precision.reshape(h.loss.shape[0], -1)
    for k in range(prec.shape[1]):
        ax[2].semilogy(epochs, prec[:, k], lw=1)
    ax[2].semilogy(epochs, h.temperature, "k--", lw=2, label="T")
    ax[2].set_title("prior precision per tensor; T (dashed)")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--arch", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structure", default="kfac")
    parser.add_argument("--prior-structure", default="layerwise")
    parser.add_argument("--no-temperature", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--small", action="store_true", help="150 images, 4 epochs, 2 decays")
    args = parser.parse_args(argv)
    data = load_digits(args.seed, images=args.arch == "cnn", n_train=150 if args.small else None)
    epochs = 4 if args.small else SETTINGS[args.arch]["epochs"]
    rows = {}
    if not args.no_baseline:
        grid = (0.1, 10.0) if args.small else GRID
        rows["MAP (best decay) + T"] = baseline(args.arch, data, args.seed, epochs, grid)
    ml = train_marglik(
        args.arch, data, args.seed, epochs=epochs, structure=args.structure,
        prior=args.prior_structure, temperature=not args.no_temperature, small=args.small,
    )  # fmt: skip
    rows["marglik: network softmax(f/T)"] = ml["network"]
    rows[f"marglik: Laplace GLM probit ({args.structure})"] = ml["glm"]
    print(
        f"{args.arch}, seed {args.seed}: learned T = {ml['T']:.3g}, training {ml['seconds']:.1f} s"
    )
    print(f"{'':42} {'NLL':>7} {'acc':>7} {'ECE':>7} {'AUROC':>7}")
    for name, r in rows.items():
        print(
            f"{name:42} {r['nll']:>7.4f} {r['accuracy']:>7.4f} {r['ece']:>7.4f} {r['auroc']:>7.4f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(ml["result"], args.out / f"marglik_digits_{args.arch}.png")
    return {"rows": rows, "T": ml["T"], "seconds": ml["seconds"], "figure": str(figure)}


if __name__ == "__main__":
    main()
