"""Data and networks of ``bench_calibration.py``: every case, its splits, shifts and OOD sets.

Each case returns a dict with the trained network (float64, eval mode), the train /
validation / test splits, the shifted test sets (same labels) and the out-of-distribution
inputs.  Everything is determined by the seed (split, initialisation, batch order, noise).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DT = torch.float64
CLASSIFICATION = ["digits_mlp", "digits_cnn", "deep_mlp", "wine", "iris", "breast_cancer",
                  "moons", "synthetic15"]  # fmt: skip
REGRESSION = ["diabetes", "gap"]
IMAGES = {"digits_mlp", "digits_cnn", "deep_mlp"}
N_EVAL = 300  # test points scored (and as many shifted / out-of-distribution inputs of each kind)


# ---------------------------------------------------------------------------- data helpers


def _split(n: int, sizes: tuple[float, float], gen: torch.Generator) -> tuple[Tensor, ...]:
    perm = torch.randperm(n, generator=gen)
    n_val, n_test = (max(1, round(s * n)) for s in sizes)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _standardise(X: Tensor, train: Tensor, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    return X[train].mean(0), X[train].std(0).clamp_min(floor)


def _rotate(img: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate each image ``(M, 1, H, W)`` by ±``degrees`` (random sign), bilinear."""
    sign = torch.randint(0, 2, (img.shape[0],), generator=gen).to(DT) * 2 - 1
    a = sign * math.radians(degrees)
    theta = torch.zeros(img.shape[0], 2, 3, dtype=DT)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = (
        a.cos(),
        -a.sin(),
        a.sin(),
        a.cos(),
    )
    grid = torch.nn.functional.affine_grid(theta, list(img.shape), align_corners=False)
    return torch.nn.functional.grid_sample(img, grid, align_corners=False)


def _sample_image_patches(n: int, gen: torch.Generator) -> Tensor:
    """8×8 grey patches of scikit-learn's two bundled photographs, on the 0-16 digits scale."""
    from sklearn.datasets import load_sample_images

    out = []
    for im in load_sample_images().images:
        g = torch.as_tensor(im, dtype=DT).mean(-1)  # (427, 640)
        g = torch.nn.functional.avg_pool2d(g[None, None], 4)[0, 0]  # (106, 160)
        r = torch.randint(0, g.shape[0] - 8, (n,), generator=gen)
        c = torch.randint(0, g.shape[1] - 8, (n,), generator=gen)
        out.append(torch.stack([g[i : i + 8, j : j + 8] for i, j in zip(r, c)]) / 255 * 16)
    return torch.cat(out)[torch.randperm(2 * n, generator=gen)[:n]].reshape(n, 64)


def _other_tabular(name: str, d: int, n: int, gen: torch.Generator) -> Tensor:
    """Standardised features of another scikit-learn data set, first ``d`` columns."""
    from sklearn.datasets import load_breast_cancer, load_digits

    X = torch.as_tensor((load_digits if name == "breast_cancer" else load_breast_cancer)().data)
    X = X.to(DT)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    X = X[:, :d] if X.shape[1] >= d else X.repeat(1, math.ceil(d / X.shape[1]))[:, :d]
    return X[torch.randperm(X.shape[0], generator=gen)[:n]]


# ---------------------------------------------------------------------------- networks


def mlp(d_in: int, widths: tuple[int, ...], d_out: int, act=nn.ReLU) -> nn.Module:
    layers, d = [], d_in
    for w in widths:
        layers += [nn.Linear(d, w), act()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, d_out)).to(DT)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    ).to(DT)  # fmt: skip


ARCH = {
    "digits_mlp": lambda d, c: mlp(d, (16, 16), c),
    "digits_cnn": lambda d, c: cnn(),
    "deep_mlp": lambda d, c: mlp(d, (32, 16, 16), c),
    "synthetic15": lambda d, c: mlp(d, (32, 32), c),
    "gap": lambda d, c: mlp(d, (32, 32), c, nn.Tanh),
}
# (prior precision α of the MAP, i.e. weight decay α/N; epochs; batch size; Adam lr)
TRAIN = {
    "digits_mlp": (5.0, 40, 128, 1e-2),
    "digits_cnn": (1.0, 60, 64, 1e-2),
    "deep_mlp": (0.0, 300, 128, 3e-3),
    "gap": (0.12, 2000, 10**9, 1e-2),
    "diabetes": (20.0, 300, 10**9, 1e-2),
}


def train(model: nn.Module, x: Tensor, y: Tensor, name: str, seed: int, regression: bool):
    alpha, epochs, bs, lr = TRAIN.get(name, (1.0, 300, 10**9, 1e-2))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=alpha / x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(bs):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    return model, final


# ---------------------------------------------------------------------------- cases


def _tabular(name: str, gen: torch.Generator):
    from sklearn import datasets

    if name == "moons":
        X, y = datasets.make_moons(
            600, noise=0.2, random_state=int(torch.randint(0, 10**6, (1,), generator=gen))
        )
    elif name == "synthetic15":
        X, y = datasets.make_classification(
            1500, n_features=20, n_informative=12, n_redundant=2, n_classes=15,
            n_clusters_per_class=1, class_sep=2.0,
            random_state=int(torch.randint(0, 10**6, (1,), generator=gen)),
        )  # fmt: skip
    else:
        X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return torch.as_tensor(X, dtype=DT), torch.as_tensor(y)


