"""Dense float64 ground truth for curvature matrices.

Everything here is built independently of the rest of curvscope (plain autograd
and ``torch.func`` only) so that matrix-free operators can be checked against it.
All functions work on a float64 CPU *copy* of the model: the user's model, its
mode, parameters, buffers and ``.grad`` fields are never touched. Parameters are
addressed through a flat vector ``theta`` (concatenation of ``p.reshape(-1)`` in
``named_parameters()`` order) that is unflattened into a dict for
``torch.func.functional_call``; parameters that are not selected stay fixed at
their current values and buffers are used as they are.

Conventions
-----------
``batches`` is a list of ``(inputs, target)``; ``inputs`` is a Tensor (called as
``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``). The model output
may be a tensor, a dict with a ``"logits"`` key or an object with a ``logits``
attribute. The dataset loss is

    L(theta) = sum_b w_b * loss_fn(model(theta, x_b), y_b),

with ``w_b = n_b / N`` for ``reduction="mean"`` (``n_b = y_b.shape[0]``,
``N = sum_b n_b``) and ``w_b = 1`` for ``reduction="sum"``.

Note: BatchNorm-like modules that are in training mode use batch statistics;
in the internal copy their running statistics are dropped (as in
``torch.func.replace_all_batch_norm_modules_``), which leaves the outputs
unchanged but avoids in-place updates that ``vmap`` cannot handle.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "flat_params",
    "dense_loss",
    "dense_gradient",
    "dense_hessian",
    "dense_hessian_checked",
    "dense_jacobian",
    "dense_ggn",
    "per_example_gradients",
    "dense_empirical_fisher",
    "dense_gradient_covariance",
]

_F64 = torch.float64


def _to64(obj: Any) -> Any:
    """Return a detached CPU copy of (nested) inputs; floating tensors become float64."""
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu()
        return obj.to(_F64) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _to64(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to64(v) for v in obj)
    return obj


def _slice(obj: Any, i: int, n: int) -> Any:
    """Slice example ``i`` (``[i:i+1]``) out of every (nested) tensor whose first dim is ``n``."""
    if isinstance(obj, Tensor):
        return obj[i : i + 1] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, Mapping):
        return {k: _slice(v, i, n) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_slice(v, i, n) for v in obj)
    return obj


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"model output of type {type(out).__name__} is not a Tensor and has no logits")


def _grad(fn: Callable[[Tensor], Tensor], theta0: Tensor) -> Tensor:
    """Plain autograd gradient of a scalar function at ``theta0``."""
    theta = theta0.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(theta), theta, allow_unused=True, materialize_grads=True)
    return g.detach()


def _rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius distance ``||a - b|| / max(||a||, ||b||)`` (0 if both are 0)."""
    scale = max(a.norm().item(), b.norm().item())
    return 0.0 if scale == 0.0 else (a - b).norm().item() / scale


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def flat_params(
    model: nn.Module, param_names: Sequence[str] | None = None
) -> tuple[list[str], Tensor]:
    """Return the selected parameter names and their flat float64 concatenation.

    ``theta0 = cat([p.reshape(-1) for p in selected])``, in the order of ``names``.

    Args:
        model: the module (not modified).
        param_names: names to select, in this order; default: every parameter with
            ``requires_grad``, in ``model.named_parameters()`` order.

    Returns:
        ``(names, theta0)`` with ``theta0`` a new float64 CPU tensor of shape ``[P]``.
    """
    named = dict(model.named_parameters())
    if param_names is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        names = list(param_names)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise KeyError(f"unknown parameter names: {unknown}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names: {names}")
    flat = [named[n].detach().reshape(-1).to("cpu", _F64) for n in names]
    return names, torch.cat(flat) if flat else torch.zeros(0, dtype=_F64)


