r"""Automatic differentiation of a per-sample NLL in the outputs, and draws of the outputs.

The pieces :class:`~laplace_ggn.likelihoods.BaseLikelihood` builds on: Hessians by
:func:`torch.func`, their positive semi-definite part, and Monte-Carlo draws of a Gaussian
over the outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from .._checks import DEFAULT_MEMORY_BUDGET

if TYPE_CHECKING:
    from ..posteriors._output import OutputCovariance

__all__ = ["draw_outputs", "nll_hessians", "psd_part"]


def nll_hessians(per_sample_nll, f: Tensor, y: Tensor) -> Tensor:
    r"""Hessians :math:`\nabla^2_f \ell(f_n, y_n)` of a per-sample NLL, shape ``(n, C, C)``.

    One reverse-mode product of the gradient (:func:`torch.func.vjp` of
    :func:`torch.func.grad`) per output column, vectorised over the columns with ``vmap`` (a
    loop where the NLL cannot run under ``vmap``); the rows are independent, so column c of
    every row's Hessian comes from the same product.

    Args:
        per_sample_nll: ``(f (n, C), y) -> (n,)``.
        f: Outputs, shape ``(n, C)``.
        y: Targets with n rows.

    Returns:
        Shape ``(n, C, C)``, not clamped.
    """
    f = f.detach()
    n, C = f.shape
    _, pull = vjp(lambda z: grad(lambda w: per_sample_nll(w, y).sum())(z), f)
    E = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, n, C)
    try:
        (cols,) = vmap(pull)(E)
    except Exception:  # an NLL with data-dependent control flow: one column at a time
        cols = torch.stack([pull(E[c])[0] for c in range(C)])
    return cols.permute(1, 2, 0).contiguous()  # (n, C, C): [n, :, c] = H_n e_c


def psd_part(H: Tensor) -> tuple[Tensor, Tensor]:
    r"""Eigenvectors and clamped eigenvalues of symmetric matrices ``(n, C, C)``.

    Returns:
        ``(U, lam)``: shapes ``(n, C, C)`` and ``(n, C)``, ``lam >= 0``, with
        :math:`[H]_+ = U\,\mathrm{diag}(lam)\,U^\top`.
    """
    lam, U = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
    return U, lam.clamp_min(0)


def draw_outputs(
    mean: Tensor,
    cov: OutputCovariance,
    n_samples: int,
    generator: torch.Generator | None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    r"""S draws :math:`f_s = \mu + L z_s`, :math:`LL^\top = \Sigma_f`, per row; ``(S, N, C)``.

    Returns:
        Shape ``(S, N, C)``.
    """
    from ..links import psd_sqrt  # the links import this package

    N, C = mean.shape
    M = cov.to_dense()
    rows = max(1, int(memory_budget // max(1, 4 * n_samples * C * mean.element_size())))
    out = []
    for start in range(0, N, rows):
        mu, L = mean[start : start + rows], psd_sqrt(M[start : start + rows])
        z = torch.randn(
            (n_samples, *mu.shape), dtype=mu.dtype, device=mu.device, generator=generator
        )
        out.append(mu + torch.einsum("bcd,sbd->sbc", L, z))
    return torch.cat(out, dim=1) if out else mean.new_zeros(n_samples, 0, C)