def classification_case(name: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name in IMAGES:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X, y = torch.as_tensor(X, dtype=DT), torch.as_tensor(y)
        train_i, val_i, test_i = _split(X.shape[0], (200 / 1797, 500 / 1797), gen)
        mean, std = _standardise(X, train_i, floor=1.0)
    else:
        X, y = _tabular(name, gen)
        train_i, val_i, test_i = _split(X.shape[0], (0.2, 0.2), gen)
        mean, std = _standardise(X, train_i)
    z = lambda a: (a - mean) / std  # noqa: E731
    test_i = test_i[:N_EVAL]
    x_tr, x_te = z(X[train_i]), z(X[test_i])
    C, d = int(y.max()) + 1, X.shape[1]
    sets = {"noise": x_te + torch.randn(x_te.shape, generator=gen, dtype=DT)}
    lo, hi = x_tr.min(0).values, x_tr.max(0).values
    n_ood = x_te.shape[0]
    ood = {"uniform": lo + (hi - lo) * torch.rand(n_ood, d, generator=gen, dtype=DT),
           "x10": 10 * x_te}  # fmt: skip
    if name in IMAGES:
        img = X[test_i].reshape(-1, 1, 8, 8)
        sets["rotation"] = z(_rotate(img, 40.0, gen).reshape(-1, 64))
        ood["other"] = z(_sample_image_patches(n_ood, gen))
    else:
        ood["other"] = _other_tabular(name, d, n_ood, gen)
    model = ARCH.get(name, lambda d, c: mlp(d, (32, 32), c))(d, C)
    model, loss = train(model, x_tr, y[train_i], name, seed, regression=False)
    return {
        "model": model, "train_loss": loss, "n_classes": C,
        "x_train": x_tr, "y_train": y[train_i], "x_val": z(X[val_i]), "y_val": y[val_i],
        "x_test": x_te, "y_test": y[test_i], "shift": sets, "ood": ood,
        "fresh": lambda: ARCH.get(name, lambda d, c: mlp(d, (32, 32), c))(d, C),
    }  # fmt: skip


def gap_data(seed: int, n: int = 120):
    """1-D: y = sin(3x) + N(0, 0.2²), x ∈ [-1, -0.25] ∪ [0.25, 1]; the gap and beyond ±1."""
    g = torch.Generator().manual_seed(seed)

    def inside(m):
        u = torch.rand(m, 1, generator=g, dtype=DT) * 1.5 - 0.75
        return torch.where(u < 0, u - 0.25, u + 0.25)

    def target(x):
        return torch.sin(3 * x) + 0.2 * torch.randn(x.shape, generator=g, dtype=DT)

    x, xv, xt = inside(n), inside(60), inside(400)
    x_gap = torch.rand(200, 1, generator=g, dtype=DT) * 0.5 - 0.25
    s = torch.rand(200, 1, generator=g, dtype=DT) * 0.5 + 1
    x_out = torch.where(torch.rand(200, 1, generator=g) < 0.5, s, -s)
    return {"x_train": x, "y_train": target(x), "x_val": xv, "y_val": target(xv),
            "x_test": xt, "y_test": target(xt), "out": {"gap": (x_gap, target(x_gap)),
            "beyond": (x_out, target(x_out))}}  # fmt: skip


def regression_case(name: str, seed: int) -> dict:
    torch.manual_seed(seed)
    if name == "gap":
        data = gap_data(seed)
    else:  # diabetes: the 15 % largest BMI are the out-of-range set
        from sklearn.datasets import load_diabetes

        X, y = load_diabetes(return_X_y=True)
        X, y = torch.as_tensor(X, dtype=DT), torch.as_tensor(y, dtype=DT)[:, None]
        gen = torch.Generator().manual_seed(seed)
        order = X[:, 2].argsort()
        cut = int(0.85 * X.shape[0])
        inside, outside = order[:cut], order[cut:]
        tr, va, te = (inside[i] for i in _split(inside.shape[0], (0.15, 0.2), gen))
        mean, std = _standardise(X, tr)
        ym, ys = y[tr].mean(), y[tr].std()
        z = lambda a: (a - mean) / std  # noqa: E731
        zy = lambda a: (a - ym) / ys  # noqa: E731
        data = {"x_train": z(X[tr]), "y_train": zy(y[tr]), "x_val": z(X[va]), "y_val": zy(y[va]),
                "x_test": z(X[te]), "y_test": zy(y[te]),
                "out": {"high BMI": (z(X[outside]), zy(y[outside]))}}  # fmt: skip
    d = data["x_train"].shape[1]
    model = ARCH.get(name, lambda d, c: mlp(d, (32,), c, nn.Tanh))(d, 1)
    model, loss = train(model, data["x_train"], data["y_train"], name, seed, regression=True)
    data.update(model=model, train_loss=loss)
    return data
