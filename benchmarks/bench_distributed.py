"""Time a 2-rank gloo fit against one process on the same total data (CPU).

    python benchmarks/bench_distributed.py [--repeats 3] [--hidden 32]

Model: MLP 64-H-10 on the 1,297 digits training points (float32, untrained weights: the
timing does not depend on training). Each rank fits its contiguous half; the wall time of a
distributed fit is the slowest rank's, from a barrier to the end of ``fit``. The evidence of
both fits is compared to check that they are the same posterior.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import digits, loader

from laplace_ggn import LaplaceWrapper

CONFIGS = [("diag", {}), ("kfac", {}), ("full", {}), ("lowrank", {"rank": 20})]


def _model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def _time_fit(model, X, y, structure, kwargs, repeats, **fit_kwargs):
    times, lml = [], None
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        la = LaplaceWrapper(model, "classification", structure=structure, **kwargs)
        t0 = time.perf_counter()
        la.fit(loader(X, y, 100), **fit_kwargs)
        t = time.perf_counter() - t0
        if dist.is_initialized():
            tt = torch.tensor([t], dtype=torch.float64)
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)
            t = float(tt)
        times.append(t)
        lml = float(la.log_marginal_likelihood())
    return sorted(times)[len(times) // 2], lml


def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        X, y, _, _ = digits()
        idx = torch.tensor_split(torch.arange(len(X)), world)[rank]
        res = {
            s: _time_fit(_model(args.hidden), X[idx], y[idx], s, kw, args.repeats)
            for s, kw in CONFIGS
        }
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=32)
    args = p.parse_args()
    X, y, _, _ = digits()
    model = _model(args.hidden)
    P = sum(q.numel() for q in model.parameters())
    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        single[threads] = {s: _time_fit(model, X, y, s, kw, args.repeats) for s, kw in CONFIGS}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        mp.spawn(_rank, args=(2, port, args, out), nprocs=2, join=True)
        two = torch.load(out)
    print(
        f"MLP 64-{args.hidden}-10, P={P}, N={len(X)}, float32, batch 100, "
        f"median of {args.repeats}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'structure':14s} {'1 proc 1 thr':>13s} {'1 proc 2 thr':>13s} {'2 ranks x 1 thr':>16s}"
        f" {'evidence rel. diff':>19s}"
    )
    for s, kw in CONFIGS:
        name = s + (f" k={kw['rank']}" if kw else "")
        t1, l1 = single[1][s]
        t2, _ = single[2][s]
        td, ld = two[s]
        print(f"{name:14s} {t1:12.3f}s {t2:12.3f}s {td:15.3f}s {abs(ld - l1) / abs(l1):19.1e}")


if __name__ == "__main__":
    main()
