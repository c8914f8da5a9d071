"""Timing and memory harness shared by the benchmark scripts.

Each benchmark script builds a list of :class:`Case` objects, one per (task, implementation)
pair, and hands it to :func:`main`. The harness then

* times all cases **interleaved in one process**: round r calls every case once, in an order
  rotated by r, so that ours and the reference side see the same machine load. Machines here
  are shared; the ratio ours/theirs from one interleaved run is the figure that counts, the
  absolute medians move with the load.
* measures **peak memory** of each case in a **fresh subprocess** (``--mem-child``): the child
  builds the same cases, runs the case's untimed ``setup`` and one warm-up call, returns freed
  heap pages to the OS (``malloc_trim``), resets the kernel's resident-set high-water mark
  (``/proc/self/clear_refs`` with ``5``, Linux >= 4.0), runs the timed callable once and
  reports ``VmHWM - VmRSS(before)``: the extra resident memory the call needed at its peak, in
  MiB. Where ``clear_refs`` cannot be written (not Linux), it falls back
  to the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a lower bound. ``tracemalloc``
  does not see torch's allocations and is not used. On CUDA the figure is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* prints a Markdown table (median, min, max, repetitions, peak memory, ratio ours/this, ratio
  to the floor case) and optionally writes everything to JSON.

Command-line flags common to every script: ``--quick``, ``--reps``, ``--warmup``,
``--threads`` (default 2), ``--only`` (substring filter on ``task/impl``), ``--no-memory``,
``--json PATH``, ``--device``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

OURS = "ours"
REF = "ref"
FLOOR = "floor"

#: Exceptions that mean "this side is not available (yet)": the case is listed as missing
#: and the rest of the benchmark goes on.
MISSING = (ImportError, AttributeError, NotImplementedError, TypeError)


@dataclass
class Case:
    """One timed callable.

    Attributes:
        task: What is computed, e.g. ``"fit diag"``. Ours and the references of one task
            share this string; ratios are taken within a task.
        impl: Who computes it, e.g. ``"laplace-torch (diag)"`` or ``"laplace_ggn"``.
        fn: The timed callable; receives the object returned by ``setup`` (or ``None``).
        setup: Untimed preparation, called once per process before the first call of ``fn``
            (or before every call when ``fresh`` is true). Exceptions in :data:`MISSING`
            mark the case as missing instead of failing the run.
        role: ``"ours"``, ``"ref"`` or ``"floor"`` (the floor row, e.g. one training epoch,
            to which every other row is compared in the ``x floor`` column).
        fresh: Call ``setup`` before every timed call (e.g. when ``fn`` consumes its state).
        scale: Multiply the measured time by this factor (extrapolation, e.g. 10 marglik
            steps timed for 100); such rows are marked with ``*`` and ``note`` says why.
        reps: Cap on timed repetitions for this case (expensive cases); ``None`` = global.
        warmup: Whether this case gets the warm-up calls.
        memory: Whether to measure peak memory for this case.
        note: Free text printed under the table.
    """

    task: str
    impl: str
    fn: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None
    role: str = REF
    fresh: bool = False
    scale: float = 1.0
    reps: int | None = None
    warmup: bool = True
    memory: bool = True
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.task}/{self.impl}"


@dataclass
class Result:
    task: str
    impl: str
    role: str
    times: list[float] = field(default_factory=list)
    scale: float = 1.0
    status: str = "ok"  # ok | missing | failed
    error: str = ""
    peak_mib: float | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) * self.scale if self.times else None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["median"] = self.median
        d["min"] = min(self.times) * self.scale if self.times else None
        d["max"] = max(self.times) * self.scale if self.times else None
        return d


# --------------------------------------------------------------------------- environment


def versions() -> dict[str, str]:
    """Versions of Python, torch and the benchmarked packages (``-`` if not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in (
        "laplace-ggn",
        "laplace-torch",
        "curvlinops-for-pytorch",
        "backpack-for-pytorch",
        "asdfghjkl",
        "numpy",
        "scikit-learn",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def machine() -> dict[str, str]:
    """CPU model, core count, memory and (if used) the GPU."""
    info = {"platform": platform.platform(), "cpus": str(os.cpu_count())}
    try:
        txt = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", txt)
        if m:
            info["cpu"] = m.group(1).strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            m = re.search(r"MemTotal:\s+(\d+)", fh.read())
        if m:
            info["memory"] = f"{int(m.group(1)) / 2**20:.1f} GiB"
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- memory


def _proc_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"{field_name}:\s+(\d+)", fh.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS so that a previous call's pages are not reused."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_of(fn: Callable[[Any], Any], state: Any, device: str = "cpu") -> tuple[float, str]:
    """Extra peak memory (MiB) of one call ``fn(state)`` in this process, and the method used."""
    gc.collect()
    _malloc_trim()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda max_memory_allocated"
    if _reset_hwm():
        rss0 = _proc_kib("VmRSS")
        fn(state)
        hwm = _proc_kib("VmHWM")
        return max(hwm - rss0, 0) / 1024, "VmHWM - VmRSS (clear_refs)"
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(state)
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(r1 - r0, 0) / 1024, "ru_maxrss growth (lower bound)"


def _memory_child(cases: list[Case], key: str, device: str) -> None:
    (case,) = [c for c in cases if c.key == key]
    state = case.setup() if case.setup is not None else None
    # one call first so that lazy one-time allocations (thread pools, kernels) are not counted
    if case.warmup:
        case.fn(case.setup() if case.fresh and case.setup else state)
        if case.fresh and case.setup:
            state = case.setup()
    mib, how = peak_memory_of(case.fn, state, device)
    print("@@MEM@@" + json.dumps({"key": key, "peak_mib": mib, "method": how}), flush=True)


def measure_memory(
    script: str, argv: list[str], key: str, timeout: float = 1800
) -> tuple[float | None, str]:
    """Run ``script argv --mem-child key`` in a fresh interpreter; parse its report."""
    cmd = [sys.executable, script, *argv, "--mem-child", key, "--no-memory"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    for line in proc.stdout.splitlines():
        if line.startswith("@@MEM@@"):
            d = json.loads(line[len("@@MEM@@") :])
            return d["peak_mib"], d["method"]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, "failed: " + tail[0][:200]


# --------------------------------------------------------------------------- timing


def run_interleaved(
    cases: list[Case], *, reps: int, warmup: int, device: str = "cpu", log=print
) -> list[Result]:
    """Time all cases alternately: each round calls every case once, in a rotated order."""
    results = {c.key: Result(c.task, c.impl, c.role, scale=c.scale, note=c.note) for c in cases}
    states: dict[str, Any] = {}
    live: list[Case] = []
    for c in cases:
        res = results[c.key]
        if c.setup is None or c.fresh:
            live.append(c)
            continue
        try:
            states[c.key] = c.setup()
            live.append(c)
        except MISSING as e:
            res.status, res.error = "missing", f"{type(e).__name__}: {e}"
            log(f"  [missing] {c.key}: {res.error}")
        except Exception as e:  # noqa: BLE001 - a broken case must not stop the others
            res.status, res.error = "failed", f"{type(e).__name__}: {e}"
            log(f"  [failed setup] {c.key}: {res.error}")
            traceback.print_exc(file=sys.stderr)

    n_rounds = warmup + reps
    for r in range(n_rounds):
        if not live:
            break
        k = r % len(live)
        order = live[k:] + live[:k]
        for c in order:
            res = results[c.key]
            if res.status != "ok":
                continue
            cap = min(c.reps, reps) if c.reps is not None else reps
            is_warm = r < warmup
            if is_warm and not c.warmup:
                continue
            if not is_warm and len(res.times) >= cap:
                continue
            try:
                state = c.setup() if (c.fresh and c.setup is not None) else states.get(c.key)
                gc.collect()
                _sync(device)
                t0 = time.perf_counter()
                c.fn(state)
                _sync(device)
                dt = time.perf_counter() - t0
            except MISSING as e:
                res.status, res.error = "missing", f"{type(e).__name__}: {e}"
                log(f"  [missing] {c.key}: {res.error}")
                continue
            except Exception as e:  # noqa: BLE001
                res.status, res.error = "failed", f"{type(e).__name__}: {e}"
                log(f"  [failed] {c.key}: {res.error}")
                traceback.print_exc(file=sys.stderr)
                continue
            if not is_warm:
                res.times.append(dt)
            tag = " (warm-up)" if is_warm else ""
            log(f"  round {r + 1}/{n_rounds}{tag} {c.key}: {dt * c.scale:.4g} s")
    return [results[c.key] for c in cases]


# --------------------------------------------------------------------------- report


def _fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.3g} s"
    return f"{t * 1e3:.3g} ms"


def markdown_table(results: list[Result]) -> str:
    """Markdown table: one row per case, ratios within each task and to the floor."""
    ours = {r.task: r.median for r in results if r.role == OURS and r.median is not None}
    floors = [r.median for r in results if r.role == FLOOR and r.median is not None]
    floor = floors[0] if floors else None
    head = "| task | implementation | median | min – max | n | peak mem (MiB) | ours / this |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if floor is not None:
        head += " × floor |"
        sep += "---:|"
    lines = [head, sep]
    notes = []
    for r in results:
        star = "*" if r.scale != 1.0 else ""
        if r.status != "ok" or not r.times:
            med = f"({r.status})" if r.status != "ok" else "-"
            rng, n = "-", "0"
        else:
            med = _fmt_t(r.median) + star
            rng = f"{_fmt_t(min(r.times) * r.scale)} – {_fmt_t(max(r.times) * r.scale)}"
            n = str(len(r.times))
        mem = "-" if r.peak_mib is None else f"{r.peak_mib:.1f}"
        ratio = "-"
        if r.role != OURS and r.median and ours.get(r.task) is not None:
            ratio = f"{ours[r.task] / r.median:.2f}"
        row = f"| {r.task} | {r.impl} | {med} | {rng} | {n} | {mem} | {ratio} |"
        if floor is not None:
            row += f" {r.median / floor:.1f} |" if r.median else " - |"
        lines.append(row)
        if r.note:
            notes.append(f"- {r.task} / {r.impl}: {r.note}")
        if r.status != "ok" and r.error:
            notes.append(f"- {r.task} / {r.impl} {r.status}: `{r.error[:160]}`")
    out = "\n".join(lines)
    if notes:
        out += "\n\n" + "\n".join(dict.fromkeys(notes))
    return out


# --------------------------------------------------------------------------- entry point


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 repetition")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1, quick 0)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--only", default=None, help="run only cases whose 'task/impl' contains this")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="skip the timing; only measure peak memory (one subprocess per case)",
    )
    p.add_argument("--json", default=None, help="write results and metadata to this JSON file")
    p.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    return p


