r"""The curvature a posterior holds, added to another and read as a quadratic form.

Continual fits combine the curvature of two passes over data (:func:`add_curvature`) and
evaluate :math:`v^\top G v` of a held curvature G (:func:`curvature_quadratic`).  Both are
defined per structure, by the structure's name, from the tensors of the posterior's
``state_dict()`` (the curvature part, the prior excluded):

- ``full``: :math:`G = G_1 + G_2`, exact.
- ``diag``: :math:`g = g_1 + g_2`, exact.
- ``lowrank``: the eigenpairs of :math:`U_1\Lambda_1U_1^\top + U_2\Lambda_2U_2^\top` from the
  thin SVD of :math:`[U_1\Lambda_1^{1/2}\ U_2\Lambda_2^{1/2}]`: exact when both hold all their
  eigenpairs (``rank=None``); with ``rank=k`` the top k of the sum of the two top-k
  approximations are kept.
- ``kfac``: the factors of each layer are combined as one fit on the union of the data would
  collect them, :math:`A = A_1 + A_2` (sums) and :math:`B = (N_1B_1 + N_2B_2)/(N_1+N_2)`
  (means, weighted by the number of observations), and the exact diagonal part is summed.
  At the same weights this *is* the KFAC of one fit on the union (for layers with one row per
  observation); it is not the sum of the two KFAC curvatures
  :math:`B_1\otimes A_1 + B_2\otimes A_2`, which is not a Kronecker product: the combined
  block minus that sum is
  :math:`-\tfrac{N_1N_2}{N_1+N_2}(B_1-B_2)\otimes(A_1/N_1 - A_2/N_2)`, zero when the two
  data sets have the same mean input or the same mean output factor.

Other structures (``projected``, user-registered ones) refuse, naming these four.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..kfac import kron_index

__all__ = ["CONTINUAL_STRUCTURES", "add_curvature", "check_continual", "curvature_quadratic"]

#: The structures whose curvature can be added to and read as a quadratic form.
CONTINUAL_STRUCTURES = ("full", "diag", "kfac", "lowrank")


def check_continual(structure: str, what: str, sigma_noise: Tensor | None = None) -> None:
    """Refuse a structure outside :data:`CONTINUAL_STRUCTURES`, or one σ per output.

    Args:
        structure: The structure's name.
        what: The operation, for the message.
        sigma_noise: The fit's σ (a fit with one σ per output holds one curvature per output).

    Raises:
        ValueError: Naming the structures that support it, or the shape of σ.
    """
    if sigma_noise is not None and sigma_noise.ndim > 0:
        raise ValueError(
            f"{what} needs one observation noise for every output; got sigma_noise of shape "
            f"{tuple(sigma_noise.shape)} (one per output, whose fit holds one curvature per "
            "output). Fit with a scalar sigma_noise."
        )
    if structure not in CONTINUAL_STRUCTURES:
        raise ValueError(
            f"{what} needs structure 'full', 'diag', 'kfac' or 'lowrank'; got structure="
            f"{structure!r}, whose curvature cannot be added to or evaluated as a quadratic form."
        )


# -- adding curvature -------------------------------------------------------------------------


def _add_full(a: dict, b: dict, n_a: int, n_b: int, rank: int | None) -> dict:
    return {"ggn": a["ggn"] + b["ggn"]}


def _add_diag(a: dict, b: dict, n_a: int, n_b: int, rank: int | None) -> dict:
    return {"ggn_diag": a["ggn_diag"] + b["ggn_diag"]}


def _add_lowrank(a: dict, b: dict, n_a: int, n_b: int, rank: int | None) -> dict:
    W = torch.cat(
        [
            a["eigenvectors"] * a["eigenvalues"].clamp_min(0).sqrt(),
            b["eigenvectors"] * b["eigenvalues"].clamp_min(0).sqrt(),
        ],
        dim=1,
    )
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    if S.numel():
        keep = S > S.max() * max(W.shape) * torch.finfo(W.dtype).eps
        U, S = U[:, keep], S[keep]
    if rank is not None:
        U, S = U[:, :rank], S[:rank]
    return {"eigenvalues": S**2, "eigenvectors": U}


def _add_kfac(a: dict, b: dict, n_a: int, n_b: int, rank: int | None) -> dict:
    w_a, w_b = n_a / (n_a + n_b), n_b / (n_a + n_b)
    out = dict(a, diag=a["diag"] + b["diag"])
    for i in range(int(a["n_blocks"])):
        out[f"block.{i}.A"] = a[f"block.{i}.A"] + b[f"block.{i}.A"]
        out[f"block.{i}.B"] = w_a * a[f"block.{i}.B"] + w_b * b[f"block.{i}.B"]
    return out


_ADD: dict[str, Callable[[dict, dict, int, int, int | None], dict]] = {
    "full": _add_full,
    "diag": _add_diag,
    "lowrank": _add_lowrank,
    "kfac": _add_kfac,
}


def add_curvature(
    structure: str, first: dict, second: dict, n_first: int, n_second: int, rank: int | None
) -> dict:
    """The curvature state of two fits combined (see the module docstring).

    Args:
        structure: The structure's name.
        first: ``posterior.state_dict()`` of the first fit.
        second: ``posterior.state_dict()`` of the second fit.
        n_first: Observations N₁ of the first fit.
        n_second: Observations N₂ of the second fit.
        rank: ``rank=`` of a top-k low-rank structure (``None``: keep every eigenpair).

    Returns:
        The combined state, for the structure's ``from_state_dict``.

    Raises:
        ValueError: If the structure is not one of :data:`CONTINUAL_STRUCTURES`.
    """
    check_continual(structure, "fit(accumulate=True)")
    return _ADD[structure](first, second, n_first, n_second, rank)


# -- quadratic forms --------------------------------------------------------------------------


def _quad_full(state: dict, layout, V: Tensor) -> Tensor:
    return ((V @ state["ggn"]) * V).sum(-1)


def _quad_diag(state: dict, layout, V: Tensor) -> Tensor:
    return (state["ggn_diag"] * V**2).sum(-1)


def _quad_lowrank(state: dict, layout, V: Tensor) -> Tensor:
    return (state["eigenvalues"] * (V @ state["eigenvectors"]) ** 2).sum(-1)


def _quad_kfac(state: dict, layout, V: Tensor) -> Tensor:
    out = torch.zeros(V.shape[:-1], dtype=V.dtype, device=V.device)
    for i in range(int(state["n_blocks"])):
        A, B = state[f"block.{i}.A"], state[f"block.{i}.B"]
        w, b = state[f"block.{i}.weight"], state[f"block.{i}.bias"]
        idx = kron_index(layout, w, b, B.shape[0], A.shape[0]).to(V.device)
        Z = V[..., idx]  # (..., O, D), row-major vec(Z) in Kronecker order
        out = out + ((B @ Z) * (Z @ A)).sum((-2, -1))
    names = state["diag_names"]
    if names:
        di = torch.cat(
            [torch.arange(layout.slice_of(n).start, layout.slice_of(n).stop) for n in names]
        )
        out = out + (state["diag"] * V[..., di.to(V.device)] ** 2).sum(-1)
    return out


_QUAD: dict[str, Callable[[dict, object, Tensor], Tensor]] = {
    "full": _quad_full,
    "diag": _quad_diag,
    "lowrank": _quad_lowrank,
    "kfac": _quad_kfac,
}


def curvature_quadratic(structure: str, state: dict, layout, V: Tensor) -> Tensor:
    r""":math:`v^\top G v` of the unit-noise curvature G held in a posterior's state.

    Args:
        structure: The structure's name.
        state: ``posterior.state_dict()``.
        layout: The subset's :class:`~laplace_ggn.layout.ParamLayout`.
        V: Vectors, shape ``(P,)`` or ``(..., P)``.

    Returns:
        The quadratic forms, shape ``V.shape[:-1]``; differentiable in ``V``.

    Raises:
        ValueError: If the structure is not one of :data:`CONTINUAL_STRUCTURES`.
    """
    check_continual(structure, "a quadratic form of the curvature")
    return _QUAD[structure](state, layout, V)
