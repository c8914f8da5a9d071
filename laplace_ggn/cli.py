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
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn

__all__ = ["main", "run_demo", "DemoConfig", "DemoResult"]

_STRUCTURE_CHOICES = ("full", "diag", "kfac", "lowrank", "projected", "all")
_DEMO_DTYPE = torch.float64


# ------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; :meth:`small` is the seconds-long smoke-test variant.

    Attributes:
        n_test: Held-out test digits.
        n_val: Held-out validation digits (tune the predictive temperature); the remaining
            ones train the network.
        hidden: Width of the two hidden layers.
        epochs: Adam epochs over the training set.
        batch_size: Mini-batch size of training and of the curvature pass.
        lowrank_rank: k of the ``lowrank`` structure (top-k eigenpairs of G).
        n_train: Cap on the training set size (``None``: all remaining digits).
        prior_precision: α of the Gaussian prior the MAP is trained under (weight decay
            α/N on the mean loss); also where the evidence maximisation starts.
    """

    n_test: int = 500
    n_val: int = 200
    hidden: int = 16
    epochs: int = 40
    batch_size: int = 128
    lowrank_rank: int = 300
    n_train: int | None = None
    prior_precision: float = 5.0

    @classmethod
    def small(cls) -> DemoConfig:
        """Return a configuration that runs in a few seconds.

        Returns:
            The small configuration.
        """
        return cls(
            n_test=200, n_val=100, hidden=8, epochs=40, batch_size=100, lowrank_rank=30, n_train=400
        )


def _rotate_and_noise(images: Tensor, *, generator: torch.Generator) -> Tensor:
    """Rotate each 8×8 digit by 90°, 180° or 270° and add strong pixel noise (raw 0-16 scale).

    Args:
        images: Raw digits, shape ``(M, 64)``.
        generator: Random generator of the noise.

    Returns:
        Rotated noisy digits clipped to ``[0, 16]``, shape ``(M, 64)``.
    """
    img = images.reshape(-1, 8, 8)
    k = torch.arange(img.shape[0]) % 3 + 1
    rotated = torch.stack([torch.rot90(im, int(r), dims=(0, 1)) for im, r in zip(img, k)])
    noise = 4.0 * torch.randn(rotated.shape, generator=generator, dtype=rotated.dtype)
    return (rotated + noise).clamp(0.0, 16.0).reshape(-1, 64)


def load_digits_splits(config: DemoConfig, *, seed: int) -> dict[str, Tensor]:
    """Standardised train / validation / test / out-of-distribution splits of the digits.

    Pixels are standardised with the training mean and standard deviation (floored at one
    grey level, so that pixels that are blank in every training image stay finite). The
    out-of-distribution set is the test set rotated by 90°/180°/270° with Gaussian noise of
    standard deviation 4 grey levels (of 16), keeping the original labels.

    Args:
        config: Sizes.
        seed: Seed of the split and of the noise.

    Returns:
        ``{"x_train" (N, 64), "y_train" (N,), "x_val" (V, 64), "y_val" (V,), "x_test" (M, 64),
        "y_test" (M,), "x_ood" (M, 64)}``.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=_DEMO_DTYPE)
    y = torch.as_tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=gen)
    test = perm[: config.n_test]
    val = perm[config.n_test : config.n_test + config.n_val]
    train = perm[config.n_test + config.n_val :]
    if config.n_train is not None:
        train = train[: config.n_train]
    mean = X[train].mean(0)
    std = X[train].std(0).clamp_min(1.0)
    x_ood = _rotate_and_noise(X[test], generator=gen)
    return {
        "x_train": (X[train] - mean) / std,
        "y_train": y[train],
        "x_val": (X[val] - mean) / std,
        "y_val": y[val],
        "x_test": (X[test] - mean) / std,
        "y_test": y[test],
        "x_ood": (x_ood - mean) / std,
    }


# ------------------------------------------------------------------------------------ model


