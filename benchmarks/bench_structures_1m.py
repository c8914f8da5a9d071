"""Fit time and peak memory of kfac and lowrank (k=50) on an MLP of ~1M parameters.

Digits-sized data: all 1,797 points of scikit-learn's digits (64 features, 10 classes), batch
100, float32, CPU.  The MLP is 64-1000-1000-10 with tanh (P = 1,076,010), trained for a few
epochs of Adam (cached on disk).  Each measurement runs in a fresh subprocess: fit time by
``time.perf_counter`` around ``LaplaceWrapper.fit``, peak resident memory by
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end, next to the same figure taken
just before the fit (model, data and library loaded) so that the fit's own share is visible.
The time of one plain forward + backward epoch over the same loader (the floor) is measured in
the same process, so that the ratio stays meaningful on a loaded machine.

    python benchmarks/bench_structures_1m.py              # kfac and lowrank k=50
    python benchmarks/bench_structures_1m.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [("kfac", None), ("lowrank", 50)]


def _child(structure: str, rank: int | None, threads: int) -> None:
    import resource
    import time

    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, HERE)
    import _common as C

    from laplace_ggn import LaplaceWrapper

    torch.set_num_threads(threads)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    model = C.mlp([64, 1000, 1000, 10], act=C.nn.Tanh, seed=0)
    model = C.train(model, X, y, epochs=3, seed=0, tag="structures_1m")
    P = C.n_params(model)
    dl = DataLoader(TensorDataset(X, y), batch_size=100, shuffle=False)
    t0 = time.perf_counter()
    C.epoch(model, dl)  # the floor: one forward + backward pass over the data
    epoch_s = time.perf_counter() - t0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    la = LaplaceWrapper(
        model, "classification", structure=structure, rank=rank, prior_precision=1.0
    )
    t0 = time.perf_counter()
    la.fit(dl, progress=False)
    fit_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    lml = float(la.log_marginal_likelihood())
    lml_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "structure": structure,
                "rank": rank,
                "P": P,
                "N": len(X),
                "threads": threads,
                "fit_s": round(fit_s, 2),
                "epoch_s": round(epoch_s, 2),
                "lml_s": round(lml_s, 3),
                "maxrss_before_fit_MB": round(before / 1024, 1),
                "maxrss_peak_MB": round(peak / 1024, 1),
                "log_marglik": round(lml, 2),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("STRUCTURE", "RANK"))
    args = ap.parse_args()
    if args.child:
        s, r = args.child
        _child(s, None if r == "None" else int(r), args.threads)
        return
    print(
        f"{'structure':<16}{'P':>10}{'N':>6}{'fit s':>8}{'epoch s':>9}{'fit/epoch':>10}"
        f"{'RSS before MB':>15}{'peak RSS MB':>13}"
    )
    for structure, rank in CASES:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--child",
                structure,
                str(rank),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        name = structure if rank is None else f"{structure} k={rank}"
        print(
            f"{name:<16}{row['P']:>10,}{row['N']:>6}{row['fit_s']:>8.2f}{row['epoch_s']:>9.2f}"
            f"{row['fit_s'] / row['epoch_s']:>10.1f}"
            f"{row['maxrss_before_fit_MB']:>15.1f}{row['maxrss_peak_MB']:>13.1f}"
        )


if __name__ == "__main__":
    main()
