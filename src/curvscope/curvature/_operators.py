"""Curvature operators: Hessian, Gauss-Newton, Fisher, empirical Fisher, gradient covariance.

Every operator is a symmetric :class:`~curvscope.linops.LinearOperator` over the flat vector of
the selected parameters. A product ``A @ V`` with ``V`` of shape ``[P, k]`` makes **one** pass
over the data; on each batch one vmapped kernel serves all ``k`` columns (split into chunks that
shrink automatically when the device runs out of memory). With the empirical risk
``L = sum_b w_b l_b`` of :class:`~curvscope.Problem`:

* Hessian ``H = sum_b w_b d^2 l_b / d theta^2``;
* Gauss-Newton ``G = sum_b w_b J_b^T H_{l_b} J_b`` (``J_b = dz_b/d theta``, ``H_l`` the loss
  Hessian in output space, closed form for CE / MSE / BCE);
* the residual ``H - G`` of Papyan's decomposition, exactly, in the same pass;
* Monte-Carlo Fisher ``F = sum_b w_b r_b J_b^T (1/S sum_s g_s g_s^T) J_b`` with ``g_s`` the
  gradients of the negative log-likelihood at labels sampled from the model (``E[F] = G``);
* empirical Fisher ``E = c sum_i grad l_i grad l_i^T`` with per-example losses ``l_i``
  (``c = 1/N`` for ``mean``, ``1`` for ``sum``);
* gradient covariance ``C = 1/N sum_i (grad l_i - g_bar)(grad l_i - g_bar)^T``.

References:
    V. Papyan, "Measurements of three-level hierarchical structure in the outliers in the spectrum
    of deepnet Hessians", ICML 2019.  N. Schraudolph, "Fast curvature matrix-vector products for
    second-order gradient descent", Neural Computation 2002.  F. Kunstner, L. Balles, P. Hennig,
    "Limitations of the empirical Fisher approximation", NeurIPS 2019.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, cast

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from curvscope import distributed
from curvscope._progress import report_product
from curvscope.curvature._engine_choice import (
    AGREEMENT,
    LOOP_SAMPLE,
    agreed_seconds,
    candidates,
    choice_key,
    choose,
    describe,
    loop_seconds,
    peak_memory_extra,
    peak_memory_start,
    relative_gap,
    timed,
)
from curvscope.curvature._finite_difference import (
    central_differences,
    fd_steps,
    richardson_truncation,
)
from curvscope.curvature._losses import (
    LossKind,
    ModelOutputLoss,
    loss_hessian_product,
    recognise_loss,
    reduction_factor,
    sample_nll_gradients,
)
from curvscope.curvature._param_space import ParamSpace, select_parameters
from curvscope.curvature._problem import Batch, Problem, first_line
from curvscope.linops._base import PSD, SYMMETRIC, LinearOperator

logger = logging.getLogger(__name__)

EXACT_HESSIAN_ENGINES = ("auto", "forward_over_reverse", "double_backward")
HESSIAN_ENGINES = (*EXACT_HESSIAN_ENGINES, "finite_difference")


class EngineFallbackWarning(UserWarning):
    """An autodiff engine failed on this model or loss and curvscope switched to another one."""


class EngineMismatchWarning(UserWarning):
    """An exact engine disagreed with finite differences of the gradient on this model."""


class CurvatureProductError(RuntimeError):
    """A curvature product failed: the message names the engine, the module and what to do."""


_MISSING_RULE_PHRASES = (
    "forward ad", "forward-mode", "forward mode", "zerotensors are immutable", "batching rule",
    "vmap", "not implemented", "does not support", "not supported", "jvp",
    "functorch transforms", "setup_context", "once_differentiable", "differentiate twice",
    "does not require grad and does not have a grad_fn",
)


def _is_missing_autodiff_rule(err: BaseException) -> bool:
    """Whether ``err`` says an op lacks a forward-mode or batching rule (not a user error)."""
    if isinstance(err, NotImplementedError):
        return True
    if not isinstance(err, RuntimeError) or isinstance(err, torch.OutOfMemoryError):
        return False
    text = str(err).lower()
    return any(phrase in text for phrase in _MISSING_RULE_PHRASES)


def _fall_back(err: Exception, what: str, instead: str) -> None:
    """Re-raise ``err`` unless it is a missing autodiff rule; otherwise warn that curvscope
    switches engine (the caller records the switch).
    """
    if not _is_missing_autodiff_rule(err):
        raise err
    warnings.warn(f"{what} ({first_line(err)}); {instead}.", EngineFallbackWarning,
                  stacklevel=3)


class _OneColumnTooLargeError(Exception):
    """Out of memory with a single column: the batch must be split; ``column`` is where."""

    def __init__(self, column: int) -> None:
        super().__init__(f"out of memory at column {column} with a single column")
        self.column = column


class _BatchContext:
    """What the kernels share on one batch: parameters, forward closure, cached linearisation."""

    def __init__(self, problem: Problem, batch: Batch, params: dict[str, Tensor],
                 frozen: dict[str, Tensor], flags: dict[str, bool]) -> None:
        self.problem, self.batch, self.params, self.frozen = problem, batch, params, frozen
        self.problem_flags = flags  # engine choices that persist across batches and products
        self.cache: dict[str, Any] = {}
        self.columns = slice(0, 0)  # the columns of the product this kernel call serves

    def output(self, params: dict[str, Tensor]) -> Tensor:
        return self.problem.forward({**self.frozen, **params}, self.batch.inputs)

    def loss(self, params: dict[str, Tensor]) -> Tensor:
        """``w_b * l_b(theta)`` as a function of the selected parameters."""
        return self.batch.weight * self.problem.batch_loss(self.output(params), self.batch.target)

    def linearization(self) -> tuple[Tensor, Callable]:
        """``z_b`` and its vector-Jacobian product (computed once per batch)."""
        if "vjp" not in self.cache:
            if not self.problem_flags.get("autograd_vjp"):
                try:
                    # torch.func.vjp is annotated with the union over ``has_aux``; without aux it
                    # is a pair
                    z, vjp_fn = cast(tuple[Tensor, Callable[..., Any]], vjp(self.output, self.params))
                    self.cache["vjp"] = (z.detach(), vjp_fn)
                    return self.cache["vjp"]
                except Exception as err:  # noqa: BLE001 - re-raised unless a missing AD rule
                    _fall_back(err, "torch.func.vjp failed on this model", "computing J^T u with "
                               "plain autograd (one backward per column) instead")
                    self.problem_flags["autograd_vjp"] = True
            self.cache["vjp"] = self._autograd_linearization()
        return self.cache["vjp"]

    def _autograd_linearization(self) -> tuple[Tensor, Callable]:
        """``z_b`` and ``u -> J_b^T u`` by plain autograd on a retained graph (for models that
        torch.func cannot transform, such as old-style ``autograd.Function`` s).
        """
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        z = self.output(leaves)

        def vjp_fn(u: Tensor) -> tuple[dict[str, Tensor]]:
            grads = torch.autograd.grad(z, list(leaves.values()), grad_outputs=u, retain_graph=True,
                                        allow_unused=True, materialize_grads=True)
            return ({n: g.detach() for n, g in zip(leaves, grads)},)

        return z.detach(), vjp_fn

    def jacobian_product(self, V: dict[str, Tensor]) -> Tensor:
        """``J_b V``: ``[k, *z.shape]``.

        Forward mode, vmapped over the ``k`` columns; when an op of the model has no forward-mode
        rule, the double-vjp trick ``J v = d/du <J^T u, v>`` in reverse mode instead.
        """
        if self.problem_flags.get("finite_difference_jacobian"):
            return self._jacobian_product_finite_difference(V)
        if not self.problem_flags.get("reverse_jacobian"):
            try:
                if next(iter(V.values())).shape[0] == 1:  # no vmap for one column: cheaper
                    one = {n: v[0] for n, v in V.items()}
                    return jvp(self.output, (self.params,), (one,))[1].unsqueeze(0)
                return vmap(lambda v: jvp(self.output, (self.params,), (v,))[1])(V)
            except Exception as err:  # noqa: BLE001 - re-raised unless a missing AD rule
                _fall_back(err, "forward-mode AD failed on this model", "computing Jacobian "
                           "products with the double-vjp trick in reverse mode instead")
                self.problem_flags["reverse_jacobian"] = True
        try:
            return self._jacobian_product_reverse(V)
        except Exception as err:  # noqa: BLE001 - re-raised unless a missing AD rule
            _fall_back(err, "the double-vjp Jacobian product failed (no double backward)",
                       "computing Jacobian products J v by central differences of the model's "
                       "outputs (Richardson-extrapolated; forward passes only) instead")
            self.problem_flags["finite_difference_jacobian"] = True
        return self._jacobian_product_finite_difference(V)

    def _jacobian_product_finite_difference(self, V: dict[str, Tensor]) -> Tensor:
        """``J_b V`` from forward passes: Richardson-extrapolated central differences of ``z``."""
        names = list(V)
        k = V[names[0]].shape[0]
        squares = [self.params[n].to(torch.float64).square().sum() for n in names]
        squares += [(V[n].reshape(k, -1).to(torch.float64).square().sum(1)) for n in names]
        norms = torch.cat([torch.stack(squares[:len(names)]).sum().reshape(1),
                           torch.stack(squares[len(names):]).sum(0)]).sqrt().tolist()  # one sync
        dtype = V[names[0]].dtype
        steps = fd_steps(norms[0], sum(p.numel() for p in self.params.values()), norms[1:], dtype)
        eps = torch.finfo(dtype).eps
        cols = []
        with torch.no_grad():
            for j in range(k):
                def output_at(t: float, j: int = j) -> Tensor:
                    return self.output({n: self.params[n] + t * V[n][j] for n in names})

                value, _, _ = central_differences(output_at, steps[j], True, eps)
                cols.append(value)
        return torch.stack(cols)

    def _jacobian_product_reverse(self, V: dict[str, Tensor]) -> Tensor:
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        z = self.output(leaves)
        u = torch.zeros_like(z, requires_grad=True)
        Jt_u = torch.autograd.grad(z, list(leaves.values()), grad_outputs=u, create_graph=True,
                                   allow_unused=True, materialize_grads=True)
        live = [i for i, g in enumerate(Jt_u) if g.requires_grad]
        names = list(leaves)
        k = next(iter(V.values())).shape[0]
        no_graph = RuntimeError(
            "the double-vjp Jacobian product is not implemented for this model: J^T u has no "
            "graph back to u (a backward that is not differentiable, e.g. @once_differentiable)")
        if not live:  # z depends on theta, so J^T u must depend on u: its graph was not recorded
            raise no_graph
        outputs = [Jt_u[i] for i in live]
        (JV,) = torch.autograd.grad(outputs, [u], grad_outputs=[V[names[i]] for i in live],
                                    is_grads_batched=True, allow_unused=True, retain_graph=True)
        if JV is None:  # torch would "materialise" this as zeros: a silently wrong J v
            raise no_graph
        if JV.shape != (k, *z.shape):  # the batched backward lost the batch (old-style Functions)
            cols = [torch.autograd.grad(outputs, [u], grad_outputs=[V[names[i]][j] for i in live],
                                        allow_unused=True, retain_graph=True)[0] for j in range(k)]
            if any(c is None for c in cols):
                raise no_graph
            JV = torch.stack(cols)
        return JV.detach()

    def transpose_jacobian_product(self, U: Tensor) -> dict[str, Tensor]:
        """``J_b^T U`` for ``U`` of shape ``[k, *z.shape]``."""
        _, vjp_fn = self.linearization()
        if U.shape[0] == 1:  # no vmap for one column
            return {n: g.unsqueeze(0) for n, g in vjp_fn(U[0])[0].items()}
        if self.problem_flags.get("autograd_vjp"):
            cols = [vjp_fn(U[j])[0] for j in range(U.shape[0])]
            return {n: torch.stack([c[n] for c in cols]) for n in cols[0]}
        return vmap(vjp_fn)(U)[0]

    def loss_kind(self) -> LossKind:
        if "kind" not in self.cache:
            self.cache["kind"] = recognise_loss(self.problem.loss_fn, self.batch.target)
        return self.cache["kind"]


def _rowdot(a: Tensor, U: Tensor) -> Tensor:
    """Per-example inner products ``<a_i, U_{j,i}>`` of ``a [n, ...]`` and ``U [k, n, ...]``,
    shaped ``[k, n, 1, ...]`` for broadcasting.
    """
    prod = a.unsqueeze(0) * U
    return prod.reshape(U.shape[0], U.shape[1], -1).sum(-1).reshape(
        U.shape[0], U.shape[1], *([1] * (U.ndim - 2))
    )


class CurvatureOperator(LinearOperator):
    """Base class: a curvature matrix of a :class:`Problem` over (a block of) its parameters.

    Subclasses implement ``_batch_product(ctx, V) -> {name: [k, *shape]}``, the contribution of
    one batch to ``A V``, and may add a data-independent ``_correction(X)``.

    Attributes:
        problem: the Problem.
        param_space: the parameters this operator acts on (a block of the Problem's).
        num_matvecs: number of columns multiplied so far.
        num_data_passes: number of passes over the data so far.
    """

    _tags: frozenset[str] = frozenset({SYMMETRIC})
    _needs_loss_of_outputs = False  # output-space operators (GGN, Fisher, ...) need l(z, y)

    def __init__(self, problem: Problem, *, params: Any = None, chunk_size: int | None = None,
                 **options: Any) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(
                f"{type(self).__name__} needs a curvscope.Problem, got {type(problem).__name__}; "
                "build one with curvscope.Problem(model, loss_fn, data)."
            )
        if self._needs_loss_of_outputs and isinstance(problem.loss_fn, ModelOutputLoss):
            raise ValueError(
                f"{type(self).__name__} needs the loss as a function of the model's output, but "
                "ModelOutputLoss uses the loss the model computes itself; build the Problem with "
                "the same objective of the logits (curvscope.CausalLMLoss() for a causal LM, "
                "nn.CrossEntropyLoss() for a classifier)."
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        self.problem = problem
        self.param_space = _block_space(problem, params)
        self.chunk_size = chunk_size
        self._options = {"params": params, "chunk_size": chunk_size, **options}
        P = self.param_space.size
        super().__init__((P, P), dtype=problem.accumulate_dtype, device=problem.device,
                         tags=self._tags)
        self.num_matvecs = 0
        self.num_data_passes = 0
        self._engine_flags: dict[str, bool] = {}

    # ---------------------------------------------------------------- derived operators
    def _rebuild(self, problem: Problem | None = None, **changes: Any) -> CurvatureOperator:
        return type(self)(problem or self.problem, **{**self._options, **changes})

    def block(self, params: Any) -> CurvatureOperator:
        """The same curvature restricted to a block of parameters (names, regex or modules).

        Equal to the principal submatrix of the full operator, at the cost of differentiating
        with respect to the block only.
        """
        return self._rebuild(params=params)

    def restrict_to_class(self, c: int) -> CurvatureOperator:
        """The same curvature of the loss over the examples of class ``c`` only."""
        return self._rebuild(self.problem.restrict_to_class(c))

    def restrict_examples(self, mask_fn: Callable[[Any, Any], Tensor],
                          description: str = "a subset") -> CurvatureOperator:
        """The same curvature of the loss over the examples selected by ``mask_fn``."""
        return self._rebuild(self.problem.restrict_examples(mask_fn, description))

    # ---------------------------------------------------------------- products
    def _batch_product(self, ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    #: name of this operator in :attr:`Problem.engine_choices` keys (default: the class name)
    _choice_name = ""

    def _choice_key(self, k: int) -> str:
        return choice_key(self._choice_name or type(self).__name__, tuple(self.param_space.names),
                          tuple(self.problem.param_space.names), self.problem.dtype,
                          self.problem.device, k)

    def measured_seconds_per_column(self, k: int) -> float | None:
        """Seconds per column of a ``k``-column product, measured once per column bucket.

        A product of ``k`` random columns on the first batch, timed on its second run (the
        first pays one-time costs), averaged over the ranks so that every rank makes the same
        choice from it; kept in :attr:`Problem.engine_choices` (hence in every result's
        ``cost.engines`` and every checkpoint, so a resumed solver makes the same choice).
        Solvers use it to choose the shape of their products (e.g. :func:`eigsh`'s block).
        """
        key = self._choice_key(k)
        if key not in self.problem.engine_choices:
            self._time_products(k, key)
        record = self.problem.engine_choices.get(key)
        value = None if record is None else record.get("mean_seconds_per_column")
        return value if isinstance(value, float) else None

    def estimated_seconds_per_column(self, k: int) -> float | None:
        """Seconds per column of a whole ``k``-column product (every batch of this rank):
        :meth:`measured_seconds_per_column` on the first batch, scaled by the data,
        ``t_1 x N / (n_1 W)`` for ``N`` data units over ``W`` ranks and ``n_1`` in the first
        batch. What a plan multiplies by its columns; ``None`` when not timed.
        """
        seconds = self.measured_seconds_per_column(k)
        record = self.problem.engine_choices.get(self._choice_key(k), {})
        examples = record.get("examples")
        if seconds is None or not isinstance(examples, (int, float)) or examples <= 0:
            return seconds
        return seconds * self.problem.num_data / (examples * distributed.world()[1])

    def _time_products(self, k: int, key: str) -> None:
        """Record under ``key`` the seconds per column of a ``k``-column product (its second
        run on the first batch, agreed over the ranks).
        """
        self._product_on_first_batch(k)
        seconds = self._product_on_first_batch(k) / k
        mean = agreed_seconds({"products": seconds}, self.device)["products"]
        self.problem.engine_choices[key] = {
            "engine": "products", "seconds_per_column": {"products": seconds},
            "columns": k, "mean_seconds_per_column": mean,
            "examples": next(iter(self.problem.batches())).size}

    def _product_on_first_batch(self, k: int) -> float:
        """Seconds of this operator's product with ``k`` seeded random columns on the first
        batch only (the product is discarded).
        """
        gen = torch.Generator(device="cpu").manual_seed(20240902)
        X = torch.randn(self.shape[0], k, generator=gen, dtype=torch.float64)
        Xp = X.to(device=self.device, dtype=self.problem.dtype)
        out = torch.zeros(Xp.shape, dtype=self.dtype, device=self.device)
        all_params = self.problem.parameters()
        params = {n: all_params[n] for n in self.param_space.names}
        frozen = self.problem.frozen_parameters(params)
        kernels = self._kernels()
        second_order = any(op._second_order for _, op in kernels)
        t0 = time.perf_counter()
        with self.problem.model_context(), torch.enable_grad(), \
                self.problem.product_context(second_order):
            for _, op in kernels:
                op._begin_product(Xp)
            for batch in self.problem.batches():
                self._accumulate_batch(batch, params, frozen, kernels, Xp, out)
                break
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        return time.perf_counter() - t0

    def _correction(self, X: Tensor) -> Tensor | None:
        """A data-independent term added after the pass (``None``: nothing)."""
        return None

    @property
    def _second_order(self) -> bool:
        """Whether products differentiate twice or in forward mode (SDPA then needs its math path)."""
        return True

    def _begin_product(self, X: Tensor) -> None:
        """Called before the pass of a product ``A X`` (kernels with state of their own)."""

    def _commit(self, ctx: _BatchContext) -> None:
        """Called when a batch's column chunk succeeded (kernels with side results)."""

    def _end_product(self, X: Tensor, out: Tensor) -> None:
        """Called after the pass with the product (side results are all-reduced here)."""

    def _kernels(self) -> list[tuple[float, CurvatureOperator]]:
        return [(1.0, self)]

    def _matmat(self, X: Tensor) -> Tensor:
        kernels = self._kernels()
        space, problem = self.param_space, self.problem
        Xp = X.to(problem.dtype)
        out = torch.zeros(X.shape, dtype=self.dtype, device=self.device)
        all_params = problem.parameters()
        params = {n: all_params[n] for n in space.names}
        frozen = problem.frozen_parameters(params)
        second_order = any(op._second_order for _, op in kernels)
        with problem.model_context(), torch.enable_grad(), problem.product_context(second_order):
            for _, op in kernels:
                op._begin_product(X)
            try:
                for batch in problem.batches():
                    self._accumulate_batch(batch, params, frozen, kernels, Xp, out)
            except (RuntimeError, NotImplementedError) as err:
                if isinstance(err, (torch.OutOfMemoryError, CurvatureProductError,
                                    distributed.DistributedTimeoutError)):
                    raise
                raise _product_error(self, err) from err
        problem.all_reduce(out)
        for _, op in kernels:
            op._end_product(X, out)
        for coef, op in kernels:
            extra = op._correction(X)
            if extra is not None:
                out.add_(extra, alpha=coef)
        self.num_matvecs += X.shape[1]
        self.num_data_passes += 1
        report_product(X.shape[1])
        return out

    def _accumulate_batch(self, batch: Batch, params: dict[str, Tensor],
                          frozen: dict[str, Tensor],
                          kernels: list[tuple[float, CurvatureOperator]], Xp: Tensor,
                          out: Tensor, first_column: int = 0) -> None:
        """One batch; when even a single column runs out of memory, the batch is split in two
        (exact for per-example losses in eval mode: the halves' weights add up) and retried.
        """
        ctx = _BatchContext(self.problem, batch, params, frozen, self._engine_flags)
        try:
            self._accumulate(ctx, kernels, Xp, out, first_column)
        except _OneColumnTooLargeError as err:
            halves = self.problem.split_batch(batch)  # raises when splitting would be wrong
            logger.warning("out of memory on a batch of %d examples with one column; splitting "
                           "it into %d + %d", batch.size, halves[0].size, halves[1].size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for half in halves:  # columns before err.column are already in `out`
                self._accumulate_batch(half, params, frozen, kernels, Xp, out, err.column)

    def _accumulate(self, ctx: _BatchContext, kernels: list[tuple[float, CurvatureOperator]],
                    Xp: Tensor, out: Tensor, first_column: int = 0) -> None:
        """Add this batch's ``A_b X`` to ``out``, column chunk by column chunk."""
        k, start = Xp.shape[1], first_column
        while start < k:
            size = min(self.chunk_size or k, k - start)
            V = self.param_space.split(Xp[:, start : start + size])
            ctx.columns = slice(start, start + size)
            try:
                total: Tensor | None = None
                for coef, op in kernels:
                    part = self.param_space.join(op._batch_product(ctx, V), batched=True)
                    total = coef * part if total is None else total.add_(part, alpha=coef)
                for _, op in kernels:
                    op._commit(ctx)
            except torch.OutOfMemoryError as err:
                if size == 1:
                    raise _OneColumnTooLargeError(start) from err
                self.chunk_size = max(1, size // 2)
                logger.warning("out of memory with %d columns at once; retrying with %d",
                               size, self.chunk_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            assert total is not None  # kernels is never empty
            out[:, start : start + size] += total.to(self.dtype)
            start += size

    # ---------------------------------------------------------------- algebra
    def _same_space(self, other: LinearOperator) -> TypeGuard[CurvatureOperator]:
        return (isinstance(other, CurvatureOperator) and other.problem is self.problem
                and other.param_space == self.param_space)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if self._same_space(other):
            return CombinedCurvatureOperator([(1.0, self), (1.0, other)])
        return super().__add__(other)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        if self._same_space(other):
            return CombinedCurvatureOperator([(1.0, self), (-1.0, other)])
        return super().__sub__(other)


def _block_space(problem: Problem, params: Any) -> ParamSpace:
    if params is None:
        return problem.param_space
    chosen = select_parameters(problem.model, params)
    outside = [n for n in chosen if n not in problem.param_space.names]
    if outside:
        raise ValueError(
            f"parameters {outside} are not among the Problem's parameters "
            f"{list(problem.param_space.names)[:6]}...; select them when building the Problem."
        )
    ordered = {n: chosen[n] for n in problem.param_space.names if n in chosen}
    return ParamSpace.from_tensors({n: p.detach() for n, p in ordered.items()})


class CombinedCurvatureOperator(CurvatureOperator):
    """``sum_t c_t A_t`` of curvature operators of one Problem and block, in one data pass."""

    def __init__(self, terms: list[tuple[float, CurvatureOperator]]) -> None:
        first = terms[0][1]
        flat: list[tuple[float, CurvatureOperator]] = []
        for coef, op in terms:
            if not first._same_space(op):
                raise ValueError("combined curvature operators must share the Problem and block.")
            flat += [(coef * c, o) for c, o in op._kernels()]
        self._terms = flat
        psd = all(c >= 0 and o.is_psd for c, o in flat)
        self._tags = frozenset({SYMMETRIC} | ({PSD} if psd else set()))
        super().__init__(first.problem, params=first._options["params"],
                         chunk_size=first.chunk_size)

    def _kernels(self) -> list[tuple[float, CurvatureOperator]]:
        return self._terms

    def children(self) -> tuple[LinearOperator, ...]:
        return tuple(op for _, op in self._terms)

    def _rebuild(self, problem: Problem | None = None, **changes: Any) -> CurvatureOperator:
        return CombinedCurvatureOperator(
            [(c, o._rebuild(problem, **changes)) for c, o in self._terms]
        )


class HessianOperator(CurvatureOperator):
    """The Hessian ``H = d^2 L / d theta^2`` of the empirical risk.

    Args:
        problem: the Problem.
        params: a block of the Problem's parameters (default: all of them).
        engine: ``"forward_over_reverse"`` (``torch.func`` jvp of the gradient, vmapped over the
            columns), ``"double_backward"`` (autograd: one forward and backward per batch, then a
            batched backward over the columns), ``"finite_difference"`` (central differences of
            the gradient, Richardson-extrapolated: first derivatives only, for kernels without a
            second derivative; each product's error estimate is in :attr:`last_error_estimate`;
            see :mod:`curvscope.curvature._finite_difference`), or ``"auto"`` (default: the
            cheapest exact kernel for this model, dtype, device and number of columns, chosen by
            one timed trial on the first batch among the double-backward loop (the first
            backward's graph reused column by column), the batched double backward and the
            vmapped forward-over-reverse; see :mod:`curvscope.curvature._engine_choice`; the
            choices are in :attr:`engine_choices` and in every result's ``cost.engines``).
            ``auto`` checks the double backward once against finite differences on the first
            batch (a kernel whose backward is not itself differentiable, such as a custom
            ``autograd.Function``, gives a silently wrong double backward), excludes any kernel
            that disagrees with it, and takes finite differences, with a warning, only when no
            exact engine can run or the exact one disagrees.
        chunk_size: columns per vmapped call (default: all; halves on out-of-memory).
        richardson: finite differences with Richardson's extrapolation (4 gradients per column
            instead of 2, error ``O(h^4)`` instead of ``O(h^2)``, and a truncation estimate).

    Attributes:
        last_error_estimate: ``[k]`` estimated error norms ``||(H V)_j - H v_j||`` of the last
            finite-difference product (``None`` after an exact one).
    """

    def __init__(self, problem: Problem, *, params: Any = None,
                 engine: str = "auto", chunk_size: int | None = None,
                 richardson: bool = True) -> None:
        if engine not in HESSIAN_ENGINES:
            raise ValueError(f"engine must be one of {HESSIAN_ENGINES}, got {engine!r}.")
        self.engine = engine
        self.richardson = bool(richardson)
        self.last_error_estimate: Tensor | None = None
        self._fd: dict[str, Any] = {}
        self._fd_columns: Tensor | None = None  # the product's X, for the finite-difference steps
        super().__init__(problem, params=params, chunk_size=chunk_size, engine=engine,
                         richardson=richardson)

    @property
    def active_engine(self) -> str:
        """The engine in use: ``engine``, or the one curvscope switched to after a fallback."""
        if self._engine_flags.get("hessian_finite_difference"):
            return "finite_difference"
        return "double_backward" if self._engine_flags.get("hessian_double_backward") else self.engine

    @property
    def _second_order(self) -> bool:
        return self.active_engine != "finite_difference"

    def matmat_with_error(self, X: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(H X, error estimate [k])``; the estimate is ``None`` for exact engines."""
        return self @ X, self.last_error_estimate

    # ---------------------------------------------------------------- engines
    def _batch_product(self, ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
        k = next(iter(V.values())).shape[0]
        engine = self.active_engine
        if engine == "finite_difference":
            return self._finite_difference(ctx, V)
        if engine == "auto":
            if not self._engine_flags.get("hessian_verified"):
                self._verify_exact_engine(ctx)
                if self.active_engine == "finite_difference":
                    return self._finite_difference(ctx, V)
            return self._auto_product(ctx, V, k)
        if engine == "forward_over_reverse":
            return self._forward_over_reverse_or_fallback(ctx, V)
        return self._double_backward(ctx, V)

    @property
    def engine_choices(self) -> dict[str, dict[str, Any]]:
        """The kernels ``auto`` chose for this operator, by column bucket, with the trial's
        seconds per column (see :mod:`curvscope.curvature._engine_choice`).
        """
        prefix = self._choice_key(1).rsplit(" k=", 1)[0] + " k="
        return {key: rec for key, rec in self.problem.engine_choices.items()
                if key.startswith(prefix)}

    def measured_seconds_per_column(self, k: int) -> float | None:
        """Seconds per column of a ``k``-column product with the kernel ``auto`` chose for it.

        From the trial of that column bucket; when no product of that width has been made yet,
        the trial runs now on the first batch with random columns (its product is discarded;
        the cost of a few columns on one batch). ``None`` when the engine is forced.
        Solvers use it to choose the shape of their products (e.g. :func:`eigsh`'s block).
        """
        if self.active_engine != "auto":
            return None
        return super().measured_seconds_per_column(k)

    def _time_products(self, k: int, key: str) -> None:
        """A product on the first batch: its engine trial records the choice under ``key``
        with the trial's seconds per column (the same on every rank).
        """
        self._product_on_first_batch(k)

    _choice_name = "hessian"

    def _kernel(self, name: str, ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
        """One of :data:`HESSIAN_KERNELS`, with the usual fallbacks on a missing autodiff rule."""
        if name == "forward_over_reverse":
            return self._forward_over_reverse_or_fallback(ctx, V)
        return self._double_backward_or_fallback(ctx, V, loop=name == "double_backward_loop")

    def _trial_kernel(self, name: str, ctx: _BatchContext,
                      V: dict[str, Tensor]) -> dict[str, Tensor]:
        """One kernel without fallbacks (a failure excludes it from the trial)."""
        if name == "forward_over_reverse":
            return _forward_over_reverse(ctx, V)
        return self._double_backward(ctx, V, loop=name == "double_backward_loop",
                                     batched_fallback=False)

    def _auto_product(self, ctx: _BatchContext, V: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        record = self.problem.engine_choices.get(self._choice_key(k))
        if record is None:
            return self._engine_trial(ctx, V, k)
        return self._kernel(record["engine"], ctx, V)

    def _engine_trial(self, ctx: _BatchContext, V: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        """Time every candidate kernel on this batch and column chunk; keep the fastest one that
        agrees with the (verified) double-backward loop, and return its product.

        The loop is timed on its first :data:`LOOP_SAMPLE` columns only and extrapolated
        (:func:`loop_seconds`); the batched kernels run on all ``k`` columns, since their cost
        per column falls with ``k``. Agreement is checked on the loop's columns.
        """
        device, eps = self.device, torch.finfo(self.problem.dtype).eps
        seconds: dict[str, float | str] = {}
        extra_bytes: dict[str, int | None] = {}
        timed_columns: dict[str, int] = {}
        reference: Tensor | None = None
        best: tuple[str, dict[str, Tensor], float] | None = None
        loop_error: Exception | None = None
        for name in candidates(k):
            ctx.cache.pop("db", None)  # every double-backward candidate pays its first backward
            start = peak_memory_start(device)
            try:
                with warnings.catch_warnings():  # torch's "performance drop" notes on batching
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    if name == "double_backward_loop":
                        out, dt, sampled = self._time_loop_sample(ctx, V, k)
                    else:
                        out, dt = timed(functools.partial(self._trial_kernel, name, ctx, V),
                                        device)
                        sampled = k
            except torch.OutOfMemoryError:
                seconds[name] = "out of memory"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            except Exception as err:  # noqa: BLE001 - a kernel that cannot run is not a candidate
                if name == "double_backward_loop":
                    if not _is_missing_autodiff_rule(err):
                        raise
                    loop_error = err
                seconds[name] = f"failed: {first_line(err)[:120]}"
                continue
            extra_bytes[name], timed_columns[name] = peak_memory_extra(device, start), sampled
            if reference is None and name == "double_backward_loop":
                reference = self.param_space.join(out, batched=True)
            elif reference is not None:
                head = self.param_space.join(_columns(out, 0, reference.shape[1]), batched=True)
                gap = relative_gap(head, reference)
                if gap > AGREEMENT * eps**0.5:
                    seconds[name] = f"disagrees with double_backward_loop ({gap:.1e})"
                    continue
            seconds[name] = dt / k
            if best is None or dt < best[2]:
                best = (name, out, dt)
        if not any(isinstance(v, float) for v in seconds.values()):
            if loop_error is not None:
                return self._double_backward_or_fallback(ctx, V, loop=True)  # warns, then FD
            if all(v == "out of memory" for v in seconds.values()):
                raise torch.OutOfMemoryError(f"every Hessian kernel ran out of memory with {k} "
                                             "columns")
        mean = agreed_seconds(seconds, device)
        chosen = choose(mean)
        if chosen is None:
            raise RuntimeError(f"no exact Hessian kernel ran on some rank: {seconds}")
        record = {"engine": chosen, "seconds_per_column": seconds, "columns": k,
                  "mean_seconds_per_column": mean[chosen], "timed_columns": timed_columns,
                  "examples": ctx.batch.size, "peak_extra_bytes": extra_bytes.get(chosen)}
        self.problem.engine_choices[self._choice_key(k)] = record
        logger.info("Hessian products with %d columns: %s", k, describe(record))
        if best is None or best[0] != chosen:
            return self._kernel(chosen, ctx, V)  # another rank was faster with another kernel
        out, done = best[1], timed_columns[chosen]
        if done < k:  # the loop was timed on its first columns: the rest, with its cached graph
            rest = self._kernel(chosen, ctx, _columns(V, done, k))
            out = {n: torch.cat([out[n], rest[n]]) for n in out}
        return out

    def _time_loop_sample(self, ctx: _BatchContext, V: dict[str, Tensor], k: int
                          ) -> tuple[dict[str, Tensor], float, int]:
        """The double-backward loop on columns ``0`` and ``1 .. s-1`` (``s = min(k,
        LOOP_SAMPLE)``), timed apart: ``(their product, estimated seconds for all k, s)``.
        """
        sampled = min(k, LOOP_SAMPLE)
        loop = "double_backward_loop"
        head, first = timed(lambda: self._trial_kernel(loop, ctx, _columns(V, 0, 1)), self.device)
        if sampled == 1:
            return head, first, 1
        tail, rest = timed(lambda: self._trial_kernel(loop, ctx, _columns(V, 1, sampled)),
                           self.device)
        out = {n: torch.cat([head[n], tail[n]]) for n in head}
        return out, loop_seconds(first, rest, sampled, k), sampled

    def _forward_over_reverse_or_fallback(self, ctx: _BatchContext,
                                          V: dict[str, Tensor]) -> dict[str, Tensor]:
        try:
            return _forward_over_reverse(ctx, V)
        except Exception as err:  # noqa: BLE001 - re-raised unless a missing AD rule
            _fall_back(err, "the forward-over-reverse Hessian engine failed",
                       "using engine='double_backward' for this operator from now on")
            self._engine_flags["hessian_double_backward"] = True
        return self._double_backward_or_fallback(ctx, V)

    def _double_backward_or_fallback(self, ctx: _BatchContext, V: dict[str, Tensor],
                                     loop: bool = False) -> dict[str, Tensor]:
        if self.engine != "auto":
            return self._double_backward(ctx, V, loop=loop)
        try:
            return self._double_backward(ctx, V, loop=loop)
        except Exception as err:  # noqa: BLE001 - re-raised unless a missing AD rule
            _fall_back(err, "no exact Hessian engine runs on this model (no second derivative)",
                       "using engine='finite_difference' (central differences of the gradient, "
                       "Richardson-extrapolated, with an error estimate in last_error_estimate) "
                       "for this operator from now on")
            self._engine_flags["hessian_finite_difference"] = True
        return self._finite_difference(ctx, V)

    def _verify_exact_engine(self, ctx: _BatchContext) -> None:
        """Compare the exact engine with finite differences on one column of this batch, once.

        A disagreement far beyond the finite-difference error estimate means that the exact
        double backward is wrong for this model (a backward that is not itself differentiable):
        the operator then switches to finite differences and warns.
        """
        self._engine_flags["hessian_verified"] = True
        gen = torch.Generator(device="cpu").manual_seed(20240901)
        v = torch.randn(self.param_space.size, 1, generator=gen, dtype=torch.float64)
        V = self.param_space.split(v.to(device=self.device, dtype=self.problem.dtype))
        saved = (self._fd, ctx.columns)
        try:
            exact = self.param_space.join(self._double_backward_or_fallback(ctx, V, loop=True),
                                          batched=True)
            if self.active_engine == "finite_difference":
                return
            self._fd = self._fd_state(v.to(self.problem.dtype))
            ctx.columns = slice(0, 1)
            approx = self.param_space.join(self._finite_difference(ctx, V), batched=True)
        finally:
            check = self._fd
            self._fd, ctx.columns = saved
        _fold_pending(check)
        estimate = _fd_error(check, approx)[0]
        eps = torch.finfo(self.problem.dtype).eps
        gap = float((exact - approx).to(torch.float64).norm())
        scale = float(approx.to(torch.float64).norm())
        if gap > 10 * float(estimate) + 100 * eps**0.5 * scale:
            warnings.warn(
                f"the exact Hessian engine disagrees with finite differences of the gradient on "
                f"this model: relative difference {gap / max(scale, 1e-300):.2e} on a random "
                f"vector (finite-difference error estimate {float(estimate) / max(scale, 1e-300):.1e})"
                ". A kernel's backward is not itself differentiable (a custom autograd.Function "
                "or a detached backward?); using engine='finite_difference' for this operator.",
                EngineMismatchWarning, stacklevel=6)
            self._engine_flags["hessian_finite_difference"] = True

    # ---------------------------------------------------------------- finite differences
    def _fd_state(self, X: Tensor) -> dict[str, Any]:
        if "theta_norm" not in self._fd:
            params = self.problem.parameters()
            theta = torch.cat([params[n].reshape(-1) for n in self.param_space.names])
            self._fd["theta_norm"] = float(theta.to(torch.float64).norm())
        theta_norm = self._fd["theta_norm"]
        return {
            "theta_norm": theta_norm,
            "steps": fd_steps(theta_norm, self.param_space.size,
                              X.detach().to(torch.float64).norm(dim=0).tolist(), self.problem.dtype),
            "truncation": torch.zeros(X.shape, dtype=torch.float64, device=self.device)
            if self.richardson else None,
            "rounding": torch.zeros(X.shape[1], dtype=torch.float64, device=self.device),
            "pending": [],
        }

    def _begin_product(self, X: Tensor) -> None:
        # the finite-difference state (steps, error accumulators) is built on first use only:
        # exact products must not pay for it
        self._fd = {k: v for k, v in self._fd.items() if k == "theta_norm"}
        self._fd_columns = X
        self.last_error_estimate = None

    def _commit(self, ctx: _BatchContext) -> None:
        _fold_pending(self._fd)

    def _end_product(self, X: Tensor, out: Tensor) -> None:
        if self.active_engine == "finite_difference" and "steps" in self._fd:
            if self._fd["truncation"] is not None:
                self.problem.all_reduce(self._fd["truncation"])
            self.problem.all_reduce(self._fd["rounding"])
            self.last_error_estimate = _fd_error(self._fd, out)

    def _finite_difference(self, ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's ``(g_b(theta + h v) - g_b(theta - h v)) / 2h`` per column (see the module
        :mod:`~curvscope.curvature._finite_difference`), with the same ``h`` on every batch.
        """
        names = list(V)
        k = V[names[0]].shape[0]
        if "steps" not in self._fd:
            if self._fd_columns is None:
                raise RuntimeError("finite-difference product outside a product pass")  # pragma: no cover
            self._fd = self._fd_state(self._fd_columns)
        steps = self._fd["steps"][ctx.columns]
        eps = torch.finfo(self.problem.dtype).eps
        values, truncations, roundings = [], [], []
        for j in range(k):
            def gradient_at(t: float, j: int = j) -> Tensor:
                leaves = {n: (ctx.params[n] + t * V[n][j]).detach().requires_grad_(True)
                          for n in names}
                grads = torch.autograd.grad(ctx.loss(leaves), list(leaves.values()),
                                            allow_unused=True, materialize_grads=True)
                return torch.cat([g.reshape(-1) for g in grads])

            value, truncation, rounding = central_differences(gradient_at, steps[j],
                                                              self.richardson, eps)
            values.append(value)
            truncations.append(truncation)
            roundings.append(rounding)
        trunc = None if truncations[0] is None else torch.stack(
            [t.to(torch.float64) for t in truncations if t is not None], 1)
        self._fd["pending"].append((ctx.columns, trunc, torch.stack(roundings)))
        return self.param_space.split(torch.stack(values, 1))

    def _double_backward(self, ctx: _BatchContext, V: dict[str, Tensor],
                         loop: bool = False, batched_fallback: bool = True) -> dict[str, Tensor]:
        if "db" not in ctx.cache:
            leaves = {n: p.detach().requires_grad_(True) for n, p in ctx.params.items()}
            grads = torch.autograd.grad(ctx.loss(leaves), list(leaves.values()),
                                        create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            ctx.cache["db"] = (leaves, grads, live)
        leaves, grads, live = ctx.cache["db"]
        names = list(leaves)
        k = next(iter(V.values())).shape[0]
        if not live:
            return {n: torch.zeros_like(V[n]) for n in names}
        outputs = [grads[i] for i in live]
        tangents = [V[names[i]] for i in live]
        res: Sequence[Tensor]
        if k == 1 or loop:
            cols = [torch.autograd.grad(outputs, list(leaves.values()),
                                        grad_outputs=[t[j] for t in tangents], retain_graph=True,
                                        allow_unused=True, materialize_grads=True)
                    for j in range(k)]
            return {n: torch.stack([c[i].detach() for c in cols]) for i, n in enumerate(names)}
        try:
            # a parameter the gradient does not depend on (e.g. the last bias for a loss linear
            # in the output) gets None here, not a batched zero
            found = torch.autograd.grad(outputs, list(leaves.values()), grad_outputs=tangents,
                                        retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
            res = [torch.zeros_like(V[n]) if r is None else r for n, r in zip(names, found)]
        except RuntimeError:  # an op without a batching rule: one backward per column
            if not batched_fallback:
                raise
            cols = [torch.autograd.grad(outputs, list(leaves.values()),
                                        grad_outputs=[t[j] for t in tangents],
                                        retain_graph=True, allow_unused=True,
                                        materialize_grads=True) for j in range(k)]
            res = [torch.stack([c[i] for c in cols]) for i in range(len(names))]
        return {n: r.detach() for n, r in zip(names, res)}


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = sum_b w_b J_b^T H_{l_b} J_b``.

    ``H_l`` is the Hessian of the loss with respect to the model output ``z``, in closed form for
    cross-entropy, MSE and BCE-with-logits (no double-backward through the loss), by automatic
    differentiation of the loss alone otherwise. PSD when the loss is convex in ``z``.
    """

    _tags = frozenset({SYMMETRIC, PSD})
    _needs_loss_of_outputs = True
    _choice_name = "ggn"

    def _batch_product(self, ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
        z, _ = ctx.linearization()
        JV = ctx.jacobian_product(V)
        HJV = loss_hessian_product(self.problem.loss_fn, ctx.loss_kind(), self.problem.reduction,
                                   z, ctx.batch.target, JV)
        return ctx.transpose_jacobian_product(ctx.batch.weight * HJV)


class _PerExampleGradientKernel(CurvatureOperator):
    """Shared kernel ``c J^T [g_i <g_i, (J V)_i>]_i`` with per-example output gradients ``g_i``."""

    _tags = frozenset({SYMMETRIC, PSD})
    _needs_loss_of_outputs = True

    def _output_gradients(self, ctx: _BatchContext) -> list[Tensor]:
        raise NotImplementedError

    def _scale(self, ctx: _BatchContext) -> float:
        raise NotImplementedError

    def _batch_product(self, ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
        gs = self._output_gradients(ctx)
        JV = ctx.jacobian_product(V)
        acc = sum(g.unsqueeze(0) * _rowdot(g, JV) for g in gs)
        assert isinstance(acc, Tensor)  # gs is never empty
        U = acc * (self._scale(ctx) / len(gs))
        return ctx.transpose_jacobian_product(U)

    def _per_example_loss_gradients(self, ctx: _BatchContext) -> Tensor:
        """Rows ``g_i = d l_i / d z_i`` of the per-example losses (``l_b = mean`` or ``sum``)."""
        if "g" not in ctx.cache:
            z, _ = ctx.linearization()
            g = torch.func.grad(lambda zz: self.problem.batch_loss(zz, ctx.batch.target))(z)
            s_b = ctx.batch.size if self.problem.reduction == "mean" else 1.0
            ctx.cache["g"] = s_b * g
        return ctx.cache["g"]


class EmpiricalFisherOperator(_PerExampleGradientKernel):
    """Empirical Fisher ``E = c sum_i grad l_i grad l_i^T`` (``c = 1/N`` for mean, 1 for sum).

    ``l_i`` is the loss of example ``i`` alone, with the loss's own reduction over its outputs.
    """

    def _output_gradients(self, ctx: _BatchContext) -> list[Tensor]:
        return [self._per_example_loss_gradients(ctx)]

    def _scale(self, ctx: _BatchContext) -> float:
        return 1.0 / self.problem.num_data if self.problem.reduction == "mean" else 1.0


class GradientCovarianceOperator(_PerExampleGradientKernel):
    """Centred gradient covariance ``C = 1/N sum_i (grad l_i - g)(grad l_i - g)^T``,
    ``g = 1/N sum_i grad l_i`` (the mean per-example gradient).
    """

    def _output_gradients(self, ctx: _BatchContext) -> list[Tensor]:
        return [self._per_example_loss_gradients(ctx)]

    def _scale(self, ctx: _BatchContext) -> float:
        return 1.0 / self.problem.num_data

    def mean_gradient(self) -> Tensor:
        """``g = 1/N sum_i grad l_i`` on this operator's block (one data pass, cached)."""
        if not hasattr(self, "_mean_gradient"):
            _, g = self.problem.loss_and_gradient()
            g = g[self.problem.param_space.index_of(self.param_space)]
            if self.problem.reduction == "sum":
                g = g / self.problem.num_data
            self._mean_gradient = g.to(self.dtype)
        return self._mean_gradient

    def _correction(self, X: Tensor) -> Tensor:
        g = self.mean_gradient()
        return -torch.outer(g, g @ X)


class FisherMCOperator(_PerExampleGradientKernel):
    """Monte-Carlo Fisher: the GGN's estimate from labels sampled from the model.

    ``F = sum_b w_b r_b J_b^T (1/S sum_s g_s g_s^T) J_b`` where ``g_s`` are per-example gradients
    of the negative log-likelihood at labels drawn from the model's predictive distribution
    (categorical for cross-entropy, Bernoulli for BCE, Gaussian for MSE), so ``E[F] = G``. The
    samples are drawn from seeds fixed at construction: the operator is one fixed matrix.

    Args:
        problem: the Problem (cross-entropy, MSE or BCE-with-logits loss).
        mc_samples: ``S``, labels per example.
        generator: source of the seed (explicit randomness); default: torch's global generator.
    """

    def __init__(self, problem: Problem, *, params: Any = None, mc_samples: int = 1,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 chunk_size: int | None = None) -> None:
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}.")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.mc_samples, self.seed = mc_samples, seed
        super().__init__(problem, params=params, chunk_size=chunk_size, mc_samples=mc_samples,
                         seed=seed)

    def nll_gradient_samples(self, batch_index: int, z: Tensor, target: Any) -> list[Tensor]:
        """The ``S`` sampled gradients ``g_s`` for batch ``index`` (deterministic given the seed)."""
        kind = recognise_loss(self.problem.loss_fn, target)
        out = []
        for s in range(self.mc_samples):
            gen = torch.Generator(device=z.device)
            gen.manual_seed((self.seed + 1_000_003 * batch_index + 7919 * s) % 2**63)
            out.append(sample_nll_gradients(kind, z, target, gen))
        return out

    def _output_gradients(self, ctx: _BatchContext) -> list[Tensor]:
        if "mc" not in ctx.cache:
            z, _ = ctx.linearization()
            ctx.cache["mc"] = self.nll_gradient_samples(ctx.batch.index, z, ctx.batch.target)
        return ctx.cache["mc"]

    def _scale(self, ctx: _BatchContext) -> float:
        z, _ = ctx.linearization()
        r = reduction_factor(ctx.loss_kind(), self.problem.reduction, z, ctx.batch.target)
        return ctx.batch.weight * r


def _columns(V: dict[str, Tensor], lo: int, hi: int) -> dict[str, Tensor]:
    """Columns ``lo:hi`` of a batched parameter-shaped block ``{name: [k, *shape]}``."""
    return {n: v[lo:hi] for n, v in V.items()}


def _forward_over_reverse(ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
    """``H_b V``: the jvp of the batch's gradient, vmapped over the ``k`` columns."""
    grad_fn = grad(ctx.loss)
    return vmap(lambda v: jvp(grad_fn, (ctx.params,), (v,))[1])(V)


def _fold_pending(state: dict[str, Any]) -> None:
    """Add the side results of a succeeded batch chunk to the finite-difference accumulators."""
    for cols, truncation, rounding in state.get("pending", []):
        if truncation is not None:
            state["truncation"][:, cols] += truncation
        state["rounding"][cols] += rounding
    if state:
        state["pending"] = []


def _fd_error(state: dict[str, Any], product: Tensor) -> Tensor:
    """``[k]`` error estimates of the finite-difference product ``product [P, k]``."""
    rounding = state["rounding"].sqrt()
    if state["truncation"] is None:
        return rounding
    norms = product.detach().to(torch.float64).norm(dim=0)
    return richardson_truncation(state["truncation"].norm(dim=0), norms) + rounding


def _product_error(op: CurvatureOperator, err: BaseException) -> CurvatureProductError:
    """What failed (engine, module type), why (the first line of torch's error) and what to do."""
    from curvscope.curvature._diagnose import locate_failure

    engine = getattr(op, "active_engine", None) or "Jacobian products"
    where = locate_failure(op.problem, err)
    fixes = []
    if op.problem.attention == "native" and "scaled_dot_product" in str(err):
        fixes.append("use attention='auto' (SDPA's math path has second derivatives)")
    if isinstance(op, HessianOperator) and op.active_engine != "finite_difference":
        fixes.append("pass engine='finite_difference' (first derivatives only, with an error "
                     "estimate)")
    elif not isinstance(op, HessianOperator):
        fixes.append("the Hessian with engine='finite_difference' needs first derivatives only")
    fixes.append("or replace the module by one built from differentiable torch ops")
    return CurvatureProductError(
        f"{type(op).__name__} product failed (engine {engine!r}) in {where}: {first_line(err)}; "
        f"{'; '.join(fixes)}."
    )


class _LinearizedLossContext(_BatchContext):
    """A batch seen through its loss linearised in the model output.

    ``l_res(theta) = w_b <r_b, z_b(theta)>`` with ``r_b = d l_b / d z`` at the current
    parameters, held fixed. Its gradient is the batch's gradient at ``theta`` and its Hessian is
    Papyan's residual: ``nabla^2 l_res = w_b sum_ik r_ik nabla^2 z_ik = H_b - G_b`` (the Gauss-Newton
    term ``J^T H_l J`` needs the loss to be curved in ``z``; a linear function of ``z`` has none).
    Every Hessian kernel applies to it unchanged, with a cache of its own (the double-backward
    graph of ``l_res`` is not the Hessian's).
    """

    def __init__(self, parent: _BatchContext) -> None:
        self.parent = parent
        self.problem, self.batch, self.params = parent.problem, parent.batch, parent.params
        self.frozen, self.problem_flags = parent.frozen, parent.problem_flags
        self.cache = {}
        with torch.no_grad():
            z = self.output(parent.params)
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            (r,) = torch.autograd.grad(self.problem.batch_loss(z, self.batch.target), z)
        self.residual_weights = r.detach()

    @property
    def columns(self) -> slice:
        """The parent's: the product's column chunk is set on the batch's context."""
        return self.parent.columns

    @columns.setter
    def columns(self, value: slice) -> None:
        self.parent.columns = value

    def loss(self, params: dict[str, Tensor]) -> Tensor:
        """``w_b <r_b, z_b(theta)>``."""
        return self.batch.weight * (self.residual_weights * self.output(params)).sum()


class ResidualOperator(HessianOperator):
    """Papyan's residual ``H_res = H - G`` (Hessian minus Gauss-Newton), exactly, in one pass.

    .. math:: H_{res} = \\sum_b w_b \\sum_i \\sum_k (\\partial l_b / \\partial z_{ik})
              \\nabla^2_\\theta z_{ik}

    computed as the Hessian of the loss linearised in the output, ``w_b <r_b, z_b(theta)>`` with
    ``r_b = d l_b / d z`` fixed (:class:`_LinearizedLossContext`): one Hessian product per
    column, with the same engines, choice and fallbacks as :class:`HessianOperator` (``engine``,
    ``chunk_size``, ``richardson`` as there), instead of a Hessian and a Gauss-Newton product.
    The loss must be a function of the model's output (as for :class:`GGNOperator`).

    References:
        V. Papyan, "The full spectrum of deepnet Hessians at scale", 2018 (arXiv:1811.07062).
    """

    _needs_loss_of_outputs = True

    def _batch_product(self, ctx: _BatchContext, V: dict[str, Tensor]) -> dict[str, Tensor]:
        if "linearized_loss" not in ctx.cache:
            ctx.cache["linearized_loss"] = _LinearizedLossContext(ctx)
        return super()._batch_product(ctx.cache["linearized_loss"], V)

    _choice_name = "residual"