class _Setup:
    """Float64 CPU copy of model, loss and data; functions of the flat vector ``theta``."""

    def __init__(self, model, loss_fn, batches, param_names=None, reduction="mean"):
        _check_reduction(reduction)
        self.model = copy.deepcopy(model).to("cpu", _F64)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
                # batch statistics either way; without buffers there are no in-place updates
                m.running_mean = m.running_var = m.num_batches_tracked = None
        self.names, self.theta0 = flat_params(self.model, param_names)
        named = dict(self.model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        self.numels = [named[n].numel() for n in self.names]
        if isinstance(loss_fn, nn.Module):
            loss_fn = copy.deepcopy(loss_fn).to("cpu", _F64)
        self.loss_fn = loss_fn
        self.batches = [(_to64(x), _to64(y)) for x, y in batches]
        sizes = [y.shape[0] for _, y in self.batches]
        self.weights = [n / sum(sizes) if reduction == "mean" else 1.0 for n in sizes]

    def output(self, theta: Tensor, inputs: Any) -> Tensor:
        pieces = zip(self.names, theta.split(self.numels), self.shapes, strict=True)
        params = {n: t.reshape(shape) for n, t, shape in pieces}
        if isinstance(inputs, Mapping):
            out = functional_call(self.model, params, (), dict(inputs))
        elif isinstance(inputs, tuple):
            out = functional_call(self.model, params, inputs)
        else:
            out = functional_call(self.model, params, (inputs,))
        return _logits(out)

    def batch_loss(self, theta: Tensor, inputs: Any, target: Tensor) -> Tensor:
        return self.loss_fn(self.output(theta, inputs), target)

    def loss(self, theta: Tensor) -> Tensor:
        terms = zip(self.batches, self.weights, strict=True)
        return sum(w * self.batch_loss(theta, x, y) for (x, y), w in terms)

    def jacobians(self) -> list[Tensor]:
        out = []
        for x, _ in self.batches:
            def flat_output(th: Tensor, x: Any = x) -> Tensor:
                return self.output(th, x).reshape(-1)

            out.append(torch.func.jacrev(flat_output)(self.theta0).detach())
        return out

    def per_example_gradients(self) -> Tensor:
        rows = []
        for x, y in self.batches:
            n = y.shape[0]
            for i in range(n):
                xi, yi = _slice(x, i, n), y[i : i + 1]

                def example_loss(th: Tensor, a: Any = xi, b: Tensor = yi) -> Tensor:
                    return self.batch_loss(th, a, b)

                rows.append(_grad(example_loss, self.theta0))
        return torch.stack(rows) if rows else torch.zeros(0, self.theta0.numel(), dtype=_F64)


def _hessian_autograd(s: _Setup) -> Tensor:
    """Double backward, one row ``H[i] = d(dL/dtheta_i)/dtheta`` at a time."""
    theta = s.theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s.loss(theta), theta, create_graph=True, allow_unused=True,
                               materialize_grads=True)
    H = torch.zeros(theta.numel(), theta.numel(), dtype=_F64)
    if g.requires_grad:
        for i in range(theta.numel()):
            (H[i],) = torch.autograd.grad(g[i], theta, retain_graph=True, allow_unused=True,
                                          materialize_grads=True)
    return H


def _hessian_jacfwd(s: _Setup) -> Tensor:
    """Forward-over-reverse ``torch.func.jacfwd(torch.func.jacrev(L))``."""
    return torch.func.jacfwd(torch.func.jacrev(s.loss))(s.theta0).detach()


def _hessian_fd(s: _Setup, rel_step: float = 1e-5) -> Tensor:
    """Central differences of the gradient, ``H[:, i] = (g(θ + h e_i) - g(θ - h e_i)) / 2h``."""
    P = s.theta0.numel()
    H = torch.zeros(P, P, dtype=_F64)
    for i in range(P):
        h = rel_step * max(1.0, abs(s.theta0[i].item()))
        tp, tm = s.theta0.clone(), s.theta0.clone()
        tp[i] += h
        tm[i] -= h
        H[:, i] = (_grad(s.loss, tp) - _grad(s.loss, tm)) / (tp[i] - tm[i])
    return H


_HESSIAN_METHODS: dict[str, Callable[[_Setup], Tensor]] = {
    "autograd": _hessian_autograd,
    "jacfwd": _hessian_jacfwd,
    "fd": _hessian_fd,
}


