"""The ``laplace-ggn`` command: a calibration demo on bundled data, and the benchmark suite.

``laplace-ggn demo`` trains a small ReLU MLP on scikit-learn's bundled 8×8 digits (no
download), fits a Laplace posterior of every available structure, tunes the prior precision
by maximising the Laplace evidence and a predictive temperature on a held-out validation
split (``optimize_prior_precision(method="marglik_temperature")``), and compares the MAP
network with the linearised (GLM, probit) predictive of each posterior, in distribution and
on rotated, noisy digits (out of distribution); the projected posterior is also shown with
its sampled-network predictive. It prints a table and writes reliability diagrams (in and
out of distribution) and a confidence histogram as PNG files.

``laplace-ggn benchmark`` runs ``benchmarks/run_all.py`` of a source checkout.

Run ``laplace-ggn --help`` or ``laplace-ggn demo --help`` for the options.
"""

from __future__ import annotations

import argparse

from .benchmark import run_benchmark
from .data import DemoConfig, load_digits_splits, train_mlp
from .demo import DemoResult, check_out_dir, run_demo, structure_choices

__all__ = [
    "DemoConfig",
    "DemoResult",
    "build_parser",
    "load_digits_splits",
    "main",
    "run_benchmark",
    "run_demo",
    "structure_choices",
    "train_mlp",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``laplace-ggn``.

    Returns:
        The parser, with the ``demo`` and ``benchmark`` subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="laplace-ggn",
        description="Laplace approximations for trained PyTorch networks from the generalised "
        "Gauss-Newton matrix.",
        epilog="Examples:\n  laplace-ggn demo\n  laplace-ggn demo --structure kfac --out /tmp/demo"
        "\n  laplace-ggn demo --small --no-progress\n  laplace-ggn benchmark --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="calibration demo on scikit-learn's bundled digits (under a minute on CPU)",
        description="Train a small ReLU MLP on scikit-learn's bundled 8x8 digits (no download), "
        "fit a Laplace posterior of every available structure, tune the prior precision by the "
        "evidence and a predictive temperature on a validation split, and compare MAP with the "
        "linearised (GLM, probit) predictive: accuracy, NLL, ECE, Brier and fit time on "
        "held-out digits and on rotated, noisy digits (out of distribution). Writes "
        "reliability.png, reliability_ood.png, confidence.png and metrics.json to --out.",
    )
    demo.add_argument(
        "--structure",
        choices=structure_choices(),
        default="all",
        help="posterior structure to fit (default: all available)",
    )
    demo.add_argument(
        "--out",
        default="laplace-ggn-demo",
        metavar="DIR",
        help="directory for the figures and metrics.json (default: %(default)s)",
    )
    demo.add_argument(
        "--small",
        action="store_true",
        help="smaller data and network: a smoke test of a few seconds",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    bench = sub.add_parser(
        "benchmark",
        help="run the benchmark suite (benchmarks/run_all.py of a source checkout)",
        description="Run benchmarks/run_all.py of the source repository against laplace-torch, "
        'curvlinops and BackPACK where installed (pip install -e ".[bench]"). Other options '
        "(--only digits,cnn, --out PATH, --threads N, --device cuda, ...) are passed on to "
        "run_all.py; see `python benchmarks/run_all.py --help`.",
    )
    bench.add_argument("--quick", action="store_true", help="short smoke run of every benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``laplace-ggn`` console script.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on a usage error or a missing benchmark suite.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "benchmark":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        try:
            check_out_dir(args.out)
        except ValueError as err:
            parser.error(str(err))  # exits with status 2, as for other usage errors
        run_demo(
            structure=args.structure,
            out=args.out,
            small=args.small,
            progress=not args.no_progress,
            seed=args.seed,
        )
        return 0
    if args.command == "benchmark":
        return run_benchmark(quick=args.quick, extra=extra)
    parser.print_help()
    return 2
