"""Problem: the data contract between a user's model, loss and data and the curvature operators.

The empirical risk over the whole dataset is

.. math::

    L(\\theta) = \\sum_b w_b \\, \\ell_b(\\theta), \\qquad
    w_b = n_b / N \\ (\\text{reduction "mean"}), \\qquad w_b = 1 \\ (\\text{reduction "sum"}),

where ``l_b`` is the user's loss on batch ``b`` (with its own reduction), ``n_b`` is the number of
examples in batch ``b`` (``batch_size_fn``) and ``N = sum_b n_b``. With reduction ``mean`` this
is exactly the mean loss over all examples even when the last batch is short; weighting batches
equally (hessian-eigenthings 1.0) is wrong for unequal batches.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvscope import distributed
from curvscope.curvature._attention import (
    ATTENTION_MODES,
    AttentionBackendWarning,
    AttentionProbe,
    fast_path_disabled,
    probe_attention,
    product_context,
)
from curvscope.curvature._input_checks import check_not_meta, check_target_shape
from curvscope.curvature._losses import ModelOutputLoss, TokenCrossEntropyLoss, count_loss_terms
from curvscope.curvature._nested import default_batch_size_fn, map_tensors, tensors_of
from curvscope.curvature._param_space import ParamSpace, select_parameters

logger = logging.getLogger(__name__)

MODES = ("eval", "batch_stats")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Batch:
    """One batch, unpacked and checked: what the curvature engines see."""

    index: int
    inputs: Any  # Tensor (model(x)), tuple (model(*x)) or dict (model(**x))
    target: Any
    size: int  # n_b, from batch_size_fn
    weight: float  # w_b: n_b / N for reduction "mean", 1 for "sum"


def default_batch_fn(batch: Any, label_key: str = "labels") -> tuple[Any, Any]:
    """Split a batch into ``(inputs, target)``: ``(x, y)`` tuples, or dicts with a ``labels`` key.

    Raises:
        TypeError: for other batch formats (pass ``batch_fn=`` to the Problem).
    """
    if isinstance(batch, Mapping):
        if label_key not in batch:
            raise TypeError(
                f"a dict batch needs the key {label_key!r} for the targets, got keys "
                f"{sorted(batch)}; pass batch_fn=lambda b: (inputs, target) to the Problem."
            )
        return {k: v for k, v in batch.items() if k != label_key}, batch[label_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise TypeError(
        f"expected batches as (inputs, target) pairs or dicts with a 'labels' key, got "
        f"{type(batch).__name__}{length}; pass batch_fn=lambda b: (inputs, target) to the Problem."
    )


def default_output_fn(output: Any) -> Tensor:
    """Take the model's prediction: a tensor, or the ``logits`` of a HuggingFace-style output."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model returned {type(output).__name__}, expected a Tensor or an object with a "
        "`logits` tensor; pass output_fn=lambda out: out[...] to the Problem."
    )


def _infer_reduction(loss_fn: Callable, reduction: str | None) -> str:
    own = getattr(loss_fn, "reduction", None) if isinstance(loss_fn, nn.Module) else None
    if own is not None and reduction is not None and own != reduction:
        raise ValueError(
            f"reduction={reduction!r} contradicts the loss module's reduction={own!r}; "
            "drop the reduction argument or build the loss with the one you mean."
        )
    chosen = reduction or own or "mean"
    if chosen not in ("mean", "sum"):
        raise ValueError(
            f"the loss must reduce to a scalar with reduction 'mean' or 'sum', got {chosen!r}; "
            f"build it with reduction='mean' (e.g. {type(loss_fn).__name__}(reduction='mean'))."
        )
    return chosen


