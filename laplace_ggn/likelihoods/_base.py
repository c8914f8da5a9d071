"""What the likelihoods share: fit statistics, the predictive's moments, shared helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import Likelihood, Link, PredictMethod, shape_str

DEFAULT_IGNORE_INDEX = -100

VALID_PREDICT_OPTIONS = (
    "valid combinations: method='glm' with link 'probit', 'bridge', 'bridge_norm' or 'mc'; "
    "method='nn' with link 'mc' (the default for 'nn'); regression ignores the link"
)


@dataclass(frozen=True)
class FitStatistics:
    """Sufficient statistics of the training loss at θ*, enough to recompute ℓ(θ*) for any σ.

    Attributes:
        n_data: Number of training points N (kept positions for outputs ``(B, T, C)``).
        n_outputs: Number of outputs C.
        loss_sum: Summed NLL (classification) or summed squared error Σ‖y - f‖² (regression).
        output_ndim: 2 for outputs ``(B, C)``, 3 for ``(B, T, C)``.
        output_loss_sums: Σ (y_c - f_c)² of each output c (regression with one σ per output),
            else ``None``.
    """

    n_data: int
    n_outputs: int
    loss_sum: float
    output_ndim: int = 2
    output_loss_sums: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Prediction:
    """Moments of a predictive distribution.

    Attributes:
        mean: Regression: predictive mean; classification: class probabilities (a binary
            model gives the probability of class 1), shape ``(B, C)``.
        variance: Regression: variance of y (functional + σ²); classification: variance of
            the class probability under the posterior, shape ``(B, C)``.
        epistemic: The part of ``variance`` due to the posterior over θ, where a likelihood
            reports the two parts apart (heteroscedastic, Poisson), else ``None``.
        aleatoric: The part due to the observation noise (``variance - epistemic``), or
            ``None``.
    """

    mean: Tensor
    variance: Tensor
    epistemic: Tensor | None = None
    aleatoric: Tensor | None = None

    def reshape(self, *shape: int) -> Prediction:
        """Every tensor reshaped to ``shape``.

        Returns:
            The reshaped :class:`Prediction`.
        """
        parts = (self.mean, self.variance, self.epistemic, self.aleatoric)
        return Prediction(*(None if t is None else t.reshape(*shape) for t in parts))


def sample_moments(out: Tensor) -> Prediction:
    """Mean and unbiased variance over the first dimension of ``out`` ``(S, B, C)``.

    Returns:
        The :class:`Prediction`, shapes ``(B, C)``; the variance is 0 when S = 1.
    """
    S = out.shape[0]
    var = out.var(dim=0, correction=1) if S > 1 and out.shape[1] else torch.zeros_like(out[0])
    return Prediction(out.mean(0), var)


def check_batch_size(pred: Prediction, y: Tensor) -> int:
    """B of the prediction, after checking that ``y`` has it.

    Returns:
        B.

    Raises:
        ValueError: If ``y`` does not match the prediction's batch size.
    """
    B = pred.mean.shape[0]
    if y.shape[0] != B:
        raise ValueError(f"y must have batch size {B}; got shape {shape_str(y.shape)}.")
    return B


def no_link(name: str, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, None]:
    """The link of a Gaussian predictive: none (``None`` and the default ``probit`` ignored).

    Returns:
        ``(method, None)``.

    Raises:
        ValueError: If another link is given.
    """
    if link not in (None, Link.PROBIT):
        raise ValueError(
            f"link must be None (or the default 'probit', ignored) for likelihood={name!r}; got "
            f"link={link.value!r}. Its predictive is Gaussian and needs no link; "
            f"{VALID_PREDICT_OPTIONS}."
        )
    return method, None


def mc_only_link(name: str, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, Link]:
    """The link of a predictive that averages a response over draws: ``mc`` only.

    Returns:
        ``(method, Link.MC)``.

    Raises:
        ValueError: For ``probit`` or ``bridge`` (softmax / sigmoid approximations).
    """
    if link not in (None, Link.MC):
        raise ValueError(
            f"link must be 'mc' (or None) for likelihood {name!r}; got link={link.value!r}. The "
            "probit and bridge links approximate a softmax or sigmoid; this likelihood's "
            "predictive averages its response over draws."
        )
    return method, Link.MC


def gaussian_predictive_nll(pred: Prediction, y: Tensor) -> Tensor:
    r"""Per-point :math:`\sum_c \tfrac12\log(2\pi v_c) + (y_c - m_c)^2 / (2 v_c)`, shape ``(B,)``.

    Returns:
        The NLL of each point, shape ``(B,)``.

    Raises:
        ValueError: If ``y`` does not match the prediction's batch size.
    """
    check_batch_size(pred, y)
    v = pred.variance
    r = (y.reshape(pred.mean.shape) - pred.mean) ** 2
    return (0.5 * torch.log(2 * math.pi * v) + 0.5 * r / v).sum(-1)


def classifier_link(method: PredictMethod, link: Link | None) -> tuple[PredictMethod, Link]:
    """The link of a classification predictive: probit for ``glm``, ``mc`` for ``nn`` by default.

    Returns:
        ``(method, link)``.

    Raises:
        ValueError: If ``method='nn'`` comes with a link other than ``mc``.
    """
    if method is PredictMethod.NN:
        if link not in (None, Link.MC):
            raise ValueError(
                f"link must be 'mc' (or None) with method='nn'; got link={link.value!r}. The "
                f"sampled-network predictive averages over network samples; "
                f"{VALID_PREDICT_OPTIONS}."
            )
        return method, Link.MC
    return method, (Link.PROBIT if link is None else link)


def class_positions(kind_name: str, f: Tensor, y: Tensor, where: str) -> Tensor:
    """Targets ``(B, T)`` or ``(B, T, 1)`` of outputs ``(B, T, C)`` as one row per position.

    Returns:
        Shape ``(B·T,)``.

    Raises:
        ValueError: If ``y`` has neither shape.
    """
    lead = tuple(f.shape[:-1])
    shapes = [lead, (*lead, 1)]
    check_position_shapes(kind_name, f, y, shapes, where)
    return y.reshape(-1)


def check_position_shapes(
    kind_name: str, f: Tensor, y: Tensor, shapes: list[tuple[int, ...]], where: str
) -> None:
    """Refuse targets of outputs ``(B, T, C)`` whose shape is none of ``shapes``.

    Raises:
        ValueError: Naming the accepted shapes.
    """
    if tuple(y.shape) not in shapes:
        loc = f" ({where})" if where else ""
        want = " or ".join(shape_str(s) for s in shapes)
        raise ValueError(
            f"{kind_name} targets{loc} must have shape {want} for outputs of shape "
            f"{shape_str(f.shape)} (one target per position); got {shape_str(y.shape)}."
        )


def ignored_positions(y: Tensor, n: int, ignore_index: int | None) -> Tensor | None:
    """Rows of class targets ``y`` equal to ``ignore_index`` (``None`` if none or no rows match).

    Returns:
        Boolean mask ``(n,)`` or ``None``.
    """
    if ignore_index is None or y.numel() != n:
        return None
    ignored = (y == ignore_index).reshape(n)
    return ignored if bool(ignored.any()) else None


class BuiltinLikelihood:
    """Members every built-in likelihood shares: no parameters of its own, one input per sample.

    Their output curvature does not depend on the targets and they sample targets for
    ``curvature="mc"``; their name is their ``likelihood=`` option.
    """

    kind: Likelihood
    items_per_sample = 1
    needs_targets = False
    samples_targets = True

    @property
    def name(self) -> str:
        """The ``likelihood=`` option, e.g. ``"regression"``."""
        return self.kind.value

    def state_dict(self) -> dict[str, object]:
        """No parameters: ``{}``."""
        return {}

    def with_state(self, state: dict[str, object]) -> BuiltinLikelihood:
        """This likelihood (it has no parameters).

        Returns:
            ``self``.

        Raises:
            ValueError: If ``state`` is not empty.
        """
        if state:
            raise ValueError(
                f"state of likelihood {self.name!r} must be empty (it has no parameters); got "
                f"keys {sorted(state)}."
            )
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ClassLikelihood(BuiltinLikelihood):
    """What the categorical and Bernoulli likelihoods share.

    No noise scale, probabilities predicted through a link, accuracy as the fit metric, and
    targets equal to ``ignore_index`` skipped.
    """

    has_noise = False
    predicts_probabilities = True
    metric_name = "accuracy"

    def ignored(self, y: Tensor, n: int, ignore_index: int | None) -> Tensor | None:
        """Rows of ``y`` equal to ``ignore_index``, a boolean mask ``(n,)`` (``None``: none)."""
        return ignored_positions(y, n, ignore_index)

    @staticmethod
    def nll_from_statistics(stats: FitStatistics, sigma: Tensor) -> Tensor:
        """Summed NLL (σ plays no role)."""
        return torch.as_tensor(stats.loss_sum, dtype=sigma.dtype, device=sigma.device)

    def sigma2(self, sigma: Tensor | float) -> float:
        """1: the output Hessian has no noise scale."""
        return 1.0

    def curvature_scale(self, sigma: Tensor, temperature: Tensor | float) -> Tensor:
        r"""Factor :math:`1/\tau` of the GGN in the posterior precision."""
        return torch.as_tensor(1.0 / temperature, dtype=sigma.dtype, device=sigma.device)

    def check_link(self, method: PredictMethod, link: Link | None) -> tuple[PredictMethod, Link]:
        """Probit for ``glm`` and ``mc`` for ``nn`` unless given.

        Returns:
            ``(method, link)``.

        Raises:
            ValueError: If ``method='nn'`` comes with a link other than ``mc``.
        """
        return classifier_link(method, link)

    def fit_metric(self, total: Tensor, n_data: int, n_outputs: int) -> Tensor:
        """Accuracy from the number of correct predictions over N points."""
        return total / n_data