def train_mlp(x: Tensor, y: Tensor, config: DemoConfig, *, seed: int, progress: bool) -> nn.Module:
    r"""Train a ReLU MLP ``64 → h → h → 10`` with Adam: the MAP under the prior N(0, α⁻¹I).

    The objective is the mean cross-entropy plus the weight decay :math:`\alpha/N`, i.e.
    :math:`(\ell(\theta) + \tfrac{\alpha}{2}\lVert\theta\rVert^2)/N` with ℓ summed.

    Returns:
        The trained network in eval mode (float64).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    h = config.hidden
    model = nn.Sequential(
        nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    ).to(_DEMO_DTYPE)
    opt = torch.optim.Adam(
        model.parameters(), lr=1e-2, weight_decay=config.prior_precision / x.shape[0]
    )
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(
        range(config.epochs), desc="train MAP", disable=not progress, leave=False, file=sys.stderr
    )
    for _ in bar:
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], config.batch_size):
            idx = perm[start : start + config.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# ------------------------------------------------------------------------------------- demo


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        metrics: ``{model: {"test": {...}, "ood": {...}, "fit_s": float | None,
            "prior_precision": float | None, "temperature": float | None}}`` (α and the
            predictive temperature T); the per-set dicts hold ``accuracy``, ``nll``,
            ``brier``, ``ece``, ``mce``, ``confidence`` (mean max-probability) and, for
            ``ood``, ``auroc`` (in- against out-of-distribution by confidence).
        skipped: ``{structure: reason}`` for structures that could not be fitted.
        files: Paths of the written figures and of ``metrics.json``.
        n_params: P of the network.
    """

    metrics: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    n_params: int = 0


def _set_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    from . import calibration as cal

    out = cal.classification_metrics(probs, labels)
    out["confidence"] = float(cal.max_probability(probs).mean())
    return out


def _auroc(conf_in: Tensor, conf_out: Tensor) -> float:
    """Area under the ROC curve of telling in- from out-of-distribution by confidence.

    Args:
        conf_in: Confidences in distribution, shape ``(M,)``.
        conf_out: Confidences out of distribution, shape ``(M',)``.

    Returns:
        The AUROC, 1 when every in-distribution input is more confident.
    """
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([conf_in, conf_out]).numpy()
    truth = torch.cat([torch.ones_like(conf_in), torch.zeros_like(conf_out)]).numpy()
    return float(roc_auc_score(truth, scores))


def _structures(requested: str) -> tuple[list[str], dict[str, str]]:
    """Select the structures to fit now, in the order of :class:`Structure`.

    Returns:
        ``(names, notes)``: the structures, and ``{name: reason}`` for a missing request.
    """
    from ._checks import Structure
    from .structures import STRUCTURES

    available = [s.value for s in Structure if s in STRUCTURES]
    if requested == "all":
        return available, {}
    if requested in available:
        return [requested], {}
    return [], {requested: "not available in this installation"}


def _fit_one(structure: str, model: nn.Module, loader, val_loader, config: DemoConfig):
    """Fit one structure; α by the evidence, the predictive temperature on validation NLL.

    Returns:
        ``(wrapper, seconds)``; the time covers the curvature pass and the tuning.
    """
    from .wrapper import LaplaceWrapper

    rank = config.lowrank_rank if structure == "lowrank" else None
    start = time.perf_counter()
    la = LaplaceWrapper(
        model,
        "classification",
        structure=structure,
        rank=rank,
        prior_precision=config.prior_precision,
    )
    la.fit(loader, progress=False)
    la.optimize_prior_precision(method="marglik_temperature", val_loader=val_loader)
    return la, time.perf_counter() - start


