r"""Natural-gradient descent preconditioned by the GGN or the empirical Fisher.

Each step solves, on the current batch, the damped curvature system by conjugate gradients
(:func:`laplace_ggn.linalg.cg`), touching the curvature only through products:

.. math::
    (C + \Lambda_0 + \delta I)\, d = g, \qquad \theta \leftarrow \theta - \eta\, d,

with :math:`g = \nabla_\theta[\ell(\theta) + \tfrac12 \theta^\top\Lambda_0\theta]` the gradient of
the summed negative log likelihood of the batch plus the prior, and

.. math::
    C = G = \sum_n J_n^\top \Lambda_n J_n \quad (\texttt{"ggn"}), \qquad
    C = \mathrm{EF} = \sum_n g_n g_n^\top,\ g_n = J_n^\top \nabla_f \ell_n \quad (\texttt{"ef"}).

Both products need only :math:`Jv` and :math:`J^\top u` of the batch outputs; they are taken
on the autograd graph of the outputs the closure returns (:math:`J^\top u` by a backward pass,
:math:`Jv` by the double-backward trick), so any model autograd can differentiate works and the
closure is all the optimizer needs, as with :class:`torch.optim.LBFGS`.

``"kfac"`` replaces CG by the exact inverse of the Kronecker-factored GGN of the batch
(:mod:`laplace_ggn.kfac` conventions: per ``nn.Linear`` layer :math:`G_l \approx B_l \otimes A_l`,
:math:`A_l = \sum_n \tilde a_n \tilde a_n^\top`, :math:`B_l` the mean over rows of
:math:`\sum_c g_{nc} g_{nc}^\top`), inverted through the factors' eigendecompositions by
:func:`laplace_ggn.linalg.inverse_matvec`. It needs the layer inputs, so the optimizer is
given the ``model`` and records them with forward hooks while the closure runs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ._checks import Likelihood, as_enum, is_integer, shape_str
from .collectors.batch_kfac import BatchKFAC
from .likelihoods import get_likelihood
from .linalg import CGResult, SolveMethod, cg, inverse_matvec
from .operators import CallableOperator

#: The likelihoods the natural gradient takes (members of :class:`~laplace_ggn.Likelihood`).
_NG_LIKELIHOODS = (Likelihood.REGRESSION, Likelihood.CLASSIFICATION, Likelihood.BINARY)

__all__ = ["Curvature", "NaturalGradient"]


class Curvature(str, enum.Enum):
    """Curvature matrix preconditioning :class:`NaturalGradient`."""

    GGN = "ggn"
    EF = "ef"
    KFAC = "kfac"


def _check_nonneg(value: float, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")


class NaturalGradient(torch.optim.Optimizer):
    r"""Natural-gradient descent: :math:`\theta \leftarrow \theta - \eta\,(C + \Lambda_0 + \delta I)^{-1} g`.

    The curvature :math:`C` (GGN or empirical Fisher, see the module docstring) is that of the
    batch the closure evaluates, summed over its points like the loss; damping :math:`\delta`
    and prior precision :math:`\Lambda_0` are on the same (summed) scale. With ``lr=1``,
    ``damping=0`` and a model linear in θ under a Gaussian likelihood, one ``"ggn"`` step
    lands on the minimiser of the batch loss (Newton's method on a quadratic).

    ``step(closure)`` takes a closure that runs the model and returns ``(outputs, targets)``:
    outputs of shape ``(B, C)`` (or ``(B,)`` for one output) still attached to the autograd
    graph, and targets as the likelihood expects them (regression: the outputs' shape;
    classification: class indices ``(B,)``; binary: 0/1 of shape ``(B,)``). It returns the
    loss :math:`\ell(\theta) + \tfrac12\theta^\top\Lambda_0\theta` before the step. The
    closure need not call ``zero_grad`` or ``backward``; ``.grad`` is left untouched.

    Options per parameter group: ``lr``, ``damping`` and ``prior_precision``. The linear system
    couples all groups and is solved once per step.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        likelihood: ``"regression"``, ``"classification"`` or ``"binary"``.
        curvature: ``"ggn"``, ``"ef"`` (CG on exact products) or ``"kfac"`` (Kronecker-factored
            GGN inverted exactly; every optimised parameter must belong to an ``nn.Linear``
            layer of ``model`` run once per forward pass, and ``damping`` and
            ``prior_precision`` must be equal across parameter groups).
        model: The module the closure runs; required for ``"kfac"``, ignored otherwise.
        lr: Step size :math:`\eta` > 0.
        damping: :math:`\delta \ge 0` added to the curvature's diagonal.
        prior_precision: :math:`\alpha \ge 0`; :math:`\Lambda_0 = \alpha I` adds
            :math:`\alpha\theta` to the gradient and :math:`\alpha I` to the curvature.
        sigma_noise: Gaussian noise σ > 0 of ``"regression"`` (loss and GGN scale by 1/σ²).
        cg_tol: Relative residual tolerance of CG.
        cg_max_iter: Maximum CG iterations (= curvature products) per step.

    Raises:
        ValueError: If an option has an invalid value.
            For ``"kfac"``: a parameter outside the ``nn.Linear`` layers of ``model``, or
            per-group ``damping``/``prior_precision`` that differ.
        TypeError: If ``curvature="kfac"`` and ``model`` is not an ``nn.Module``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3
        >>> model = torch.nn.Linear(3, 1).double()
        >>> opt = NaturalGradient(model.parameters(), likelihood="regression", damping=0.0)
        >>> loss = opt.step(lambda: (model(x), y))   # one Newton step on a quadratic
        >>> round(float(((model(x) - y) ** 2).mean().detach()), 10)
        0.0
        >>> opt.last_solve.converged
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        *,
        likelihood: Likelihood | str = Likelihood.REGRESSION,
        curvature: Curvature | str = Curvature.GGN,
        model: nn.Module | None = None,
        lr: float = 1.0,
        damping: float = 1e-3,
        prior_precision: float = 0.0,
        sigma_noise: float = 1.0,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 100,
    ):
        """Validate the options and set up the parameter groups; see the class docstring.

        Raises:
            ValueError: If an option has an invalid value (details in the class docstring).
        """
        self.likelihood_kind = as_enum(Likelihood, likelihood, "likelihood")
        if self.likelihood_kind not in _NG_LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {[m.value for m in _NG_LIKELIHOODS]} for the natural "
                f"gradient; got {likelihood!r}."
            )
        self.curvature = as_enum(Curvature, curvature, "curvature")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {lr!r}.")
        _check_nonneg(damping, "damping")
        _check_nonneg(prior_precision, "prior_precision")
        if not (
            isinstance(sigma_noise, (int, float)) and math.isfinite(sigma_noise) and sigma_noise > 0
        ):
            raise ValueError(f"sigma_noise must be a finite number > 0; got {sigma_noise!r}.")
        if not (isinstance(cg_tol, (int, float)) and cg_tol > 0):
            raise ValueError(f"cg_tol must be > 0; got {cg_tol!r}.")
        if not is_integer(cg_max_iter) or cg_max_iter < 1:
            raise ValueError(f"cg_max_iter must be an integer >= 1; got {cg_max_iter!r}.")
        cg_max_iter = int(cg_max_iter)
        defaults = {"lr": lr, "damping": damping, "prior_precision": prior_precision}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if not (math.isfinite(group["lr"]) and group["lr"] > 0):
                raise ValueError(f"lr must be a finite number > 0; got {group['lr']!r}.")
            _check_nonneg(group["damping"], "damping")
            _check_nonneg(group["prior_precision"], "prior_precision")
        self._lik = get_likelihood(self.likelihood_kind)
        self.sigma_noise = float(sigma_noise)
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = cg_max_iter
        self.last_solve: CGResult | None = None
        self._kfac: BatchKFAC | None = None
        if self.curvature is Curvature.KFAC:
            self._setup_kfac(model)

    def _setup_kfac(self, model: nn.Module | None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be the nn.Module the closure runs for curvature='kfac'; got "
                f"{type(model).__name__}. Pass NaturalGradient(..., model=model)."
            )
        for key in ("damping", "prior_precision"):
            values = {float(g[key]) for g in self.param_groups}
            if len(values) > 1:
                raise ValueError(
                    f"{key} must be the same in every parameter group for curvature='kfac'; "
                    f"got {sorted(values)}. The Kronecker inverse takes one scalar shift."
                )
        self._kfac = BatchKFAC(model, [p for _, p in self._params()])

    def _params(self) -> list[tuple[dict, Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def step(self, closure: Callable[[], tuple[Tensor, Tensor]]) -> Tensor:  # type: ignore[override]
        r"""One natural-gradient step on the batch the closure evaluates.

        Args:
            closure: Callable returning ``(outputs, targets)``: outputs ``(B, C)`` or ``(B,)``
                on the autograd graph of the parameters, and the targets.

        Returns:
            The loss before the step, :math:`\ell(\theta) + \tfrac12\theta^\top\Lambda_0\theta`,
            a 0-dim tensor (detached).

        Raises:
            TypeError: If the closure does not return a pair of tensors.
            ValueError: If the outputs are not attached to the parameters' graph, targets do
                not fit the likelihood, or (``"kfac"``) a factored layer did not run exactly once.
        """
        if closure is None or not callable(closure):
            raise TypeError(
                f"closure must be a callable returning (outputs, targets); got {closure!r}. "
                "Example: opt.step(lambda: (model(x), y))."
            )
        records: dict[str, list[tuple[Tensor, Tensor]]] = {}
        with torch.enable_grad(), BatchKFAC.recording(self._kfac, records):
            out = closure()
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor)):
            raise TypeError(
                "closure must return a pair (outputs, targets) of tensors; got "
                f"{type(out).__name__}. Example: opt.step(lambda: (model(x), y))."
            )
        f, y = out
        if f.ndim == 1:
            f = f.unsqueeze(1)
        if f.ndim != 2:
            raise ValueError(
                f"outputs must have shape (B, C) or (B,); got {shape_str(f.shape)}. "
                "Flatten structured outputs inside the closure."
            )
        if not f.requires_grad:
            raise ValueError(
                "outputs must be attached to the autograd graph of the optimised parameters; got "
                "a tensor that does not require grad. Do not run the model under torch.no_grad()."
            )
        y = self._lik.check_targets(f.detach(), y)
        pairs = self._params()
        params = [p for _, p in pairs]
        sizes = [p.numel() for p in params]
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        dtype, device = theta.dtype, theta.device

        def per_param(key: str) -> Tensor:
            return torch.cat(
                [
                    torch.full((p.numel(),), float(g[key]), dtype=dtype, device=device)
                    for g, p in pairs
                ]
            )

        prior, damping, lr = per_param("prior_precision"), per_param("damping"), per_param("lr")
        sigma2 = self._lik.sigma2(self.sigma_noise)

        with torch.enable_grad():
            nll = self._lik.nll(f, y, self.sigma_noise)
            grads = torch.autograd.grad(
                nll, [f, *params], retain_graph=True, materialize_grads=True
            )
        r = grads[0].detach()  # ∂ℓ_n/∂f_n, (B, C)
        g = torch.cat([t.reshape(-1) for t in grads[1:]]).detach() + prior * theta

        if self.curvature is Curvature.KFAC:
            curv_k = self._kfac.curvature(f, records, self._lik, sigma2)
            shift = float(prior[0] + damping[0]) if len(prior) else 0.0
            sol = inverse_matvec(curv_k, g, method=SolveMethod.KFAC, damping=shift)
            self.last_solve = None
            return self._update(params, sizes, lr * sol, nll, prior, theta)

        with torch.enable_grad():
            # Jᵀu as a (linear) function of u, for Jv by differentiating it w.r.t. u
            u = torch.zeros_like(f, requires_grad=True)
            JTu = torch.autograd.grad(
                f, params, grad_outputs=u, create_graph=True, materialize_grads=True
            )
        linked = [(i, t) for i, t in enumerate(JTu) if t.requires_grad]
        f_det = f.detach()

        def J(v: Tensor) -> Tensor:  # (P,) -> (B, C)
            pieces = list(torch.split(v, sizes))
            if not linked:
                return torch.zeros_like(f_det)
            (Jv,) = torch.autograd.grad(
                [t for _, t in linked],
                u,
                grad_outputs=[pieces[i].view_as(t) for i, t in linked],
                retain_graph=True,
            )
            return Jv

        def JT(w: Tensor) -> Tensor:  # (B, C) -> (P,)
            out = torch.autograd.grad(
                f, params, grad_outputs=w, retain_graph=True, materialize_grads=True
            )
            return torch.cat([t.reshape(-1) for t in out])

        if self.curvature is Curvature.GGN:

            def curv(v: Tensor) -> Tensor:
                return JT(self._lik.hessian_matvec(f_det, J(v)) / sigma2)
        else:

            def curv(v: Tensor) -> Tensor:
                return JT(r * (r * J(v)).sum(dim=1, keepdim=True))

        diag = prior + damping

        def matmat(V: Tensor) -> Tensor:
            return torch.stack([curv(v) + diag * v for v in V.T], dim=1)

        A = CallableOperator(matmat, theta.numel(), dtype=dtype, device=device)
        res = cg(A, g, tol=self.cg_tol, max_iter=self.cg_max_iter)
        self.last_solve = res
        return self._update(params, sizes, lr * res.solution, nll, prior, theta)

    @staticmethod
    def _update(
        params: list[Tensor], sizes: list[int], d: Tensor, nll: Tensor, prior: Tensor, theta: Tensor
    ) -> Tensor:
        with torch.no_grad():
            for p, dp in zip(params, d.split(sizes)):
                p.sub_(dp.view_as(p))
        return nll.detach() + 0.5 * (prior * theta**2).sum()
