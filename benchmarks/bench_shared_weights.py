"""Shared (tied) weights: the cost of tracing them on untied models, and the memory of tied LMs.

Two tables, each comparing implementations given as checkouts (``--libs``; the current
checkout by default): every measurement runs in a fresh interpreter with ``PYTHONPATH`` set to
the checkout, and the checkouts alternate within every repetition, so that the load of a
shared machine falls on both alike.

1. ``overhead``: seconds of one ``fit`` (and of the first ``predict`` of a last-layer KFAC fit,
   where the Linear head traces its uses) on models without shared weights, where the use
   tracing of the first hooked pass is pure overhead: a tanh MLP 3-16-16-3 (P = 403, N = 256,
   batch 32), the demo's ReLU MLP 64-16-16-10 (P = 1,482, ``laplace-ggn demo``, the 1,297
   digits, batch 128), the digits MLP 64-32-32-10 of ``bench_digits.py`` (P = 3,466, batch 100)
   and the digits CNN (P = 18,346).  One repetition is the median of 3 calls after a warm-up call in
   one interpreter; the table gives the median over ``--reps`` repetitions, and the ratio
   column the last checkout over the first.
2. ``memory``: GPT-2 language models (1 layer, 8 dimensions, 2 heads, vocab 5,000) with the
   output layer tied to the embedding (Hugging Face's default) and untied, ``subset=
   "last_layer"``, ``memory_budget`` 1 GiB: ``diag`` and ``kfac`` fits with ``curvature="mc"``,
   and a ``lowrank`` (mc) fit followed by a GLM-probit predict; 8 sequences of 6 tokens.
   Peak resident set of the interpreter (``ru_maxrss``, imports and model included; the
   ``baseline`` row is the peak after building the model and the data) and the outcome.
   Each run is capped at ``--cap-gb`` of address space (``RLIMIT_AS``) so that an unbounded
   allocation fails quickly instead of exhausting the machine, and stopped after
   ``--limit-s`` seconds (a path that chunks an unbounded Jacobian runs for hours); the peak
   is then that of the unfinished run.

Run from the repository root::

    python benchmarks/bench_shared_weights.py --libs /path/to/main $PWD
    python benchmarks/bench_shared_weights.py --quick      # smoke run: 1 rep, vocab 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
OVERHEAD_CASES = [
    "mlp full",
    "mlp diag",
    "mlp kfac",
    "mlp lowrank",
    "demo full",
    "demo diag",
    "demo kfac",
    "demo lowrank k=30",
    "digits full",
    "digits diag",
    "digits kfac",
    "digits lowrank k=20",
    "digits kfac last_layer fit+predict",
    "cnn diag",
    "cnn kfac",
]
MEMORY_CASES = ["baseline", "diag mc", "kfac mc", "lowrank mc + predict"]
INNER = 3  # timed calls per case and interpreter (their median is one repetition)


# -- workers (run in a fresh interpreter with PYTHONPATH set to one checkout) -----------------


def _overhead_worker() -> dict[str, float]:
    import torch

    sys.path.insert(0, HERE)
    import _common as C

    from laplace_ggn import LaplaceWrapper

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    Xs, ys = torch.randn(256, 3, generator=g), torch.randint(0, 3, (256,), generator=g)
    small = C.mlp([3, 16, 16, 3], seed=0)
    Xd, yd, Xte, _ = C.digits(0)
    digits = C.mlp([64, 32, 32, 10], act=torch.nn.ReLU, seed=0)
    Xi, yi, _, _ = C.digits(0, images=True)
    cnn = C.digits_cnn(0)
    demo = C.mlp([64, 16, 16, 10], act=torch.nn.ReLU, seed=0)  # laplace-ggn demo's model
    data = {
        "mlp": (small, C.loader(Xs, ys, 32)),
        "demo": (demo, C.loader(Xd, yd, 128)),
        "digits": (digits, C.loader(Xd, yd, 100)),
        "cnn": (cnn, C.loader(Xi, yi, 100)),
    }
    out = {}
    for case in OVERHEAD_CASES:
        words = case.split()
        model, loader = data[words[0]]
        structure = words[1]
        rank = 20 if "k=20" in case else 30 if "k=30" in case else None
        subset = "last_layer" if "last_layer" in case else "all"

        def run(model=model, loader=loader, structure=structure, rank=rank, subset=subset):
            la = LaplaceWrapper(model, structure=structure, rank=rank, subset=subset)
            la.fit(loader, progress=False)
            if "predict" in case:
                la.predict(Xte)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()  # warm-up: lazy one-time costs are not counted
            times = []
            for _ in range(INNER):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
        out[case] = statistics.median(times)
    return out


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped


def _memory_worker(case: str, tied: bool, vocab: int, cap_gb: float, limit_s: int) -> dict:
    cap = int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from laplace_ggn import LaplaceWrapper

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=8,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, 6), generator=g)
    labels = torch.randint(0, vocab, (8, 6), generator=g)
    batches = [(ids[:4], labels[:4]), (ids[4:], labels[4:])]
    t = time.perf_counter()
    outcome = "ok"
    if case != "baseline":
        structure = case.split()[0]
        la = LaplaceWrapper(
            model, structure=structure, subset="last_layer", curvature="mc", memory_budget=2**30
        )
        signal.signal(signal.SIGALRM, _stop)
        signal.alarm(limit_s)
        try:
            la.fit(batches, generator=torch.Generator().manual_seed(0))
            outcome = f"ok: subset {list(la.fitted.layout.names)}"
            if "predict" in case:
                la.predict(ids[:2])
        except (RuntimeError, ValueError, MemoryError) as err:
            outcome = f"{type(err).__name__}: {str(err)[:90]}"
        except _Stopped:
            outcome = f"stopped after {limit_s} s, unfinished"
        signal.alarm(0)
    return {
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": time.perf_counter() - t,
        "outcome": outcome,
    }


# -- driver ----------------------------------------------------------------------------------------


def _child(lib: str, args: list[str], timeout: float) -> dict | None:
    env = {**os.environ, "PYTHONPATH": lib}
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"outcome": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"outcome": f"crashed (rc {proc.returncode}): {tail[:90]}"}
    return json.loads(lines[-1][2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--libs", nargs="+", default=[os.path.dirname(HERE)])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--cap-gb", type=float, default=8.0)
    ap.add_argument("--limit-s", type=int, default=300)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["overhead", "memory"])
    ap.add_argument("--worker", choices=["overhead", "memory"])
    ap.add_argument("--case")
    ap.add_argument("--tied", type=int, default=1)
    a = ap.parse_args()
    if a.worker == "overhead":
        print("@@" + json.dumps(_overhead_worker()), flush=True)
        return
    if a.worker == "memory":
        got = _memory_worker(a.case, bool(a.tied), a.vocab, a.cap_gb, a.limit_s)
        print("@@" + json.dumps(got), flush=True)
        return
    reps, vocab = (1, 500) if a.quick else (a.reps, a.vocab)
    names = [os.path.basename(os.path.normpath(lib)) for lib in a.libs]
    if a.only != "memory":
        times: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        for _ in range(reps):
            for lib, name in zip(a.libs, names):
                got = _child(lib, ["--worker", "overhead"], timeout=1800) or {}
                for case, sec in got.items():
                    if case != "outcome":
                        times[name].setdefault(case, []).append(sec)
        print(f"\nfit time on models without shared weights (median of {reps}, seconds)\n")
        print("| case | " + " | ".join(names) + " | ratio |\n|---|" + "---|" * (len(names) + 1))
        for case in OVERHEAD_CASES:
            med = [statistics.median(times[n].get(case, [float("nan")])) for n in names]
            ratio = med[-1] / med[0] if med[0] else float("nan")
            print(f"| {case} | " + " | ".join(f"{m:.4f}" for m in med) + f" | {ratio:.3f} |")
    if a.only != "overhead":
        print(
            f"\nGPT-2 LM, vocab {vocab}, subset='last_layer', memory_budget 1 GiB: peak RSS (MiB)\n"
        )
        print(
            "| case | tied | checkout | peak MiB | seconds | outcome |\n|---|---|---|---|---|---|"
        )
        for case in MEMORY_CASES:
            for tied in (0, 1):
                for lib, name in zip(a.libs, names):
                    args = ["--worker", "memory", "--case", case, "--tied", str(tied)]
                    args += ["--vocab", str(vocab), "--cap-gb", str(a.cap_gb)]
                    args += ["--limit-s", str(a.limit_s)]
                    r = _child(lib, args, timeout=1800) or {}
                    peak = r.get("peak_mib")
                    sec = r.get("seconds")
                    print(
                        f"| {case} | {'tied' if tied else 'untied'} | {name} | "
                        + (f"{peak:.0f}" if peak is not None else "-")
                        + " | "
                        + (f"{sec:.1f}" if sec is not None else "-")
                        + f" | {r.get('outcome', '')} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
