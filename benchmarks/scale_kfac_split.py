"""Split of our KFAC fit at scale: the factor pass and the eigendecompositions, timed apart.

laplace-torch's kron ``fit`` computes only the Kronecker factors (it eigendecomposes them at
the first use of the posterior); ours returns the finished posterior. This script times our
two parts separately on the scale benchmark's MLP 64-2200-2200-10 (P = 5.0M).

    python benchmarks/scale_kfac_split.py [--width 2200] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import torch
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=2200)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from laplace_ggn._checks import Likelihood
    from laplace_ggn.collectors import KFACCollector
    from laplace_ggn.functional import FunctionalModel, resolve_subset
    from laplace_ggn.likelihoods import get_likelihood

    Xtr, ytr, _, _ = C.digits(0)
    model = C.mlp([64, args.width, args.width, 10], act=nn.ReLU, seed=0).eval()
    dl = C.loader(Xtr, ytr, 100)
    fm = FunctionalModel(model, resolve_subset(model, "all", Xtr[:2]))
    lik = get_likelihood(Likelihood("classification"))
    for _ in range(args.reps):
        t0 = time.perf_counter()
        col = KFACCollector(fm, lik)
        for x, _y in dl:
            col.update(x)
        curv = col.finalize()
        t1 = time.perf_counter()
        for b in curv.blocks:
            torch.linalg.eigh(b.A), torch.linalg.eigh(b.B)
        t2 = time.perf_counter()
        print(f"factors {t1 - t0:.2f} s, eigh of all factors {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
