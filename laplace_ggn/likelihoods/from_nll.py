r"""A likelihood from a user's per-sample negative log likelihood: :func:`from_nll`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import shape_str
from .base import BaseLikelihood

__all__ = ["NLLLikelihood", "from_nll"]


class NLLLikelihood(BaseLikelihood):
    """The likelihood :func:`from_nll` returns (see there)."""

    def __init__(
        self,
        nll: Callable[[Tensor, Tensor], Tensor],
        mean: Callable[[Tensor], Tensor] | None,
        sample: Callable[..., Tensor] | None,
        name: str,
    ):
        self._nll, self._mean, self._sample, self.name = nll, mean, sample, name
        self.identity_response = mean is None
        self.samples_targets = sample is not None

    def per_sample_nll(self, f: Tensor, y: Tensor) -> Tensor:
        """The user's NLL, checked to return one value per row.

        Returns:
            Shape ``(n,)``.

        Raises:
            ValueError: If it returns another shape.
        """
        out = self._nll(f, y)
        if not isinstance(out, Tensor) or tuple(out.shape) != (f.shape[0],):
            got = shape_str(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"nll must return the NLL of each row, shape ({f.shape[0]},) for outputs "
                f"{shape_str(f.shape)}; got {got}. Do not reduce over the batch."
            )
        return out

    def response(self, f: Tensor) -> Tensor:
        """``mean(f)``, or ``f`` without ``mean``."""
        return f if self._mean is None else self._mean(f)

    def sample_targets(self, f: Tensor, generator: torch.Generator | None) -> Tensor:
        """``sample(f, generator)``.

        Returns:
            The targets drawn.

        Raises:
            ValueError: If no ``sample`` was given.
        """
        if self._sample is None:
            raise ValueError(
                f"sample must be given to from_nll(..., sample=...) for curvature='mc' with "
                f"likelihood {self.name!r}; got None."
            )
        return self._sample(f, generator)


def from_nll(
    nll: Callable[[Tensor, Tensor], Tensor],
    *,
    mean: Callable[[Tensor], Tensor] | None = None,
    sample: Callable[..., Tensor] | None = None,
    name: str | None = None,
) -> NLLLikelihood:
    r"""A likelihood from a per-sample negative log likelihood; the rest by ``torch.func``.

    The output curvature is the Hessian of ``nll`` in the outputs, clamped to its positive
    semi-definite part (see :mod:`laplace_ggn.likelihoods.base`); for a log-concave
    likelihood (Gaussian, categorical, Poisson, ...) nothing is clamped and the curvature is
    the exact GGN.  It may depend on the targets.

    Args:
        nll: ``nll(f, y) -> (n,)``: outputs ``(n, C)``, targets with n rows; the rows must be
            independent (no reduction over the batch).
        mean: Maps outputs ``(..., C)`` to the predictive mean (e.g. ``softmax``); the
            predictive then averages it over Monte-Carlo draws. ``None``: the outputs
            themselves (the exact Gaussian predictive of the outputs).
        sample: ``sample(f, generator) -> y``: targets drawn from the model, needed by
            ``curvature="mc"`` only.
        name: The likelihood's name in messages and saved states (default ``nll.__name__``).

    Returns:
        The likelihood, for ``LaplaceWrapper(model, likelihood=...)``.

    Raises:
        TypeError: If ``nll``, ``mean`` or ``sample`` is not callable, or ``name`` not a str.

    Example:
        >>> import torch
        >>> def sq(f, y):
        ...     return 0.5 * ((f - y) ** 2).sum(-1)
        >>> lik = from_nll(sq)
        >>> lik.hessian(torch.zeros(2, 3), torch.ones(2, 3))[0]
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    if not callable(nll):
        raise TypeError(f"nll must be callable (f, y) -> (n,); got {type(nll).__name__}.")
    for arg, value in (("mean", mean), ("sample", sample)):
        if value is not None and not callable(value):
            raise TypeError(f"{arg} must be callable or None; got {type(value).__name__}.")
    if name is None:
        name = getattr(nll, "__name__", "custom")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str or None; got {name!r}.")
    return NLLLikelihood(nll, mean, sample, name)
