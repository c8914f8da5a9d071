r"""Draws of the linearised network's outputs, jointly consistent across inputs.

.. math::
    f_s(X) = f(X, \theta_*) + J(X)\,(\theta_s - \theta_*), \qquad \theta_s \sim N(\theta_*, \Sigma),

one posterior draw per sample, evaluated on all B inputs, so that the draws over the inputs
have the joint covariance :math:`J(X) \Sigma J(X)^\top` of
:func:`~laplace_ggn.function_space.joint_moments` without any ``(B·C)²`` matrix.  The products
:math:`J(x)(\theta_s - \theta_*)` are Jacobian-vector products without Jacobians: one forward
pass with its pullback :math:`u \mapsto J^\top u`, then the gradient in u of
:math:`u^\top J d_s` (:math:`= J d_s`), vectorised over the draws with :func:`torch.func.vmap`
and chunked over draws and inputs under the memory budget.  This costs about what forward-mode
:func:`torch.func.jvp` costs, but stays in reverse mode, whose state is per thread: torch's
forward-mode levels are shared by the threads of a process: concurrent forward-mode calls
failed ("no level exists") or returned wrong tangents.  A model that cannot run under vmap
uses its Jacobians instead.  For a Linear-head subset (:class:`~laplace_ggn.head.LinearHead`)
the products are the features times the offsets of ``[W b]``, without differentiating the
network.  The draws come from the posterior's ``sample`` (every structure that can sample),
all at once, so a seeded ``generator`` gives the same draws whatever the chunking.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from .._autodiff import cannot_transform
from .._checks import check_computed_finite, check_generator, check_memory, is_integer
from ..batches import batch_size_of
from .jacobians import head_features, outputs_per_sample

__all__ = ["functional_samples", "linearised_outputs"]


def _jvp_chunk(fmodel, x: object, D: Tensor) -> Tensor:
    """``f(x, θ*) + J(x) d_s`` for offsets ``D`` ``(S, P)``, shape ``(S, B, ...)``."""
    theta = fmodel.theta.detach()
    entered = [False]

    def call(th: Tensor) -> Tensor:
        entered[0] = True
        return fmodel(th, x)

    try:
        with torch.enable_grad():
            f, pullback = vjp(call, theta)
            u0 = torch.zeros_like(f)
            # uᵀJd is linear in u: its gradient in u is Jd (reverse mode twice, batched)
            tangents = vmap(lambda d: grad(lambda u: (pullback(u)[0] * d).sum())(u0))(D)
        return (f + tangents).detach()
    except Exception as err:  # noqa: BLE001 -- the model's own errors are re-raised
        if not cannot_transform(err, entered=entered[0]):
            raise
    J, f = fmodel.jacobians(x)
    out = torch.einsum("bmp,sp->sbm", J, D.to(J.dtype))
    return f + out.reshape(D.shape[0], *f.shape)


def linearised_outputs(fmodel, x: object, D: Tensor) -> Tensor:
    r"""Linearised outputs :math:`f(x, \theta_*) + J(x) d_s` for every row of ``D``.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        x: Model input of batch size B (on the model's device).
        D: Parameter offsets :math:`\theta_s - \theta_*`, shape ``(S, P)``.

    Returns:
        Shape ``(S, B, C)`` (``(S, B, T, C)`` for sequence outputs).
    """
    S, P = D.shape
    M = outputs_per_sample(fmodel, x)
    B = batch_size_of(x)
    if B == 0:
        return D.new_zeros(S, *fmodel.forward(x).shape)
    elt = fmodel.theta.element_size()
    # a (draw, input) pair holds its outputs and tangents plus an allowance for activations
    pairs = max(1, fmodel.memory_budget // (32 * max(M, 16) * elt))
    x_chunk = min(B, pairs)
    s_chunk = max(1, min(S, pairs // x_chunk))
    rows = []
    with torch.no_grad():
        for xc in fmodel.chunks(x, x_chunk):
            cols = [_jvp_chunk(fmodel, xc, D[s : s + s_chunk]) for s in range(0, S, s_chunk)]
            rows.append(torch.cat(cols, dim=0))
    return torch.cat(rows, dim=1)


def functional_samples(
    fitted, x: object, n: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """``(n, B, C)`` draws of the linearised network at the inputs (see the module docstring).

    Args:
        fitted: The :class:`~laplace_ggn.FittedLaplace`.
        x: Model input of batch size B.
        n: Number of draws.
        generator: Random generator of the posterior draws (on the model's device).

    Returns:
        Shape ``(n, B, C)`` (``(n, B, T, C)`` for sequence outputs), without observation noise.

    Raises:
        ValueError: If ``n`` is not a positive integer, or the draws ``(n, P)`` or the
            outputs ``(n, B, M)`` exceed ``memory_budget`` (checked before they are formed).
        TypeError: If ``generator`` is not a ``torch.Generator``.
        RuntimeError: If the draws are not finite.
    """
    if not is_integer(n) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}.")
    n = int(n)
    check_generator(generator)
    x = fitted.model_input(x)
    fm, post = fitted.fmodel, fitted.posterior
    P, elt, budget = fm.n_params, fm.theta.element_size(), fm.memory_budget
    hint = "Pass a smaller n (or fewer inputs per call), or raise memory_budget=."
    check_memory(
        n * P * elt, budget, f"the {n} posterior draws of functional_samples (P={P})", hint
    )
    B, M = batch_size_of(x), outputs_per_sample(fm, x)
    check_memory(
        n * B * M * elt, budget, f"the function samples ({n} draws x {B} inputs x M={M})", hint
    )
    with torch.no_grad():
        D = post.sample(n, generator=generator) - post.mean
        got = head_features(fitted, x)
        if got is None:
            out = linearised_outputs(fm, x, D)
        else:  # a Linear head: J d = [W b]-offsets applied to the features
            phi, f = got
            out = f + torch.einsum("nd,scd->snc", phi, D[:, fitted.head.index])
    check_computed_finite(out, "function samples f(x, θ*) + J(x)(θ_s − θ*)")
    return fitted.reader.result(out)