class Problem:
    """A model, a loss and a dataset: the empirical risk whose curvature curvscope measures.

    Args:
        model: any ``nn.Module``. It is never modified: training flags, buffers, ``.grad`` and
            parameters are exactly as they were after any use.
        loss_fn: a criterion module (``nn.CrossEntropyLoss()``) or a function
            ``loss_fn(output, target) -> scalar``.
        data: a DataLoader or any re-iterable of batches (a list works). Batches are
            ``(inputs, target)`` pairs or dicts with a ``labels`` key (HuggingFace style).
        params: which parameters: ``None`` (all with ``requires_grad``), a list of names, a regex,
            a submodule or a list of submodules.
        reduction: ``"mean"`` or ``"sum"``; taken from the loss module when it has one.
        batch_fn: ``batch -> (inputs, target)``; inputs a Tensor (``model(x)``), tuple
            (``model(*x)``) or dict (``model(**x)``).
        output_fn: ``model output -> prediction tensor`` (default: the tensor, or ``.logits``).
        batch_size_fn: ``target -> n_b``, the number of terms the batch's ``mean`` loss averages
            over. Default: for cross-entropy losses (``nn.CrossEntropyLoss``,
            :class:`~curvscope.TokenCrossEntropyLoss`, :class:`~curvscope.CausalLMLoss`) the
            targets not equal to ``ignore_index`` (after a causal LM's shift), so token-level
            losses over batches with different padding are weighted exactly; for the model's own
            loss (:class:`~curvscope.ModelOutputLoss`) likewise; otherwise ``target.shape[0]``.
        num_data: ``N = sum_b n_b`` if known; otherwise one counting pass over the data.
        mode: ``"eval"`` (BatchNorm uses running statistics) or ``"batch_stats"`` (BatchNorm
            normalises with each batch's statistics and does not update the running ones).
            Dropout is off in both.
        accumulate_dtype: dtype of the operators (and of the accumulation of per-batch products),
            e.g. ``torch.float64`` for a float32 model. Default: the parameters' dtype.
        move_batches: move batch tensors to the parameters' device and cast floating tensors to
            their dtype. Off by default: a mismatch is an error that says so.
        check_determinism: run :meth:`check_determinism` at construction.
        progress: show a progress bar over batches (tqdm).
        shard: under ``torch.distributed`` (more than one rank): ``"round_robin"`` (every rank is
            given the same data and keeps batches ``rank, rank + W, ...``) or ``"local"`` (the
            data are already this rank's shard). Products, counts and gradients are all-reduced.
        attention: kernels of the exact second-order products. ``"auto"`` (default): when the
            model calls a fused ``scaled_dot_product_attention`` kernel (no second derivative),
            run those products on SDPA's math backend and say so once, with the memory it adds;
            ``"math"``: the same, silently; ``"native"``: leave the kernels as they are (for
            ``engine="finite_difference"``). The eval-mode fast path of
            ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` is off in every product.
        engine_choices: kernels for ``engine="auto"`` to use instead of timing trials, e.g. a
            previous result's ``cost.engines`` (replays that run's products bitwise).

    A ``torch.compile``'d model is analysed through its original module (compiled graphs have no
    double backward); the parameters are the same tensors.

    Raises:
        TypeError, ValueError: bad input; every message says what was expected, what came and
            the fix.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Iterable[Any],
        *,
        params: Any = None,
        reduction: str | None = None,
        batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        num_data: int | None = None,
        mode: str = "eval",
        accumulate_dtype: torch.dtype | None = None,
        move_batches: bool = False,
        check_determinism: bool = False,
        progress: bool = False,
        validate: bool = True,
        shard: str = "round_robin",
        attention: str = "auto",
        engine_choices: Mapping[str, Any] | None = None,
    ) -> None:
        distributed.ensure_process_group()  # under torchrun without init_process_group: init it
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        model = _uncompiled(model)
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}.")
        self.attention = attention
        self._attention_probe: AttentionProbe | None = None
        self._attention_announced = False
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable (e.g. nn.CrossEntropyLoss()), got "
                f"{type(loss_fn).__name__}."
            )
        if isinstance(data, (Tensor, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(
                f"data must be a DataLoader or a list of batches, got {type(data).__name__}; "
                "wrap a single batch as [batch]."
            )
        if iter(data) is data:
            raise TypeError(
                "data is a one-shot iterator (a generator?), but curvature products pass over the "
                "data many times; pass a DataLoader or a list of batches."
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if shard not in distributed.SHARDING:
            raise ValueError(f"shard must be one of {distributed.SHARDING}, got {shard!r}.")
        self.shard = shard
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.reduction = _infer_reduction(loss_fn, reduction)
        own_loss = isinstance(loss_fn, ModelOutputLoss)
        self.batch_fn = batch_fn or (_model_loss_batch_fn(cast(ModelOutputLoss, loss_fn)) if own_loss
                                     else default_batch_fn)
        self.output_fn = output_fn or (_identity if own_loss else default_output_fn)
        self.batch_size_fn = batch_size_fn or _loss_terms_counter(loss_fn, model)
        self.mode = mode
        self.move_batches = move_batches
        self.progress = progress
        check_not_meta(model)
        self._params = select_parameters(model, params)
        self.param_space = ParamSpace.from_tensors(self._params)
        if accumulate_dtype is not None and not accumulate_dtype.is_floating_point:
            raise TypeError(f"accumulate_dtype must be a floating dtype, got {accumulate_dtype}.")
        self.accumulate_dtype = accumulate_dtype or self.param_space.dtype
        self._example_filter: Callable[[Any, Any], Tensor] | None = None
        self._filter_description = "all examples"
        self.num_data_passes = 0
        #: kernels chosen by ``engine="auto"`` trials, by operator, block, dtype, device and
        #: column bucket (see :mod:`curvscope.curvature._engine_choice`); shared with the
        #: problems derived by ``restrict_examples``, saved in checkpoints, reported in costs
        self.engine_choices: dict[str, dict[str, Any]] = copy.deepcopy(dict(engine_choices or {}))
        self._num_data = self._count(num_data)
        if validate:
            self.validate()
        if check_determinism:
            self.check_determinism()

    # ---------------------------------------------------------------- basic facts
    @property
    def device(self) -> torch.device:
        """Device of the selected parameters (and of every operator built on them)."""
        return self.param_space.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the selected parameters."""
        return self.param_space.dtype

    @property
    def num_data(self) -> int:
        """``N``: the number of examples (sum of ``batch_size_fn`` over the batches)."""
        return self._num_data

    @property
    def data_unit(self) -> str:
        """What ``num_data`` counts: ``"tokens"`` for token-level losses, ``"examples"`` otherwise."""
        if isinstance(self.loss_fn, TokenCrossEntropyLoss):
            return "tokens"
        if isinstance(self.loss_fn, ModelOutputLoss) and self.loss_fn.counting(self.model) == "shifted":
            return "tokens"
        return "examples"

    @property
    def num_params(self) -> int:
        """``P``: the number of selected parameter entries."""
        return self.param_space.size

    def parameters(self) -> dict[str, Tensor]:
        """The selected parameters, detached from the user's autograd graph (not copies)."""
        return {n: p.detach() for n, p in self._params.items()}

    def frozen_parameters(self, exclude: Iterable[str]) -> dict[str, Tensor]:
        """Every model parameter not in ``exclude``, detached: held fixed in products."""
        skip = set(exclude)
        return {n: p.detach() for n, p in self.model.named_parameters() if n not in skip}

    def __repr__(self) -> str:
        loss = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        return (
            f"Problem(model={type(self.model).__name__}, loss={loss}, "
            f"N={self.num_data}, P={self.num_params}, reduction={self.reduction!r}, mode={self.mode!r}, "
            f"examples={self._filter_description}, device={self.device}, dtype={self.dtype})"
        )

    # ---------------------------------------------------------------- subsets
    def restrict_to_class(self, c: int) -> Problem:
        """The same problem on the examples whose (integer) target equals ``c``.

        The operators built on it are the curvature of the loss over those examples only, with
        reduction ``mean`` normalised by their number ``N_c``.
        """
        return self.restrict_examples(lambda inputs, target: target == c, f"class {c}")

    def restrict_examples(
        self, mask_fn: Callable[[Any, Any], Tensor], description: str = "a subset"
    ) -> Problem:
        """The same problem on the examples selected by ``mask_fn(inputs, target) -> bool [n_b]``."""
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        previous = self._example_filter

        def combined(inputs: Any, target: Any) -> Tensor:
            mask = mask_fn(inputs, target)
            return mask if previous is None else mask & previous(inputs, target)

        new._example_filter = combined
        new._filter_description = description
        new.num_data_passes = 0
        new._num_data = new._count(None)
        return new

    # ---------------------------------------------------------------- data
    def _prepare(self, raw: Any) -> tuple[Any, Any]:
        inputs, target = self.batch_fn(raw)
        if self._example_filter is not None:
            mask = self._example_filter(inputs, target)
            n = int(mask.shape[0])
            keep = mask.nonzero().squeeze(1)

            def take(t: Tensor) -> Tensor:
                return t.index_select(0, keep.to(t.device)) if t.ndim and t.shape[0] == n else t

            inputs, target = map_tensors(inputs, take), map_tensors(target, take)
        if self.move_batches:
            def move(t: Tensor) -> Tensor:
                dtype = self.dtype if t.is_floating_point() else t.dtype
                return t.to(device=self.device, dtype=dtype)

            inputs, target = map_tensors(inputs, move), map_tensors(target, move)
        return inputs, target

    def _raw_batches(self) -> Iterator[tuple[Any, Any]]:
        for _, inputs, target in self._indexed_batches():
            yield inputs, target

    def _indexed_batches(self) -> Iterator[tuple[int, Any, Any]]:
        """Batches of this rank with their global index (all of them in one process)."""
        rank, size = distributed.world()
        keep_all = size == 1 or self.shard == "local"
        for i, raw in enumerate(self.data):
            if keep_all or i % size == rank:
                inputs, target = self._prepare(raw)
                yield i, inputs, target

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum a per-rank partial result over the ranks (no-op in one process)."""
        return distributed.all_reduce_sum(t)

    def _count(self, num_data: int | None) -> int:
        if num_data is not None:
            if not isinstance(num_data, int) or num_data <= 0:
                raise ValueError(f"num_data must be a positive int, got {num_data!r}.")
            return num_data
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _, target in self._raw_batches():
            local[0] += 1
            local[1] += self.batch_size_fn(target)
        seen, total = (int(v) for v in self.all_reduce(local).tolist())
        if seen == 0:
            raise ValueError("data is empty: expected at least one batch, got none.")
        if total <= 0:
            raise ValueError(
                f"data holds no examples ({self._filter_description}): every batch has size 0."
            )
        return total

    def batches(self) -> Iterator[Batch]:
        """One pass over the data: checked, weighted batches (counts ``num_data_passes``)."""
        self.num_data_passes += 1
        iterator: Iterable[tuple[int, Any, Any]] = self._indexed_batches()
        if self.progress:
            iterator = _progress(iterator, self.data)
        for i, inputs, target in iterator:
            n = self.batch_size_fn(target)
            if n == 0:
                continue
            self._check_placement(inputs, target, i)
            weight = n / self._num_data if self.reduction == "mean" else 1.0
            yield Batch(i, inputs, target, n, weight)

    def split_batch(self, batch: Batch) -> tuple[Batch, Batch]:
        """Split a batch into two halves whose weighted losses add up to the batch's.

        ``w_b l_b = (n_1 / N) l_1 + (n_2 / N) l_2`` for a per-example mean (``1`` for sum), exact
        in ``eval`` mode. With ``mode="batch_stats"`` BatchNorm normalises with each batch's
        statistics, so a split changes the matrix: that raises instead.

        Raises:
            RuntimeError: the batch cannot be split exactly (one example, or batch statistics).
        """
        if self.mode == "batch_stats":
            raise RuntimeError(
                "out of memory on one batch with a single column, and mode='batch_stats' forbids "
                "splitting it (BatchNorm statistics depend on the batch); use smaller batches."
            )
        n = batch.size
        first = _first_dim(batch.target)
        if n < 2 or first is None:
            raise RuntimeError(
                f"out of memory on a batch of {n} example(s) with a single column; the model is "
                "too large for this device: use a larger device or fewer parameters."
            )
        cut = first // 2

        def part(sl: slice) -> tuple[Any, Any]:
            def take(t: Tensor) -> Tensor:
                return t[sl] if t.ndim and t.shape[0] == first else t

            return map_tensors(batch.inputs, take), map_tensors(batch.target, take)

        halves = []
        for sl in (slice(0, cut), slice(cut, first)):
            inputs, target = part(sl)
            size = self.batch_size_fn(target)
            weight = size / self._num_data if self.reduction == "mean" else 1.0
            halves.append(Batch(batch.index, inputs, target, size, weight))
        return halves[0], halves[1]

    def _check_placement(self, inputs: Any, target: Any, index: int) -> None:
        for where, obj in (("inputs", inputs), ("target", target)):
            for t in tensors_of(obj):
                if t.device != self.device:
                    raise ValueError(
                        f"batch {index}: the {where} are on {t.device} but the model's parameters "
                        f"are on {self.device}; move the data (or the model), or pass "
                        "move_batches=True to the Problem."
                    )
                if t.is_floating_point() and t.dtype != self.dtype:
                    raise ValueError(
                        f"batch {index}: the {where} have dtype {t.dtype} but the parameters have "
                        f"{self.dtype}; convert the data, or pass move_batches=True to the Problem."
                    )

    # ---------------------------------------------------------------- model evaluation
    def forward(self, params: Mapping[str, Tensor], inputs: Any) -> Tensor:
        """The prediction ``f(theta, x)`` with ``params`` replacing the model's (functional)."""
        if isinstance(inputs, Mapping):
            out = functional_call(self.model, dict(params), args=(), kwargs=dict(inputs))
        elif isinstance(inputs, (tuple, list)):
            out = functional_call(self.model, dict(params), tuple(inputs))
        else:
            out = functional_call(self.model, dict(params), (inputs,))
        return self.output_fn(out)

    def batch_loss(self, output: Tensor, target: Any) -> Tensor:
        """The user's loss on one batch, unweighted."""
        return self.loss_fn(output, target)

    @contextlib.contextmanager
    def model_context(self) -> Iterator[None]:
        """Put the model in the Problem's mode for the duration, then restore it exactly.

        ``eval``: every module in eval mode. ``batch_stats``: BatchNorm modules in train mode with
        their running-statistics buffers hidden (so batch statistics are used and nothing is
        updated), every other module (Dropout included) in eval mode.
        """
        flags = [(m, m.training) for m in self.model.modules()]
        hidden: list[tuple[nn.Module, str, Tensor | None]] = []
        try:
            self.model.eval()
            if self.mode == "batch_stats":
                for m in self.model.modules():
                    if isinstance(m, nn.modules.batchnorm._NormBase):
                        m.train()
                        for name in _BN_BUFFERS:
                            if name in m._buffers:
                                hidden.append((m, name, m._buffers[name]))
                                m._buffers[name] = None
            yield
        finally:
            for m, name, buf in hidden:
                m._buffers[name] = buf
            for m, flag in flags:
                m.training = flag

    # ---------------------------------------------------------------- kernels
    def forward_first_batch(self, watch: contextlib.AbstractContextManager) -> bool:
        """One forward on this rank's first batch under ``watch`` (a dispatch mode that records
        kernels), in the Problem's mode, without gradients and with the Transformer fast path off
        as in the products. Returns ``False`` when this rank holds no batch. Not a data pass.
        """
        first = next(iter(self._indexed_batches()), None)
        if first is None:
            return False
        params = {**self.frozen_parameters(self.parameters()), **self.parameters()}
        with self.model_context(), torch.no_grad(), fast_path_disabled(), watch:
            self.forward(params, first[1])
        return True

    def attention_probe(self) -> AttentionProbe:
        """The attention kernels one forward on the first batch calls (measured once, cached)."""
        if self._attention_probe is None:
            self._attention_probe = probe_attention(self.forward_first_batch)
        return self._attention_probe

    def product_context(self, second_order: bool = True) -> contextlib.AbstractContextManager:
        """Kernel settings for one curvature product (see ``attention``).

        The first exact product of a model that calls fused SDPA kernels says once, with an
        :class:`AttentionBackendWarning`, that it runs them on the math path and what that costs.
        """
        if second_order and self.attention == "auto" and not self._attention_announced:
            self._attention_announced = True
            probe = self.attention_probe()
            if probe.uses_fused_attention:
                warnings.warn(
                    f"{type(self.model).__name__}: {probe.describe(self.dtype.itemsize)}. Fused "
                    "attention kernels have no second derivative, so curvscope runs its exact "
                    "products with torch.nn.attention.SDPBackend.MATH (the same function). "
                    "Pass attention='math' to silence this, or attention='native' with "
                    "engine='finite_difference' to keep the fused kernels.",
                    AttentionBackendWarning, stacklevel=4)
        return product_context(self.attention, second_order)

    # ---------------------------------------------------------------- loss and gradient
    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """``L(theta)`` and ``grad L(theta)`` (flat ``[P]``) over the whole data, one pass."""
        params = self.parameters()
        frozen = self.frozen_parameters(params)
        total = torch.zeros((), dtype=self.accumulate_dtype, device=self.device)
        grad = torch.zeros(self.num_params, dtype=self.accumulate_dtype, device=self.device)
        with self.model_context():
            for batch in self.batches():
                leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
                with torch.enable_grad():
                    loss = batch.weight * self.batch_loss(
                        self.forward({**frozen, **leaves}, batch.inputs), batch.target
                    )
                    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                                materialize_grads=True)
                total += loss.detach().to(self.accumulate_dtype)
                grad += self.param_space.join(list(grads)).to(self.accumulate_dtype)
        return self.all_reduce(total), self.all_reduce(grad)

    def validate(self) -> None:
        """Check the first batch: a finite scalar loss, finite gradients, no unused parameters.

        Raises:
            TypeError: the batch or the loss has the wrong kind.
            ValueError: a non-scalar or non-finite loss, non-finite gradients, or selected
                parameters that do not influence the loss.
        """
        batch = next(iter(self.batches()), None)
        if batch is None:  # this rank holds no batch (more ranks than batches)
            return
        params = self.parameters()
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        with self.model_context(), torch.enable_grad():
            try:
                output = self.forward({**self.frozen_parameters(params), **leaves}, batch.inputs)
            except (TypeError, ValueError):
                raise
            except RuntimeError as err:
                raise ValueError(
                    f"the model failed on the first batch (inputs {_describe(batch.inputs)}): "
                    f"{first_line(err)}; check that batch_fn returns (inputs, target) in the "
                    "form the model's forward expects."
                ) from err
            check_target_shape(self.loss_fn, output, batch.target)
            try:
                loss = self.batch_loss(output, batch.target)
            except (RuntimeError, ValueError, IndexError) as err:
                raise ValueError(
                    f"the loss failed on the first batch (output {_describe(output)}, target "
                    f"{_describe(batch.target)}): {first_line(err)}; check that loss_fn fits the "
                    "model's output and the targets."
                ) from err
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(
                    f"loss_fn must return a scalar tensor, got {shape}; use reduction='mean' or "
                    "'sum' (not 'none')."
                )
            if not bool(torch.isfinite(loss)):
                raise ValueError(
                    f"the loss on the first batch is {loss.item()}; check the inputs for NaN/inf "
                    "values and the model for overflow (try float64)."
                )
            grads = torch.autograd.grad(loss.reshape(()), list(leaves.values()), allow_unused=True)
        unused = [n for n, g in zip(leaves, grads) if g is None]
        if unused:
            raise ValueError(
                f"parameters {unused} do not influence the loss (no gradient); leave them out with "
                "params=[...] or params=regex, or set requires_grad=False on them."
            )
        bad = [n for n, g in zip(leaves, grads) if g is not None and not bool(torch.isfinite(g).all())]
        if bad:
            raise ValueError(
                f"the gradient on the first batch is not finite for {bad}; check the data and the "
                "model for overflow (try float64 or a smaller learning rate when training)."
            )

    def check_determinism(self) -> None:
        """Two passes over the data must give the same loss and gradient.

        Raises:
            RuntimeError: they differ; the message names the likely causes found (shuffling,
                augmentation, Dropout, train-mode BatchNorm, ``drop_last``).
        """
        sizes = [[self.batch_size_fn(t) for _, t in self._raw_batches()] for _ in range(2)]
        loss1, grad1 = self.loss_and_gradient()
        loss2, grad2 = self.loss_and_gradient()
        rtol = 1e3 * torch.finfo(self.accumulate_dtype).eps
        loss_diff = float((loss1 - loss2).abs())
        grad_diff = float((grad1 - grad2).norm() / grad1.norm().clamp_min(1e-300))
        if sizes[0] == sizes[1] and loss_diff <= rtol * max(abs(float(loss1)), 1e-300) and grad_diff <= rtol:
            return
        causes = self._likely_nondeterminism_causes(sizes[0] != sizes[1])
        raise RuntimeError(
            "the data or the model is not deterministic: two passes gave losses "
            f"{float(loss1):.10g} and {float(loss2):.10g} (relative gradient difference "
            f"{grad_diff:.2e}), so every curvature product would use a different matrix. Likely "
            f"cause(s): {'; '.join(causes)}."
        )

    def _likely_nondeterminism_causes(self, sizes_differ: bool) -> list[str]:
        causes = []
        data = self.data
        sampler = getattr(data, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            causes.append("shuffling: build the DataLoader with shuffle=False")
        if getattr(data, "drop_last", False):
            causes.append("drop_last=True drops examples (different ones when shuffling); "
                          "use drop_last=False")
        dataset = getattr(data, "dataset", None)
        if any(getattr(dataset, a, None) is not None
               for a in ("transform", "transforms", "target_transform")):
            causes.append("data augmentation: the dataset applies a transform; use a "
                          "deterministic one")
        if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in self.model.modules()):
            causes.append("Dropout: curvscope switches Dropout modules off, but a forward that "
                          "calls F.dropout(training=True) stays random")
        if self.mode == "batch_stats" and any(
            isinstance(m, nn.modules.batchnorm._NormBase) for m in self.model.modules()
        ):
            causes.append("train-mode BatchNorm (mode='batch_stats') depends on how the batches "
                          "are formed")
        if sizes_differ:
            causes.append("the batch sizes differ between passes (a sampler or shuffling)")
        if not causes:
            causes.append("randomness inside the model or the data pipeline (random "
                          "augmentation, sampling, non-deterministic kernels)")
        return causes