def main(
    title: str,
    build: Callable[[argparse.Namespace], list[Case]],
    *,
    argv: list[str] | None = None,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
    script: str | None = None,
    check: Callable[[argparse.Namespace], str] | None = None,
) -> list[Result]:
    """Parse the common flags, build the cases, time them, measure memory, print the table.

    ``check(args)``, if given, is run once before timing (not in memory children); it compares
    ours with the reference numerically and its text is printed under the table.
    """
    p = parser(title)
    if extra_args is not None:
        extra_args(p)
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)

    cases = build(args)
    if args.only:
        cases = [c for c in cases if args.only in c.key]
    if args.mem_child is not None:
        _memory_child(cases, args.mem_child, args.device)
        return []

    print(f"## {title}\n", flush=True)
    agreement = ""
    if check is not None:
        try:
            agreement = check(args)
        except MISSING as e:
            agreement = f"agreement check skipped: {type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001
            agreement = f"agreement check failed: {type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
    print(
        f"threads={args.threads} reps={reps} warmup={warmup} device={args.device}", file=sys.stderr
    )
    if args.memory_only:
        results = [Result(c.task, c.impl, c.role, scale=c.scale, note=c.note) for c in cases]
    else:
        results = run_interleaved(
            cases,
            reps=reps,
            warmup=warmup,
            device=args.device,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    mem_method = "not measured"
    if not args.no_memory:
        script = script or sys.argv[0]
        child_argv = [a for a in raw if a not in ("--no-memory", "--memory-only")]
        # drop --json PATH from the child's arguments
        if "--json" in child_argv:
            i = child_argv.index("--json")
            del child_argv[i : i + 2]
        for c, r in zip(cases, results):
            if r.status != "ok" or not c.memory:
                continue
            print(f"  memory {c.key} ...", file=sys.stderr, flush=True)
            r.peak_mib, how = measure_memory(script, child_argv, c.key)
            if r.peak_mib is not None:
                mem_method = how
            else:
                print(f"  memory {c.key}: {how}", file=sys.stderr)
    table = markdown_table(results)
    print(table)
    print(
        f"\nthreads={args.threads}, reps={reps}, warm-up={warmup}, device={args.device}; "
        f"peak mem = {mem_method}, one call in a fresh process; * = extrapolated (see notes)."
    )
    if agreement:
        print("\n" + agreement)
    if args.json:
        payload = {
            "title": title,
            "argv": [os.path.basename(script or sys.argv[0]), *raw],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "threads": args.threads,
            "reps": reps,
            "warmup": warmup,
            "device": args.device,
            "memory_method": mem_method,
            "versions": versions(),
            "machine": machine(),
            "results": [r.as_dict() for r in results],
            "markdown": table,
            "agreement": agreement,
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return results