def dense_loss(model, loss_fn, batches, *, param_names=None, reduction="mean") -> float:
    """Evaluate the dataset loss ``L(theta0) = sum_b w_b * loss_fn(model(x_b), y_b)``.

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).
        reduction: ``"mean"`` (``w_b = n_b / N``) or ``"sum"`` (``w_b = 1``).

    Returns:
        The loss as a Python float (computed in float64).
    """
    s = _Setup(model, loss_fn, batches, param_names, reduction)
    with torch.no_grad():
        return float(s.loss(s.theta0))


def dense_gradient(model, loss_fn, batches, *, param_names=None, reduction="mean") -> Tensor:
    """Compute the gradient ``dL/dtheta`` of the dataset loss by plain autograd.

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).
        reduction: ``"mean"`` (``w_b = n_b / N``) or ``"sum"`` (``w_b = 1``).

    Returns:
        float64 tensor of shape ``[P]``, ordered as :func:`flat_params`.
    """
    s = _Setup(model, loss_fn, batches, param_names, reduction)
    return _grad(s.loss, s.theta0)


def dense_hessian(
    model, loss_fn, batches, *, param_names=None, reduction="mean", method="autograd"
) -> Tensor:
    """Compute the dense Hessian ``H = d^2 L / dtheta^2`` of the dataset loss.

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).
        reduction: ``"mean"`` (``w_b = n_b / N``) or ``"sum"`` (``w_b = 1``).
        method: ``"autograd"`` (double backward, one row at a time), ``"jacfwd"``
            (``torch.func.jacfwd(torch.func.jacrev(L))``; wrong for affine layer_norm and
            train-mode batch_norm in current torch) or ``"fd"`` (central differences of the
            autograd gradient, relative step 1e-5; for cross-checking only, ~1e-8 accurate).

    Returns:
        float64 tensor of shape ``[P, P]``.
    """
    if method not in _HESSIAN_METHODS:
        raise ValueError(f"method must be one of {sorted(_HESSIAN_METHODS)}, got {method!r}")
    return _HESSIAN_METHODS[method](_Setup(model, loss_fn, batches, param_names, reduction))


def dense_hessian_checked(
    model, loss_fn, batches, *, param_names=None, reduction="mean", rtol=1e-9, fd_rtol=1e-4
) -> Tensor:
    """Compute the autograd Hessian, cross-checked against jacfwd (or finite differences).

    Computes ``H_ag`` (autograd) and ``H_fw`` (jacfwd of jacrev) and requires both to be
    symmetric and to agree, in relative Frobenius norm ``< rtol``. If ``H_fw`` is
    asymmetric or disagrees (torch's forward-mode second derivatives of affine
    ``layer_norm`` and train-mode ``batch_norm`` are wrong), a ``RuntimeWarning`` is emitted
    and ``H_ag`` is compared with the finite-difference Hessian at tolerance ``fd_rtol``.

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).
        reduction: ``"mean"`` (``w_b = n_b / N``) or ``"sum"`` (``w_b = 1``).
        rtol: tolerance for symmetry and autograd/jacfwd agreement.
        fd_rtol: tolerance for the autograd/finite-difference fallback.

    Returns:
        ``H_ag``, float64 ``[P, P]``.

    Raises:
        RuntimeError: if ``H_ag`` is asymmetric or disagrees with finite differences.
    """
    s = _Setup(model, loss_fn, batches, param_names, reduction)
    H = _HESSIAN_METHODS["autograd"](s)
    asym = _rel(H, H.T)
    if asym >= rtol:
        raise RuntimeError(f"autograd Hessian is asymmetric: rel ||H - H^T|| = {asym:.3e}")
    H_fw = _HESSIAN_METHODS["jacfwd"](s)
    err_fw, asym_fw = _rel(H, H_fw), _rel(H_fw, H_fw.T)
    if err_fw < rtol and asym_fw < rtol:
        return H
    err_fd = _rel(H, _HESSIAN_METHODS["fd"](s))
    warnings.warn(
        f"dense_hessian_checked: jacfwd(jacrev) Hessian disagrees with autograd (rel err "
        f"{err_fw:.3e}, jacfwd asymmetry {asym_fw:.3e}, rtol {rtol:.1e}); autograd vs finite "
        f"differences: rel err {err_fd:.3e} (fd_rtol {fd_rtol:.1e}). Returning autograd.",
        RuntimeWarning,
        stacklevel=2,
    )
    if not err_fd < fd_rtol:
        raise RuntimeError(
            f"autograd Hessian disagrees with finite differences: rel err {err_fd:.3e} >= "
            f"{fd_rtol:.1e} (and with jacfwd: {err_fw:.3e})"
        )
    return H


