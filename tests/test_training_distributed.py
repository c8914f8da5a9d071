"""marglik_training across 2 gloo ranks (each its shard) against one process on all the data.

One spawned run trains a plain model (gradients averaged by marglik_training) and a
DistributedDataParallel one; with equal shards of one batch each and SGD, every step, refit
and hyperparameter step equals the single-process run on the union.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import make_case
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import marglik_training

WORLD = 2
KW = {
    "n_epochs": 3, "n_epochs_burnin": 0, "marglik_frequency": 1, "n_hypersteps": 4,
    "structure": "full", "optimizer": torch.optim.SGD, "optimizer_kwargs": {"lr": 0.2},
    "progress": False,
}  # fmt: skip


def _summary(res) -> dict:
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in res.laplace.model.parameters()]),
        "prior_precision": res.laplace.prior_precision,
        "temperature": res.temperature,
        "evidence": res.history.log_evidence,
        "loss": res.history.loss,
        "n_data": res.laplace.fitted.statistics.n_data,
    }


def _run(X, y, model=None, **extra):
    case = make_case("mlp_classification", 0, n=12)
    loader = DataLoader(TensorDataset(X, y), batch_size=X.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return marglik_training(model or case.model, loader, "classification", **KW, **extra)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        case = make_case("mlp_classification", 0, n=12)
        sl = slice(0, 6) if rank == 0 else slice(6, 12)
        out = {"plain": _summary(_run(case.X[sl], case.y[sl]))}
        ddp = torch.nn.parallel.DistributedDataParallel(make_case("mlp_classification", 0).model)
        out["ddp"] = _summary(_run(case.X[sl], case.y[sl], model=ddp))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False)
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail("the 2-rank gloo run did not finish within 240 s (a hang)")
        yield [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)
        ]


@pytest.mark.parametrize("kind", ["plain", "ddp"])
def test_two_ranks_train_as_one_process(ranks, kind):
    case = make_case("mlp_classification", 0, n=12)
    ref = _summary(_run(case.X, case.y))
    for res in ranks:
        got = res[kind]
        assert got["n_data"] == ref["n_data"] == 12
        assert got["temperature"] == pytest.approx(ref["temperature"], rel=1e-9)
        for key in ("params", "prior_precision", "evidence"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-8, atol=1e-10)
