"""Train with DDP, then fit a Laplace posterior on the same ranks, each on its own shard.

Run on CPU with two processes (gloo):

    torchrun --nproc_per_node=2 examples/distributed/fit_torchrun.py

Every rank ends with the same posterior, equal to the fit of one process on all the data;
rank 0 checks that against a local fit and prints the evidence and the timings.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from laplace_ggn import LaplaceWrapper


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("USE_NCCL") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    try:
        X, y = load_digits(return_X_y=True)
        data = TensorDataset(torch.tensor(X / 16.0, dtype=torch.float64), torch.tensor(y))

        # 1. DDP training: the same initial weights on every rank (seeded), synced gradients
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double().to(device)
        ddp = DistributedDataParallel(model)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2, weight_decay=1e-4)
        for epoch in range(20):
            sampler.set_epoch(epoch)
            for xb, yb in DataLoader(data, batch_size=64, sampler=sampler):
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(xb.to(device)), yb.to(device)).backward()
                opt.step()

        # 2. Laplace fit: each rank streams its shard; pass the module inside the DDP wrapper.
        # Shards must partition the data: DistributedSampler repeats points to make shards of
        # equal length (or drops some with drop_last=True) unless N divides by the world size,
        # so here every rank takes a contiguous block of indices.
        shard = torch.tensor_split(torch.arange(len(data)), world)[rank]
        loader = DataLoader(torch.utils.data.Subset(data, shard.tolist()), batch_size=128)
        for structure in ("kfac", "diag", "full"):
            la = LaplaceWrapper(ddp.module, "classification", structure=structure)
            t0 = time.perf_counter()
            la.fit(loader)  # distributed automatically: torch.distributed is initialised
            t_dist = time.perf_counter() - t0
            la.optimize_prior_precision("marglik", n_steps=50)
            lml = float(la.log_marginal_likelihood())
            if rank == 0:
                ref = LaplaceWrapper(ddp.module, "classification", structure=structure)
                t0 = time.perf_counter()
                ref.fit(DataLoader(data, batch_size=128), distributed=False)
                t_one = time.perf_counter() - t0
                ref.set_hyperparameters(prior_precision=la.prior_precision)
                lml_ref = float(ref.log_marginal_likelihood())
                print(
                    f"{structure:5s} P={la.n_params} N={la.fitted.statistics.n_data}  "
                    f"evidence {world} ranks {lml:.6f}  1 process {lml_ref:.6f}  "
                    f"rel. diff {abs(lml - lml_ref) / abs(lml_ref):.1e}  "
                    f"fit {t_dist:.2f} s on {world} ranks, {t_one:.2f} s in 1 process",
                    flush=True,
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