def run_demo(
    *,
    structure: str = "all",
    out: str | Path = "laplace-ggn-demo",
    small: bool = False,
    progress: bool = True,
    seed: int = 0,
    stream: TextIO | None = None,
    figures: bool = True,
) -> DemoResult:
    """Run the digits demo, print its tables to ``stream`` and write the figures to ``out``.

    Args:
        structure: One of ``full``, ``diag``, ``kfac``, ``lowrank``, ``projected`` or ``all``
            (every structure this installation provides).
        out: Directory for ``reliability.png``, ``reliability_ood.png``, ``confidence.png``
            and ``metrics.json``.
        small: Use :meth:`DemoConfig.small` (a few seconds).
        progress: Show progress bars on stderr.
        seed: Seed of the split, the noise, the initialisation and the training order.
        stream: Where to print (default ``sys.stdout``).
        figures: Whether to draw the PNG files.

    Returns:
        The :class:`DemoResult`.

    Raises:
        ValueError: If ``structure`` is not one of the choices.
    """
    if structure not in _STRUCTURE_CHOICES:
        raise ValueError(f"structure must be one of {list(_STRUCTURE_CHOICES)}; got {structure!r}.")
    threads = torch.get_num_threads()
    # the demo's matrices are small: one thread is as fast on an idle machine and much
    # faster on a busy one
    torch.set_num_threads(1)
    try:
        return _run_demo(
            structure,
            Path(out),
            small,
            progress,
            seed,
            sys.stdout if stream is None else stream,
            figures,
        )
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    structure: str, out: Path, small: bool, progress: bool, seed: int, stream: TextIO, figures: bool
) -> DemoResult:
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    config = DemoConfig.small() if small else DemoConfig()
    result = DemoResult()

    t0 = time.perf_counter()
    data = load_digits_splits(config, seed=seed)
    t_train = time.perf_counter()
    model = train_mlp(data["x_train"], data["y_train"], config, seed=seed, progress=progress)
    result.n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Trained MLP 64-{config.hidden}-{config.hidden}-10 (P = {result.n_params}) on "
        f"{len(data['y_train'])} digits in {time.perf_counter() - t_train:.1f} s "
        f"(Adam, weight decay = prior precision {config.prior_precision:g} / N).",
        file=stream,
    )
    loader = DataLoader(
        TensorDataset(data["x_train"], data["y_train"]), batch_size=config.batch_size
    )
    val_loader = DataLoader(
        TensorDataset(data["x_val"], data["y_val"]), batch_size=config.batch_size
    )

    probs: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        probs["MAP"] = {k: torch.softmax(model(data[f"x_{k}"]), -1) for k in ("test", "ood")}
    result.metrics["MAP"] = {"fit_s": None, "prior_precision": None, "temperature": None}

    names, result.skipped = _structures(structure)
    bar = tqdm(names, desc="Laplace", disable=not progress, leave=False, file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(f"fit + tune + predict: {name}")
        label = f"LA {name}"
        try:
            la, seconds = _fit_one(name, model, loader, val_loader, config)
            probs[label] = {
                k: la.predict(data[f"x_{k}"], method="glm", link="probit").mean
                for k in ("test", "ood")
            }
        except NotImplementedError as err:
            result.skipped[name] = str(err) or "not implemented"
            continue
        hyper = {
            "prior_precision": float(la.prior_precision.mean()),
            "temperature": float(la.predictive_temperature),
        }
        result.metrics[label] = {"fit_s": seconds, **hyper}
        if name == "projected":  # its samples keep the training predictions: sample the network
            gen = torch.Generator().manual_seed(seed)
            probs[f"{label} (nn)"] = {
                k: la.predict(data[f"x_{k}"], "nn", n_samples=100, generator=gen).mean
                for k in ("test", "ood")
            }
            result.metrics[f"{label} (nn)"] = {"fit_s": seconds, **hyper}

    for label, p in probs.items():
        result.metrics[label]["test"] = _set_metrics(p["test"], data["y_test"])
        result.metrics[label]["ood"] = _set_metrics(p["ood"], data["y_test"])
        result.metrics[label]["ood"]["auroc"] = _auroc(
            p["test"].max(-1).values, p["ood"].max(-1).values
        )

    _print_tables(result, n_test=len(data["y_test"]), stream=stream)
    out.mkdir(parents=True, exist_ok=True)
    if figures:
        result.files.update(_draw(probs, data["y_test"], out))
    metrics_path = out / "metrics.json"
    metrics_path.write_text(
        json.dumps(
            {"n_params": result.n_params, "metrics": result.metrics, "skipped": result.skipped},
            indent=2,
        )
    )
    result.files["metrics"] = metrics_path
    print("\nWrote:", file=stream)
    for path in result.files.values():
        print(f"  {path}", file=stream)
    print(f"Total {time.perf_counter() - t0:.1f} s.", file=stream)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_tables(result: DemoResult, *, n_test: int, stream: TextIO) -> None:
    rows = result.metrics
    w = max(len(k) for k in rows) + 2
    print(
        f"\nIn distribution: {n_test} held-out digits. LA = Laplace, GLM predictive with probit "
        "link ((nn): sampled network), prior precision α tuned by\nthe evidence, predictive "
        "temperature T on a validation split; conf = mean confidence (max probability); fit s = "
        "curvature\npass + tuning.",
        file=stream,
    )
    head = (
        f"{'model':<{w}}{'acc':>7}{'NLL':>8}{'ECE':>8}{'Brier':>8}{'conf':>7}{'α':>9}{'T':>7}"
        f"{'fit s':>8}"
    )
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for name, m in rows.items():
        t = m["test"]
        print(
            f"{name:<{w}}{t['accuracy']:>7.3f}{t['nll']:>8.3f}{t['ece']:>8.3f}{t['brier']:>8.3f}"
            f"{t['confidence']:>7.3f}{_fmt(m['prior_precision'], '9.3g'):>9}"
            f"{_fmt(m['temperature'], '7.3f'):>7}{_fmt(m['fit_s'], '8.2f'):>8}",
            file=stream,
        )
    print(
        f"\nOut of distribution: the same {n_test} digits rotated by 90/180/270 degrees with "
        "pixel noise (true labels kept).\nLower confidence, NLL and ECE are better; AUROC "
        "tells in- from out-of-distribution by confidence.",
        file=stream,
    )
    head = f"{'model':<{w}}{'conf':>7}{'acc':>7}{'NLL':>8}{'ECE':>8}{'Brier':>8}{'AUROC':>8}"
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for name, m in rows.items():
        o = m["ood"]
        print(
            f"{name:<{w}}{o['confidence']:>7.3f}{o['accuracy']:>7.3f}{o['nll']:>8.3f}"
            f"{o['ece']:>8.3f}{o['brier']:>8.3f}{o['auroc']:>8.3f}",
            file=stream,
        )
    for name, reason in result.skipped.items():
        print(f"note: structure {name!r} skipped: {reason}", file=stream)


def _draw(probs: dict[str, dict[str, Tensor]], labels: Tensor, out: Path) -> dict[str, Path]:
    """Draw the reliability diagrams (in / out of distribution) and the confidence histogram.

    Matplotlib stays inside :mod:`laplace_ggn.plots`; this function only saves its figures.

    Returns:
        ``{"reliability", "reliability_ood", "confidence"}`` mapped to the PNG paths.
    """
    from .plots import ConfidenceHistogramDisplay, ReliabilityDisplay

    laplace = [k for k in probs if k != "MAP"]
    # the table has every structure; the figures keep three curves legible
    shown = ["MAP"] + ([k for k in ("LA full", "LA kfac") if k in laplace] or laplace[:2])
    files = {}
    for key, name, title, legend_loc in (
        ("test", "reliability", "Held-out digits (in distribution)", "lower right"),
        ("ood", "reliability_ood", "Rotated + noisy digits (out of distribution)", "upper left"),
    ):
        display = ReliabilityDisplay.from_predictions(
            {k: probs[k][key] for k in shown}, labels, n_bins=10, title=title
        )
        # in distribution the Laplace curves run above the diagonal: legend bottom right
        anchor = (1.0, 0.08) if legend_loc == "lower right" else (0.0, 0.92)
        display.ax_.legend(loc=legend_loc, bbox_to_anchor=anchor, frameon=False, fontsize=9)
        files[name] = out / f"{name}.png"
        display.figure_.savefig(files[name], dpi=110, bbox_inches="tight")

    sets = {
        "in distribution, MAP": probs["MAP"]["test"],
        "rotated + noisy, MAP": probs["MAP"]["ood"],
    }
    if laplace:
        best = shown[1]
        sets[f"in distribution, {best}"] = probs[best]["test"]
        sets[f"rotated + noisy, {best}"] = probs[best]["ood"]
    display = ConfidenceHistogramDisplay.from_predictions(
        sets,
        n_bins=20,
        title="Confidence of the predictions",
        colors=("#56B4E9", "#E69F00", "#0072B2", "#D55E00"),
    )
    display.ax_.set_xlim(0.0, 1.0)
    files["confidence"] = out / "confidence.png"
    display.figure_.savefig(files["confidence"], dpi=110, bbox_inches="tight")
    return files


# ---------------------------------------------------------------------------------- benchmark


def _benchmark_script() -> Path | None:
    """Locate ``benchmarks/run_all.py`` next to the package in a source checkout.

    Returns:
        Its path, or ``None`` when the package is installed without the repository.
    """
    root = Path(__file__).resolve().parent.parent
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


# --------------------------------------------------------------------------------------- main


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
    from . import __version__

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
        choices=_STRUCTURE_CHOICES,
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


if __name__ == "__main__":
    sys.exit(main())