def _uncompiled(model: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``'d one (compiled graphs have no double backward)."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        logger.info("analysing the original module of a torch.compile'd model")
        return original
    return model


def _identity(output: Any) -> Any:
    return output


def _model_loss_batch_fn(loss_fn: ModelOutputLoss) -> Callable[[Any], tuple[Any, Any]]:
    """Dict batches go to the model whole (labels included); the labels are also the target."""
    key = loss_fn.label_key

    def batch_fn(batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, Mapping) or key not in batch:
            got = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
            raise TypeError(
                f"ModelOutputLoss passes the labels to the model, so batches must be dicts with "
                f"the key {key!r}, got {got}; build dict batches, or use a loss of the logits "
                "(e.g. curvscope.CausalLMLoss()) with (inputs, target) batches."
            )
        return dict(batch), batch[key]

    return batch_fn


def _loss_terms_counter(loss_fn: Callable[..., Any], model: nn.Module) -> Callable[[Any], int]:
    """The default ``batch_size_fn``: the number of terms of the batch's loss."""

    def batch_size_fn(target: Any) -> int:
        return count_loss_terms(loss_fn, target, model)

    return batch_size_fn


def _first_dim(target: Any) -> int | None:
    for t in tensors_of(target):
        return int(t.shape[0]) if t.ndim else None
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"Tensor{list(obj.shape)} {obj.dtype}"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in obj) + ")"
    return type(obj).__name__


def _progress(iterator: Iterable[Any], data: Any) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterator
    total = len(data) if hasattr(data, "__len__") else None
    return tqdm(iterator, total=total, desc="data pass", leave=False)


__all__ = ["Batch", "Problem", "default_batch_fn", "default_batch_size_fn", "default_output_fn"]
