"""The demo's tables and figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from torch import Tensor

if TYPE_CHECKING:
    from .demo import DemoResult

__all__ = ["draw_figures", "print_tables"]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(result: DemoResult, *, n_test: int, stream: TextIO) -> None:
    """Print the in- and out-of-distribution tables and the notes on skipped structures.

    Args:
        result: The demo's measurements.
        n_test: Number of held-out digits.
        stream: Where to print.
    """
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


def draw_figures(probs: dict[str, dict[str, Tensor]], labels: Tensor, out: Path) -> dict[str, Path]:
    """Draw the reliability diagrams (in / out of distribution) and the confidence histogram.

    Matplotlib stays inside :mod:`laplace_ggn.plots`; this function only saves its figures.

    Returns:
        ``{"reliability", "reliability_ood", "confidence"}`` mapped to the PNG paths.
    """
    from ..plots import ConfidenceHistogramDisplay, ReliabilityDisplay

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
