"""``laplace-ggn benchmark``: run the benchmark suite of a source checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["run_benchmark"]


def _benchmark_script() -> Path | None:
    """Locate ``benchmarks/run_all.py`` next to the package in a source checkout.

    Returns:
        Its path, or ``None`` when the package is installed without the repository.
    """
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "run_all.py"
    return script if script.is_file() else None


def run_benchmark(*, quick: bool, extra: list[str], stream: TextIO | None = None) -> int:
    """Run the benchmark suite of a source checkout.

    Returns:
        The suite's exit status, or 2 when ``benchmarks/run_all.py`` is not found.
    """
    stream = sys.stderr if stream is None else stream
    script = _benchmark_script()
    if script is None:
        print(
            "laplace-ggn benchmark: benchmarks/run_all.py not found. The benchmark suite ships "
            "with the source repository, not with the installed package: clone the repository, "
            '`pip install -e ".[bench]"` in it and run `laplace-ggn benchmark` there.',
            file=stream,
        )
        return 2
    cmd = [sys.executable, str(script), *(["--quick"] if quick else []), *extra]
    return subprocess.call(cmd, cwd=script.parent.parent)
