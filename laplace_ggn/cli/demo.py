"""``laplace-ggn demo``: fit every structure on the digits and compare the predictives."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn

from .data import DemoConfig, load_digits_splits, train_mlp
from .report import draw_figures, print_tables

__all__ = ["DemoResult", "check_out_dir", "run_demo", "structure_choices"]


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
    from .. import calibration as cal

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


def structure_choices() -> tuple[str, ...]:
    """The values ``--structure`` accepts: every structure name, then ``"all"``.

    The names are those of the structure registry (:data:`laplace_ggn.structures.STRUCTURES`)
    and the built-in :class:`~laplace_ggn._checks.Structure` names (a built-in structure
    missing from the registry is reported as not available rather than refused).

    Returns:
        The names in registry order, then ``"all"``.
    """
    from .._checks import Structure

    names = _registered()
    return (*names, *(s.value for s in Structure if s.value not in names), "all")


def _registered() -> list[str]:
    """Names of the registered structures, in registry order.

    Returns:
        The names.
    """
    from ..structures import STRUCTURES

    return list(STRUCTURES)


def _structures(requested: str) -> tuple[list[str], dict[str, str]]:
    """Select the structures to fit now, in the order of the registry.

    Returns:
        ``(names, notes)``: the structures, and ``{name: reason}`` for a missing request.
    """
    available = _registered()
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
    from ..wrapper import LaplaceWrapper

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


def check_out_dir(out: str | Path) -> Path:
    """Check that ``out`` is, or can be made, a directory, before any work is done.

    Args:
        out: The output directory (created by the demo if missing).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``out`` or one of its parents exists and is not a directory.
    """
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                what = "" if path == out else f" (its parent {str(path)!r} is a file)"
                raise ValueError(
                    f"--out must be a directory for the figures and metrics.json; got "
                    f"{str(out)!r}, an existing file{what}. Pass a new or existing directory."
                )
            break
    return out


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
        structure: A registered structure name (``full``, ``diag``, ``kfac``, ``lowrank``,
            ``projected``, ...; see :func:`structure_choices`) or ``all`` (every registered
            structure).
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
        ValueError: If ``structure`` is not one of the choices, or ``out`` is a file.
    """
    choices = structure_choices()
    if structure not in choices:
        raise ValueError(f"structure must be one of {list(choices)}; got {structure!r}.")
    out = check_out_dir(out)  # before the minute of work, not at the end
    threads = torch.get_num_threads()
    # the demo's matrices are small: one thread is as fast on an idle machine and much
    # faster on a busy one
    torch.set_num_threads(1)
    try:
        return _run_demo(
            structure,
            out,
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

    print_tables(result, n_test=len(data["y_test"]), stream=stream)
    out.mkdir(parents=True, exist_ok=True)
    if figures:
        result.files.update(draw_figures(probs, data["y_test"], out))
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
