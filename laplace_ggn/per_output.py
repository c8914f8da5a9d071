r"""One observation noise per output: the curvature kept per output, combined for any σ.

With :math:`\sigma \in \mathbb R^D` the Gaussian's output Hessian is
:math:`\mathrm{diag}(\sigma^{-2})`, so the GGN is a weighted sum of one curvature per output,

.. math::
    G(\sigma) = \sum_d \sigma_d^{-2} G_d, \qquad G_d = \sum_n J_{nd}^\top J_{nd},

and no single unit-noise curvature can be rescaled to another σ.  A fit with
``sigma_noise`` of shape ``(D,)`` therefore collects the D curvatures :math:`G_d` (D
collectors in the one pass over the data, each back-propagating the column of its output;
D times the memory of the structure) and the squared error of each output;
:class:`PerOutputPosterior` builds the structure's posterior of
:math:`\tau^{-1} G(\sigma) + \Lambda_0` for any σ without a new pass, differentiably in σ,
so that the evidence tunes every σ_d.  Structures: ``full``, ``diag`` and ``kfac`` (the
Kronecker factors of the outputs share their input factor A, so
:math:`\sum_d s_d (A \otimes B_d) = A \otimes \sum_d s_d B_d`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import Curvature, Structure, check_finite
from .collectors.base import Collector, Reduction
from .kfac import KFACCurvature, KroneckerBlock
from .likelihoods import OutputCurvature, observations

__all__ = [
    "PER_OUTPUT_STRUCTURES",
    "PerOutputCollector",
    "PerOutputCurvature",
    "PerOutputPosterior",
    "build_posterior",
    "check_per_output",
    "combine_curvatures",
    "make_collector",
    "output_loss_sums",
    "restore_posterior",
    "split_state",
]

#: Structures whose curvature is kept per output for ``sigma_noise`` of shape ``(D,)``.
PER_OUTPUT_STRUCTURES = (Structure.FULL.value, Structure.DIAG.value, Structure.KFAC.value)

_CURVATURE_OF = {
    Structure.FULL.value: lambda post: post.ggn,
    Structure.DIAG.value: lambda post: post.ggn_diag,
    Structure.KFAC.value: lambda post: post.curvature,
}


def check_per_output(structure: str, curvature: Curvature, sigma: Tensor) -> None:
    """Refuse ``sigma_noise`` of shape ``(D,)`` with a structure or curvature that cannot keep it.

    Raises:
        ValueError: For another structure than full / diag / kfac, or ``curvature="mc"``.
    """
    if sigma.ndim == 0:
        return
    if structure not in PER_OUTPUT_STRUCTURES:
        raise ValueError(
            f"sigma_noise of shape {tuple(sigma.shape)} (one σ per output) applies to structures "
            f"{list(PER_OUTPUT_STRUCTURES)}; got structure={structure!r}. Use a scalar "
            "sigma_noise, or one of these structures."
        )
    if curvature is Curvature.MC:
        raise ValueError(
            f"sigma_noise of shape {tuple(sigma.shape)} (one σ per output) needs "
            "curvature='ggn'; got curvature='mc', whose sampled columns mix the outputs."
        )


class _OutputColumn:
    r"""The output metric :math:`e_d e_d^\top` of output d (the Gaussian's column d at σ = 1)."""

    needs_targets = False
    name = "regression"

    def __init__(self, d: int):
        self.d = d

    def _e(self, f: Tensor) -> Tensor:
        e = torch.zeros(f.shape[-1], dtype=f.dtype, device=f.device)
        e[self.d] = 1.0
        return e

    def sqrt_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """One column :math:`e_d`, shape ``(n, C, 1)``."""
        return self._e(f).reshape(1, -1, 1).expand(f.shape[0], -1, 1)

    def hessian_matvec(self, f: Tensor, u: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`e_d e_d^\top u`, shape of ``u``."""
        return u * self._e(f)

    def hessian_diagonal(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """:math:`e_d` per row, shape ``(n, C)``."""
        return self._e(f).expand(f.shape[0], -1)

    def hessian_sum(self, f: Tensor, w: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`(\sum_n w_n) e_d e_d^\top`, shape ``(C, C)``."""
        return torch.diag(self._e(f)) * w.sum()


@dataclass(frozen=True)
class PerOutputCurvature:
    """The D unit-noise curvatures :math:`G_d` and the squared error of each output ``(D,)``."""

    parts: tuple
    squared_errors: Tensor


class PerOutputCollector(Collector):
    """D collectors of the structure, one per output, in the one pass; and Σ(y_d - f_d)².

    Args:
        make_collector: ``output_curvature -> collector`` of the structure.
        likelihood: The Gaussian (checks the targets).
        n_outputs: D.
        ignore_index: Passed to the output curvatures (regression never skips).

    Distributed use: the states of the D collectors (prefixed ``out<d>.``) and
    ``squared_errors`` are reduced as their own declarations say.
    """

    def __init__(self, make_collector, likelihood, n_outputs: int, ignore_index: int):
        super().__init__()
        self.likelihood, self.D = likelihood, int(n_outputs)
        self.parts = [
            make_collector(
                OutputCurvature(_OutputColumn(d), targets=likelihood, ignore_index=ignore_index)
            )
            for d in range(self.D)
        ]
        self._sse = torch.zeros(self.D, dtype=torch.float64)

    def update(self, x: object, where: str = "", *, y: Tensor | None = None) -> Tensor:
        """Add one batch to every output's curvature and squared error; returns the outputs.

        Returns:
            The outputs f of the batch.

        Raises:
            ValueError: If the model has another number of outputs than σ entries.
        """
        f = self.parts[0].update(x, where, y=y)
        if f.shape[-1] != self.D:
            raise ValueError(
                f"sigma_noise must have one entry per model output; got shape ({self.D},) for a "
                f"model with {f.shape[-1]} outputs ({where or 'first batch'})."
            )
        for part in self.parts[1:]:
            part.update(x, where, y=y)
        if y is not None:
            f_obs, y_obs, _ = observations(self.likelihood, f, y.to(f.device), where=where)
            err = ((y_obs.to(torch.float64) - f_obs.to(torch.float64)) ** 2).sum(0).cpu()
            check_finite(err, "squared error", where)
            self._sse = self._sse + err
        return f

    def finalize(self) -> PerOutputCurvature:
        """The D curvatures and the squared errors.

        Returns:
            The :class:`PerOutputCurvature`.
        """
        return PerOutputCurvature(tuple(p.finalize() for p in self.parts), self._sse.clone())

    def distributed_state(self) -> dict[str, tuple[Tensor, Reduction]]:
        """Every output collector's states, prefixed, and the squared errors (summed)."""
        state = {"squared_errors": (self._sse, Reduction.SUM)}
        for d, part in enumerate(self.parts):
            state.update({f"out{d}.{k}": v for k, v in part.distributed_state().items()})
        return state

    def load_distributed_state(self, state: dict[str, Tensor]) -> None:
        """Load the reduced states into the output collectors."""
        if "squared_errors" in state:
            self._sse = state["squared_errors"].to(torch.float64).cpu()
        for d, part in enumerate(self.parts):
            prefix = f"out{d}."
            part.load_distributed_state(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )


def combine_curvatures(parts: tuple, weights: Tensor) -> object:
    r""":math:`\sum_d w_d G_d` of the per-output curvatures (differentiable in the weights).

    Args:
        parts: D curvatures of one structure (tensors, or :class:`~laplace_ggn.kfac.KFACCurvature`).
        weights: Shape ``(D,)``.

    Returns:
        A curvature of the same kind.
    """
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.einsum("d,d...->...", weights.to(first.dtype), torch.stack(parts))
    blocks = tuple(
        KroneckerBlock(
            blk.weight,
            blk.bias,
            blk.A,
            torch.einsum("d,dij->ij", weights, torch.stack([p.blocks[i].B for p in parts])),
        )
        for i, blk in enumerate(first.blocks)
    )
    diag = torch.einsum("d,dp->p", weights, torch.stack([p.diag for p in parts]))
    return KFACCurvature(first.layout, blocks, first.diag_names, diag)


class PerOutputPosterior:
    r"""The posterior of :math:`\tau^{-1}\sum_d \sigma_d^{-2} G_d + \Lambda_0` in a structure.

    Delegates the :class:`~laplace_ggn.posteriors.Posterior` protocol to the structure's
    posterior of the combined curvature (built with scale 1); :meth:`with_prior` with a
    scale ``(D,)`` combines again.  It has no shared spectrum: the evidence is tuned through
    autograd.

    Args:
        spec: The structure's :class:`~laplace_ggn.structures.StructureSpec`.
        parts: The D unit-noise curvatures.
        mean: θ*, shape ``(P,)``.
        prior: The prior.
        scale: :math:`1/(\tau\sigma_d^2)`, shape ``(D,)``.
        options: The structure's options.
    """

    def __init__(self, spec, parts: tuple, mean: Tensor, prior, scale: Tensor, options):
        self.spec, self.parts, self.options = spec, tuple(parts), options
        self.mean, self.prior = mean, prior
        self.scale = torch.as_tensor(scale, dtype=mean.dtype, device=mean.device)
        self.inner = spec.build(
            combine_curvatures(self.parts, self.scale), mean, prior, 1.0, options
        )

    @property
    def n_params(self) -> int:
        """P."""
        return self.mean.shape[0]

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``(n, P)`` draws (see the structure's posterior)."""
        return self.inner.sample(n, generator=generator)

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """Σ V, shapes ``(P,)`` or ``(P, K)``."""
        return self.inner.covariance_matvec(V)

    def log_det(self) -> Tensor:
        """log|Λ| of the precision (not of Σ), shape ``()``."""
        return self.inner.log_det()

    def functional_covariance(self, J: Tensor) -> Tensor:
        """J Σ Jᵀ for Jacobians ``(B, C, P)``, shape ``(B, C, C)``."""
        return self.inner.functional_covariance(J)

    def to_dense(self) -> Tensor:
        """Σ, shape ``(P, P)``."""
        return self.inner.to_dense()

    def linear_head_covariance(self, phi: Tensor, index: Tensor):
        """The structure's covariances of a Linear head (see its posterior).

        Returns:
            The factored output covariances.
        """
        return self.inner.linear_head_covariance(phi, index)

    def with_prior(self, prior, scale: Tensor | None = None) -> PerOutputPosterior:
        """The posterior under another prior and per-output scale ``(D,)`` (no pass over data).

        Returns:
            The new posterior.
        """
        scale = self.scale if scale is None else torch.as_tensor(scale).expand(len(self.parts))
        return PerOutputPosterior(self.spec, self.parts, self.mean, prior, scale, self.options)

    def state_dict(self) -> dict[str, object]:
        """``n_outputs`` and each output's curvature as its structure saves it (``out<d>.``)."""
        state: dict[str, object] = {"n_outputs": len(self.parts)}
        for d, part in enumerate(self.parts):
            post = self.spec.build(part, self.mean, self.prior, 1.0, self.options)
            state.update({f"out{d}.{k}": v for k, v in post.state_dict().items()})
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict, spec, mean: Tensor, prior, scale: Tensor, options
    ) -> PerOutputPosterior:
        """Rebuild from :meth:`state_dict`.

        Returns:
            The posterior.
        """
        parts = []
        for d in range(int(state["n_outputs"])):
            sub = {k[len(f"out{d}.") :]: v for k, v in state.items() if k.startswith(f"out{d}.")}
            post = spec.posterior_cls.from_state_dict(sub, mean, prior, torch.ones(()))
            parts.append(_CURVATURE_OF[spec.name](post))
        return cls(spec, tuple(parts), mean, prior, scale, options)


def split_state(state: dict) -> list[dict]:
    """The saved per-output posterior state as one state per output (for checking).

    Returns:
        The D sub-states.

    Raises:
        ValueError: If ``n_outputs`` is not a positive int.
    """
    D = state.get("n_outputs")
    if isinstance(D, bool) or not isinstance(D, int) or D < 1:
        raise ValueError(
            f"state['posterior']['n_outputs'] must be a positive int (one σ per output); got {D!r}."
        )
    return [
        {k[len(f"out{d}.") :]: v for k, v in state.items() if k.startswith(f"out{d}.")}
        for d in range(D)
    ]


# ---------------------------------------------------------------------------------------------
# The fit's entry points: a scalar σ goes to the structure as it is
# ---------------------------------------------------------------------------------------------


def make_collector(spec, fmodel, curvature, options, likelihood, sigma: Tensor, ignore_index: int):
    """The structure's collector, or :class:`PerOutputCollector` for σ of shape ``(D,)``.

    Returns:
        The collector.
    """
    if sigma.ndim == 0:
        return spec.make_collector(fmodel, curvature, options)
    return PerOutputCollector(
        lambda curv: spec.make_collector(fmodel, curv, options),
        likelihood,
        sigma.shape[0],
        ignore_index,
    )


def build_posterior(spec, curvature, mean: Tensor, prior, scale: Tensor, options):
    """The structure's posterior, or :class:`PerOutputPosterior` of per-output curvatures.

    Returns:
        The posterior.
    """
    if isinstance(curvature, PerOutputCurvature):
        return PerOutputPosterior(spec, curvature.parts, mean, prior, scale, options)
    return spec.build(curvature, mean, prior, scale, options)


def restore_posterior(spec, state: dict, mean: Tensor, prior, scale: Tensor, options):
    """A saved posterior (checked), per output when the state says ``n_outputs``.

    Returns:
        The posterior.
    """
    if "n_outputs" in state:
        return PerOutputPosterior.from_state_dict(state, spec, mean, prior, scale, options)
    return spec.posterior_cls.from_state_dict(state, mean, prior, scale)


def output_loss_sums(curvature: object) -> tuple[float, ...] | None:
    """Σ (y_c - f_c)² of each output of a fit with one σ per output, else ``None``.

    Returns:
        D floats, or ``None``.
    """
    if isinstance(curvature, PerOutputCurvature):
        return tuple(float(v) for v in curvature.squared_errors)
    return None
