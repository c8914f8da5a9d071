"""Fit time of the full and diagonal structures and one GGN product on a ~26k-parameter MLP.

    python benchmarks/bench_foundation.py [--reps 3]

MLP 64-128-128-10 (P = 26,122), N = 1,000 random inputs, batch 100, float32, 2 threads.
Prints medians in seconds and the ratio to one training epoch (forward + backward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import GGNOperator, LaplaceWrapper


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    )
    X, y = torch.randn(1000, 64), torch.randint(0, 10, (1000,))
    loader = DataLoader(TensorDataset(X, y), batch_size=100)
    P = sum(p.numel() for p in model.parameters())

    def epoch() -> None:
        for xb, yb in loader:
            model.zero_grad()
            nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()

    G = GGNOperator(model, loader, likelihood="classification")
    v = torch.randn(P)
    budget = 4 * 2**30  # the dense P×P GGN needs 2.7 GB in float32
    rows = [
        ("epoch (forward + backward)", median_time(epoch, args.reps)),
        ("GGN matvec (GGNOperator @ v)", median_time(lambda: G @ v, args.reps)),
        (
            "fit diag",
            median_time(
                lambda: LaplaceWrapper(model, "classification", structure="diag").fit(loader),
                args.reps,
            ),
        ),
        (
            "fit full",
            median_time(
                lambda: LaplaceWrapper(
                    model, "classification", structure="full", memory_budget=budget
                ).fit(loader),
                max(1, args.reps // 3),
            ),
        ),
    ]
    floor = rows[0][1]
    print(f"MLP 64-128-128-10, P = {P:,}, N = 1,000, batch 100, float32, 2 threads")
    print(f"{'task':32s} {'median s':>10s} {'x epoch':>8s}")
    for name, t in rows:
        print(f"{name:32s} {t:10.4f} {t / floor:8.1f}")


if __name__ == "__main__":
    main()
