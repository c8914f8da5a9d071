r"""Continual learning on permuted digits: the Laplace penalty against forgetting.

Three tasks share the 8×8 scikit-learn digits and their labels; task t shows the pixels in a
fixed random order (task 1: the original order). A ReLU MLP 64-100-100-10 (P = 17,610)
learns them one after the other, and is scored after the last task on the test images of
every task:

- **fine-tuning**: each task trained on its own, starting from the previous weights;
- **Laplace** (online, Ritter et al. 2018): after task t the posterior is updated at the new
  weights, ``la.fit(loader_t, accumulate=True)`` (the curvature of every task seen so far, with
  the prior precision the evidence chose after task 1), and task t+1 is trained on
  mean NLL − ``la.log_prob(θ)`` / N;
- **joint**: one network trained on the three tasks at once (the upper reference).

The script prints the accuracy on each task after the last one and the mean, per structure
of the posterior (``diag``, ``kfac``, top-k ``lowrank``; ``full`` needs P² = 1.2 GB, over the
default memory budget), and draws the accuracies (``continual_permuted_digits.png``).

Run:  python examples/continual/permuted_digits.py --out OUT_DIR [--seed N] [--small]
      [--structures diag kfac lowrank]
(a few minutes on a CPU; ``--small`` a few seconds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper

N_TASKS = 3


def make_tasks(seed: int, n_tasks: int = N_TASKS, n_train: int | None = None) -> list[dict]:
    """Standardised digits, one fixed pixel permutation per task (the first is the identity)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    p = torch.randperm(X.shape[0], generator=g)
    test, train = p[:500], p[500:]
    if n_train is not None:
        train = train[:n_train]
    mean, std = X[train].mean(0), X[train].std(0).clamp_min(1.0)
    X = (X - mean) / std
    tasks = []
    for t in range(n_tasks):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=g)
        tasks.append(
            {
                "x_train": X[train][:, perm],
                "y_train": y[train],
                "x_test": X[test][:, perm],
                "y_test": y[test],
            }
        )
    return tasks


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def loader(x, y, seed: int, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle, generator=g)


def train(model: nn.Module, x, y, *, epochs: int, seed: int, penalty=None) -> nn.Module:
    """Adam on mean cross-entropy (+ ``penalty(θ)`` / N, the negative log prior of the task)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = x.shape[0]
    for _ in range(epochs):
        for xb, yb in loader(x, y, seed):
            loss = nn.functional.cross_entropy(model(xb), yb)
            if penalty is not None:
                theta = torch.cat([p.reshape(-1) for p in model.parameters()])
                loss = loss + penalty(theta) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracies(model: nn.Module, tasks: list[dict]) -> list[float]:
    return [float((model(t["x_test"]).argmax(-1) == t["y_test"]).float().mean()) for t in tasks]


def fine_tuning(tasks, seed: int, epochs: int) -> list[float]:
    model = mlp(seed)
    for t in tasks:
        train(model, t["x_train"], t["y_train"], epochs=epochs, seed=seed)
    return accuracies(model, tasks)


def joint(tasks, seed: int, epochs: int) -> list[float]:
    model = mlp(seed)
    x = torch.cat([t["x_train"] for t in tasks])
    y = torch.cat([t["y_train"] for t in tasks])
    train(model, x, y, epochs=epochs, seed=seed)
    return accuracies(model, tasks)


def laplace(
    tasks, seed: int, epochs: int, structure: str, rank: int | None = None, **options
) -> list[float]:
    """Online Laplace: the posterior of tasks 1..t (summed curvature) as the prior of task t+1.

    ``structure`` may name the curvature too, e.g. ``"kfac:ggn"`` (default ``mc`` for kfac and
    diag); ``options`` go to the ``LaplaceWrapper`` (e.g. ``memory_budget`` for ``full``).
    """
    model = mlp(seed)
    structure, _, curvature = structure.partition(":")
    if structure == "lowrank":
        options["rank"] = rank
    if structure in ("kfac", "diag"):
        options["curvature"] = curvature or "mc"
    gen = torch.Generator().manual_seed(seed)
    la = None
    for t in tasks:
        penalty = None if la is None else (lambda theta, la=la: -la.log_prob(theta))
        train(model, t["x_train"], t["y_train"], epochs=epochs, seed=seed, penalty=penalty)
        data = loader(t["x_train"], t["y_train"], seed, shuffle=False)
        if la is None:
            la = LaplaceWrapper(model, "classification", structure=structure, **options)
            la.fit(data, generator=gen, progress=False).optimize_prior_precision("marglik")
        else:
            la.fit(data, accumulate=True, generator=gen, progress=False)
    return accuracies(model, tasks)


def plot(results: dict[str, list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(results)
    for i, (name, accs) in enumerate(results.items()):
        xs = [t + i * width for t in range(len(accs))]
        ax.bar(xs, accs, width, label=f"{name} (mean {sum(accs) / len(accs):.3f})")
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(next(iter(results.values()))))])
    ax.set_xticklabels([f"task {t + 1}" for t in range(len(next(iter(results.values()))))])
    ax.set_ylabel("test accuracy after the last task")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--structures", nargs="+", default=["diag", "kfac", "lowrank"])
    parser.add_argument("--rank", type=int, default=100, help="k of the top-k lowrank structure")
    parser.add_argument("--small", action="store_true", help="200 images per task, 3 epochs")
    args = parser.parse_args(argv)
    tasks = make_tasks(args.seed, n_train=200 if args.small else None)
    epochs = 3 if args.small else args.epochs
    rank = min(args.rank, 20) if args.small else args.rank
    results, seconds = {}, {}
    for name, run in (
        [("fine-tuning", lambda: fine_tuning(tasks, args.seed, epochs))]
        + [
            (f"Laplace ({s})", lambda s=s: laplace(tasks, args.seed, epochs, s, rank))
            for s in args.structures
        ]
        + [("joint", lambda: joint(tasks, args.seed, epochs))]
    ):
        start = time.perf_counter()
        results[name] = run()
        seconds[name] = time.perf_counter() - start
    print(
        f"{'':18}"
        + "".join(f"{'task ' + str(t + 1):>8}" for t in range(len(tasks)))
        + f"{'mean':>8}{'s':>7}"
    )
    for name, accs in results.items():
        mean = sum(accs) / len(accs)
        print(
            f"{name:18}"
            + "".join(f"{a:>8.3f}" for a in accs)
            + f"{mean:>8.3f}{seconds[name]:>7.1f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(results, args.out / "continual_permuted_digits.png")
    means = {k: sum(v) / len(v) for k, v in results.items()}
    return {"accuracies": results, "means": means, "seconds": seconds, "figure": str(figure)}


if __name__ == "__main__":
    main()
