"""Markdown tables of ``bench_calibration.py``: one per case, and the targets summary."""

from __future__ import annotations

import math

import torch
from _calib_cases import IMAGES, REGRESSION

NAMES = {"digits_mlp": "digits, MLP 64-16-16-10", "digits_cnn": "digits, CNN",
         "deep_mlp": "digits, deep MLP without weight decay", "wine": "wine", "iris": "iris",
         "breast_cancer": "breast cancer", "moons": "two moons",
         "synthetic15": "15-class synthetic", "diabetes": "diabetes",
         "gap": "1-D regression with a gap"}  # fmt: skip


def _cell(vals: list[float], digits: int = 3) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    if t.numel() == 0:
        return ""
    if t.numel() == 1 or math.isnan(float(t.std())):
        return f"{float(t.mean()):.{digits}f}"
    return f"{float(t.mean()):.{digits}f} ± {float(t.std()):.{digits}f}"


def _names(seeds: dict) -> list[str]:
    names: list[str] = []
    for rows in seeds.values():
        names += [n for n in rows if n not in names and not n.startswith("_")]
    return names


def _mean(seeds: dict, row: str, key: str) -> float:
    vals = [r[row][key] for r in seeds.values() if row in r and key in r[row]]
    return sum(vals) / len(vals) if vals else math.nan


def case_table(case: str, seeds: dict) -> str:
    names = _names(seeds)
    first = next(iter(seeds.values()))
    if case in REGRESSION:
        sets = [k[: -len(" cov90")] for k in first[names[0]] if k.endswith(" cov90")]
        cols = [("rmse", "RMSE")] + [(f"{s} nll", f"{s} NLL") for s in sets]
        cols += [(f"{s} cov90", f"{s} 90 % cov.") for s in sets]
        hyper = [("sigma", "σ", 3), ("alpha", "α", 3)]
    else:
        shifts = [k[: -len(" nll")] for k in first["MAP"] if k.endswith(" nll")]
        oods = [k[: -len(" auroc")] for k in first["MAP"] if k.endswith(" auroc")]
        cols = [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE")]
        cols += [(f"{s} nll", f"{s} NLL") for s in shifts]
        cols += [(f"{o} auroc", f"AUROC {o.replace('x10', '×10')}") for o in oods]
        hyper = [("alpha", "α", 3), ("T", "T", 3)]
    head = "| setting | " + " | ".join(c[1] for c in cols) + " | " + " | ".join(h[1] for h in hyper)
    lines = [head + " |", "|---" * (1 + len(cols) + len(hyper)) + "|"]
    for n in names:
        cells = [_cell([r[n][k] for r in seeds.values() if n in r and k in r[n]]) for k, _ in cols]
        hp = []
        for k, _, d in hyper:
            vals = [r[n][k] for r in seeds.values() if n in r and k in r[n]]
            hp.append(", ".join(f"{v:.{d}g}" for v in vals))
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(hp) + " |")
    return "\n".join(lines)


def targets(results: dict) -> str:
    """Targets: in-distribution NLL, shift NLL (images) and the CNN's uniform-noise AUROC."""
    lines = ["| case | MAP NLL | MAP + T NLL | bar | val_loader default NLL: kfac / best structure "
             "(which) | met (kfac) | shift NLL kfac default vs MAP + T |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for case, seeds in results.items():
        if case in REGRESSION:
            continue
        m, mt = _mean(seeds, "MAP", "nll"), _mean(seeds, "MAP + T", "nll")
        collapse = any(r["MAP + T"]["T"] < 0.0101 for r in seeds.values())
        bar = (m if collapse else mt) + 0.01
        defaults = {
            n.split(",")[0]: _mean(seeds, n, "nll")
            for n in _names(seeds)
            if n.endswith("default with val_loader")
        }
        if not defaults:
            continue
        best = min(defaults, key=defaults.get)
        k = defaults.get("kfac", math.nan)
        shift = ""
        if case in IMAGES and "kfac, default with val_loader" in _names(seeds):
            parts = []
            for s in [
                c[: -len(" nll")] for c in next(iter(seeds.values()))["MAP"] if c.endswith(" nll")
            ]:
                a, b = (
                    _mean(seeds, "kfac, default with val_loader", f"{s} nll"),
                    _mean(seeds, "MAP + T", f"{s} nll"),
                )
                parts.append(f"{s}: {a:.3f} vs {b:.3f} ({'met' if a <= b else 'missed'})")
            shift = "; ".join(parts)
        lines.append(
            f"| {NAMES.get(case, case)} | {m:.3f} | {mt:.3f}{' (collapses)' if collapse else ''} | "
            f"{bar:.3f} | {k:.3f} / {defaults[best]:.3f} ({best}) | {'met' if k <= bar else 'missed'} | {shift} |"
        )
    return "\n".join(lines)


def summary(results: dict, structure: str = "kfac") -> str:
    """One line per classification case: MAP, MAP + T, the evidence alone, the default."""
    ev, de = f"{structure}, evidence", f"{structure}, default with val_loader"
    lines = [
        f"| case | MAP NLL | MAP + T NLL | evidence only ({structure}) NLL / ECE | default with "
        f"val_loader ({structure}) NLL / ECE | noise NLL: MAP + T / default | AUROC uniform: "
        "MAP / evidence / default |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, seeds in results.items():
        if case in REGRESSION or de not in _names(seeds):
            continue
        m = lambda row, key: _mean(seeds, row, key)  # noqa: E731
        lines.append(
            f"| {NAMES.get(case, case)} | {m('MAP', 'nll'):.3f} | {m('MAP + T', 'nll'):.3f} | "
            f"{m(ev, 'nll'):.3f} / {m(ev, 'ece'):.3f} | {m(de, 'nll'):.3f} / {m(de, 'ece'):.3f} | "
            f"{m('MAP + T', 'noise nll'):.3f} / {m(de, 'noise nll'):.3f} | "
            f"{m('MAP', 'uniform auroc'):.3f} / {m(ev, 'uniform auroc'):.3f} / "
            f"{m(de, 'uniform auroc'):.3f} |"
        )
    return "\n".join(lines)


def print_tables(results: dict) -> None:
    for case, seeds in results.items():
        secs = [r.get("_seconds", 0) for r in seeds.values()]
        print(f"\n### {NAMES.get(case, case)} (seeds {', '.join(seeds)}; {sum(secs):.0f} s)\n")
        print(case_table(case, seeds))
    print(
        "\n### Targets (mean over seeds; bar = MAP + T's NLL + 0.01, or MAP's where MAP + T collapses)\n"
    )
    print(targets(results))
    print("\n### Summary, the default structure (kfac)\n")
    print(summary(results))
    if "digits_cnn" in results:
        for n in _names(results["digits_cnn"]):
            if n.startswith("kfac") or n.startswith("MAP"):
                print(
                    f"digits CNN uniform-noise AUROC, {n}: {_mean(results['digits_cnn'], n, 'uniform auroc'):.3f}"
                )
