r"""Jacobians at θ* that keep the graph to the inputs, and the outputs per sample.

The read paths of :mod:`laplace_ggn.jacobians` detach their Jacobians; a differentiable
predictive needs :math:`\partial J(x) / \partial x`, so here the per-sample Jacobians come from
:func:`torch.func.vmap` over samples of :func:`torch.func.jacrev`, whose result stays
connected to ``x`` (second derivatives of the network).  A model that cannot run under vmap
uses :func:`torch.autograd.functional.jacobian` of the whole batch with ``create_graph=True``
instead (the samples do not interact in eval mode).  θ* is detached: nothing reaches the
network's or the posterior's tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_map

from .._autodiff import cannot_transform
from .._checks import check_memory
from ..batches import batch_size_of

__all__ = [
    "check_differentiable_bytes",
    "head_features",
    "head_jacobians",
    "jacobians_with_graph",
    "outputs_per_sample",
]


def outputs_per_sample(fmodel, x: object) -> int:
    """M, the outputs of one sample (C, or T·C for outputs ``(B, T, C)``); one forward pass.

    Returns:
        M (0 for an input of 0 rows).
    """
    first = next(iter(fmodel.chunks(x, 1)), None)
    return 0 if first is None else fmodel.forward(first)[0].numel()


def check_differentiable_bytes(fmodel, B: int, M: int, what: str) -> None:
    """Refuse the Jacobians and their graph (about 4·B·M·P numbers) over the budget.

    Raises:
        ValueError: Naming the size and the way out.
    """
    P, elt = fmodel.n_params, fmodel.theta.element_size()
    check_memory(
        4 * B * M * P * elt,
        fmodel.memory_budget,
        f"the Jacobians of {what} with their graph ({B} inputs x M={M} outputs x P={P})",
        "Pass fewer inputs per call, use a smaller subset (subset='last_layer'), "
        "or raise memory_budget=.",
    )


def jacobians_with_graph(fmodel, x: object, M: int) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobians ``(B, M, P)`` and outputs at θ*, differentiable in ``x``.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        x: Model input of batch size B (on the model's device), possibly requiring grad.
        M: Outputs per sample.

    Returns:
        ``(J, f)``: J of shape ``(B, M, P)`` and the outputs ``(B, C)`` (``(B, T, C)``).
    """
    theta = fmodel.theta.detach()
    if batch_size_of(x) == 0:
        return theta.new_zeros(0, M, theta.numel()), fmodel.forward(x)
    entered = [False]

    def f_single(th: Tensor, xs: object) -> tuple[Tensor, Tensor]:
        entered[0] = True
        xb = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, xs)
        out = fmodel(th, xb)[0]
        return out.reshape(-1), out

    with torch.enable_grad():
        try:
            return vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(theta, x)
        except Exception as err:  # noqa: BLE001 -- the model's own errors are re-raised
            if not cannot_transform(err, entered=entered[0]):
                raise
        f = fmodel(theta, x)
        J = torch.autograd.functional.jacobian(
            lambda th: fmodel(th, x).reshape(f.shape[0], -1), theta, create_graph=True
        )
    return J, f


def head_features(fitted, x: object) -> tuple[Tensor, Tensor] | None:
    r"""Features :math:`\tilde\phi` ``(B, D)`` and outputs ``(B, C)`` of a Linear-head subset.

    Returns:
        ``(phi, f)``, or ``None`` when the subset is not one Linear output layer, the call
        does not fit it (see :class:`~laplace_ggn.head.LinearHead`) or the outputs are not 2-D.
    """
    head = fitted.head
    if head is None or batch_size_of(x) == 0:
        return None
    got = head.features(x)
    if got is None or got[1].ndim != 2:
        return None
    return got


def head_jacobians(fitted, x: object) -> tuple[Tensor, Tensor] | None:
    r"""Jacobians ``(B, C, P)`` of a Linear head from its features, :math:`J_n = I_C \otimes \tilde\phi_n^\top`.

    Returns:
        ``(J, f)`` without differentiating through the network, or ``None`` (see
        :func:`head_features`).
    """
    got = head_features(fitted, x)
    if got is None:
        return None
    phi, f = got
    index = fitted.head.index  # (C, D) flat positions of [W b]
    C, D = index.shape
    J = phi.new_zeros(phi.shape[0], C, fitted.n_params)
    rows = torch.arange(C, device=index.device)[:, None].expand(C, D)
    J[:, rows, index] = phi[:, None, :].expand(-1, C, D)
    return J, f