def dense_jacobian(model, batches, *, param_names=None) -> list[Tensor]:
    """Compute per-batch Jacobians ``J_b = d vec(model(theta, x_b)) / dtheta`` with jacrev.

    Args:
        model: the module (a float64 CPU copy is used).
        batches: list of ``(inputs, target)`` (targets are ignored).
        param_names: selected parameters (default: all with ``requires_grad``).

    Returns:
        list of float64 tensors, one ``[numel(output_b), P]`` per batch, rows ordered as
        ``output_b.reshape(-1)`` (row-major).
    """
    return _Setup(model, None, batches, param_names).jacobians()


def dense_ggn(model, loss_fn, batches, *, param_names=None, reduction="mean") -> Tensor:
    """Compute the generalized Gauss-Newton matrix ``G = sum_b w_b J_b^T H_b J_b``.

    ``J_b`` is the Jacobian of the flattened output of batch ``b`` (:func:`dense_jacobian`)
    and ``H_b = d^2 loss_fn(z, y_b) / dz^2`` the Hessian of the loss w.r.t. the flattened
    output ``z`` at ``z = model(theta0, x_b)``, by ``torch.func.hessian`` (no closed forms).

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).
        reduction: ``"mean"`` (``w_b = n_b / N``) or ``"sum"`` (``w_b = 1``).

    Returns:
        float64 tensor of shape ``[P, P]``.
    """
    s = _Setup(model, loss_fn, batches, param_names, reduction)
    G = torch.zeros(s.theta0.numel(), s.theta0.numel(), dtype=_F64)
    for (x, y), w, J in zip(s.batches, s.weights, s.jacobians(), strict=True):
        with torch.no_grad():
            z0 = s.output(s.theta0, x)
        H = torch.func.hessian(lambda z, y=y, shape=z0.shape: s.loss_fn(z.reshape(shape), y))
        G += w * (J.T @ H(z0.reshape(-1)).detach() @ J)
    return G


def per_example_gradients(model, loss_fn, batches, *, param_names=None) -> Tensor:
    """Compute per-example gradients ``g_i = d loss_fn(model(x_i), y_i) / dtheta`` by autograd.

    Example ``i`` of a batch is the slice ``[i:i+1]`` of the target and of every input tensor
    whose first dimension equals the batch size ``n_b = target.shape[0]``; the loss_fn's own
    reduction applies within the single example (e.g. MSE "mean" divides by the output size).

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).

    Returns:
        float64 tensor of shape ``[N, P]`` (examples in batch order).
    """
    return _Setup(model, loss_fn, batches, param_names).per_example_gradients()


def dense_empirical_fisher(
    model, loss_fn, batches, *, param_names=None, reduction="mean"
) -> Tensor:
    """Compute the empirical Fisher ``F = c sum_i g_i g_i^T``, ``c = 1/N`` ("mean") or 1 ("sum").

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``; ``g_i`` as in
            :func:`per_example_gradients`.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        float64 tensor of shape ``[P, P]``.
    """
    _check_reduction(reduction)
    g = per_example_gradients(model, loss_fn, batches, param_names=param_names)
    return g.T @ g / (g.shape[0] if reduction == "mean" else 1)


def dense_gradient_covariance(model, loss_fn, batches, *, param_names=None) -> Tensor:
    """Compute ``C = (1/N) sum_i (g_i - gbar)(g_i - gbar)^T`` with ``gbar = (1/N) sum_i g_i``.

    Args:
        model: the module (a float64 CPU copy is used).
        loss_fn: ``loss_fn(output, target) -> scalar``; ``g_i`` as in
            :func:`per_example_gradients`.
        batches: list of ``(inputs, target)``, see the module docstring.
        param_names: selected parameters (default: all with ``requires_grad``).

    Returns:
        float64 tensor of shape ``[P, P]``.
    """
    g = per_example_gradients(model, loss_fn, batches, param_names=param_names)
    gc = g - g.mean(0)
    return gc.T @ gc / g.shape[0]
