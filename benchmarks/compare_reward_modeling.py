"""Reward modelling: laplace_ggn against laplace-torch 0.3's ``Likelihood.REWARD_MODELING``.

The setting of laplace-torch's ``test_reward_modeling``: preference pairs ``X`` of shape
``(10, 2, 3)``, targets ``y ∈ {0, 1}`` (the preferred candidate), batches of 3, a reward model
``Linear(3, 20) -> Linear(20, 1)`` (here also with a tanh, and in float64 for the comparison),
full / diag / kron Hessians on all weights and on the last layer.  laplace-torch's model takes
the pairs itself (``(B, 2, 3) -> (B, 2)`` for the fit, ``(B, 3) -> (B, 1)`` at prediction); ours
scores one candidate at a time, ``(B·2, 3) -> (B·2, 1)``, and the wrapper forms the pairs.

Printed per structure: the largest absolute difference of the GGN (laplace-torch's ``H``; the
dense Kronecker matrix for kron) and of the GLM predictive variance of single items, and
whether both are within 1e-6.  Kron is compared on bias-free models: laplace-torch keeps a
layer's bias in a Kronecker block of its own, ours appends a column of ones to the input
factor, so with biases the two KFACs differ by construction.  laplace-torch's last-layer
diag fails on pair inputs (its last-layer Jacobians expect 2-D features).

Run: ``PYTHONPATH=. .bench-venv/bin/python benchmarks/compare_reward_modeling.py``
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper

DT = torch.float64


class PairModel(nn.Module):
    """laplace-torch's reward-model convention around a scorer of single candidates."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out.squeeze(-1) if x.ndim == 3 else out


MODELS = {
    "Linear-Linear": (False, True),
    "Linear-tanh-Linear": (True, True),
    "Linear-tanh-Linear, no bias": (True, False),
}


def _scorer(name: str, seed: int) -> nn.Module:
    hidden, bias = MODELS[name]
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 20, bias=bias)] + ([nn.Tanh()] if hidden else [])
    return nn.Sequential(*layers, nn.Linear(20, 1, bias=bias)).to(DT)


def _theirs(scorer, loader, structure: str, subset: str, x_test):
    from laplace import Laplace

    lap = Laplace(
        PairModel(scorer),
        "reward_modeling",
        subset_of_weights=subset,
        hessian_structure=structure,
    )
    lap.fit(loader)
    H = lap.H
    if structure == "kron":
        H = H.to_matrix()
    _, f_var = lap(x_test, pred_type="glm")
    return H.detach(), f_var.reshape(x_test.shape[0], -1).detach()


def _ours(scorer, loader, structure: str, subset: str, x_test):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(
            scorer,
            "reward_modeling",
            structure={"kron": "kfac"}.get(structure, structure),
            subset=subset,
        ).fit(loader)
    post = la.posterior
    if structure == "full":
        G = post.ggn
    elif structure == "diag":
        G = post.ggn_diag
    else:
        G = post.curvature.to_dense()
    return G, la.predict(x_test).variance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print("| model | subset | structure | max |ΔGGN| | max |GGN| | max |Δvar| | max var | ≤ 1e-6 |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(10, 2, 3, generator=g, dtype=DT)
        y = torch.randint(2, (10,), generator=g)
        x_test = torch.randn(10, 3, generator=g, dtype=DT)
        loader = DataLoader(TensorDataset(X, y), batch_size=3)
        for model in MODELS:
            for subset in ("all", "last_layer"):
                for structure in ("full", "diag", "kron"):
                    scorer = _scorer(model, seed)
                    name = f"seed {seed}, {model}"
                    G, w = _ours(scorer, loader, structure, subset, x_test)
                    if structure == "kron" and MODELS[model][1]:
                        print(
                            f"| {name} | {subset} | kron | not comparable: laplace-torch keeps "
                            "a bias's Kronecker block apart from its weight's (ours appends "
                            "a column of ones to A) | | | | – |"
                        )
                        continue
                    try:
                        H, v = _theirs(scorer, loader, structure, subset, x_test)
                    except Exception as err:  # noqa: BLE001 -- reported in the table
                        msg = f"{type(err).__name__}: {str(err)[:60]}"
                        print(
                            f"| {name} | {subset} | {structure} | laplace-torch fails: {msg} "
                            f"| | | {float(w.abs().max()):.3g} (ours) | – |"
                        )
                        continue
                    dG = float((G - H).abs().max())
                    dv = float((w - v).abs().max())
                    ok = dG <= 1e-6 and dv <= 1e-6
                    worst = max(worst, dG, dv)
                    print(
                        f"| {name} | {subset} | {structure} | {dG:.2e} | "
                        f"{float(H.abs().max()):.3g} | {dv:.2e} | {float(v.abs().max()):.3g} | "
                        f"{'yes' if ok else 'NO'} |"
                    )
    print(f"\nlargest difference over every row: {worst:.2e}")


if __name__ == "__main__":
    main()
