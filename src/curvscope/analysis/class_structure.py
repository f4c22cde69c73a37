"""Papyan's class / cross-class structure of the Gauss-Newton matrix (cross-entropy).

With softmax outputs ``p_i`` and Jacobians ``J_i`` of the logits, the GGN of the loss
``L = s sum_i l_i`` (``s = 1/N`` for ``mean``, ``1`` for ``sum``) decomposes over examples and
logit coordinates ``c'``:

.. math:: G = s \\sum_i \\sum_{c'} \\delta_{i,c'} \\delta_{i,c'}^T, \\qquad
          \\delta_{i,c'} = \\sqrt{p_{i c'}} \\, J_i^T (e_{c'} - p_i).

Class-pair means ``delta_{c,c'} = mean_{i in c} delta_{i,c'}``, class means
``delta_c = mean_{c' != c} delta_{c,c'}`` and ``nu_{c,c'} = delta_{c,c'} - delta_c`` give, with
class weights ``w_c = s N_c`` (``1/C`` for balanced classes and ``mean``):

* ``G_0 = sum_c w_c delta_{cc} delta_{cc}^T`` (the "correct-class" terms),
* ``G_1 = sum_c w_c (C-1) delta_c delta_c^T`` (class means: rank <= C, "C outliers"),
* ``G_2 = sum_c sum_{c' != c} w_c nu_{cc'} nu_{cc'}^T`` (cross-class deviations),
* ``G_{1+2} = sum_c sum_{c' != c} w_c delta_{cc'} delta_{cc'}^T = G_1 + G_2``,
* ``G = G_0 + G_{1+2} + G_within`` (the within-class scatter of ``delta_{i,c'}``).

The non-zero eigenvalues of ``sum_j a_j a_j^T`` are those of the Gram matrix ``[<a_j, a_k>]``, so
every spectrum follows from the ``C^2 x C^2`` Gram matrix of the ``delta_{c,c'}``. One pass over the
data computes them (a vector-Jacobian product per pair and batch) and accumulates either the
vectors themselves (``mode="exact"``: ``C^2 P`` numbers, float64, on the host) or a seeded
CountSketch of them (``mode="sketch"``: ``C^2 s`` numbers; inner products unbiased, relative error
about ``sqrt(2/s)``), so memory never holds ``C^2`` full parameter vectors in sketch mode.
Projections ``U^T delta_{c,c'}`` on given eigenvectors ``U`` are always exact.

References:
    V. Papyan, "Measurements of three-level hierarchical structure in the outliers in the spectrum
    of deepnet Hessians", ICML 2019.  V. Papyan, "Traces of class/cross-class structure pervade
    deep learning spectra", JMLR 2020.  K. Clarkson, D. Woodruff, "Low rank approximation and
    regression in input sparsity time", STOC 2013 (CountSketch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import vjp, vmap

from curvscope._checkpoint import Checkpointer, tensor_digest
from curvscope._diagnostics import Cost, CostMeter
from curvscope.curvature._losses import recognise_loss
from curvscope.curvature._problem import Problem
from curvscope.linops._structured import LowRankOperator

TERMS = ("G0", "G1", "G2", "G12", "class")
MODES = ("auto", "exact", "sketch")
#: ``mode="auto"`` stores the vectors exactly when they take at most this many bytes.
EXACT_BYTES_LIMIT = 2 * 1024**3


@dataclass(frozen=True)
class ClassStructure:
    """The Gram matrix of the class-pair gradient means and what follows from it.

    Attributes:
        num_classes: ``C``.
        class_weights: ``[C]`` ``w_c = s N_c``.
        class_counts: ``[C]`` ``N_c``.
        gram: ``[C^2, C^2]`` float64, ``<delta_{c,c'}, delta_{d,d'}>`` at ``(c C + c', d C + d')``.
        mode: ``"exact"`` or ``"sketch"``.
        sketch_dim: ``s`` in sketch mode.
        projections: ``[k, C^2]`` ``U^T delta_{c,c'}`` for the given eigenvectors, or ``None``.
        vectors: ``[P, C^2]`` the ``delta_{c,c'}`` (exact mode with ``keep_vectors``), or ``None``.
        cost: products, data passes and wall time.
    """

    num_classes: int
    class_weights: Tensor
    class_counts: Tensor
    gram: Tensor
    mode: str
    sketch_dim: int | None
    projections: Tensor | None
    vectors: Tensor | None = field(metadata={"bundle": False})  # [P, C^2]: not in bundles
    cost: Cost

    # --------------------------------------------------------------- terms
    def combination(self, term: str) -> Tensor:
        """``M [C^2, r]`` with ``a_j = Delta M[:, j]`` the weighted vectors of ``term``."""
        if term not in TERMS:
            raise ValueError(f"term must be one of {TERMS}, got {term!r}.")
        C = self.num_classes
        w = self.class_weights.to(torch.float64)
        cols = []
        for c in range(C):
            others = [c2 for c2 in range(C) if c2 != c]
            if term == "G0":
                cols.append({c * C + c: math.sqrt(float(w[c]))})
            elif term == "G12":
                cols += [{c * C + c2: math.sqrt(float(w[c]))} for c2 in others]
            elif term == "class":
                cols += [{c * C + c2: math.sqrt(float(w[c]))} for c2 in range(C)]
            elif term == "G1":
                scale = math.sqrt(float(w[c]) * (C - 1)) / (C - 1)
                cols.append({c * C + c2: scale for c2 in others})
            else:  # G2: nu_{cc'} = delta_{cc'} - mean_{c''!=c} delta_{cc''}
                for c2 in others:
                    col = {c * C + c3: -math.sqrt(float(w[c])) / (C - 1) for c3 in others}
                    col[c * C + c2] += math.sqrt(float(w[c]))
                    cols.append(col)
        M = torch.zeros(C * C, len(cols), dtype=torch.float64)
        for j, col in enumerate(cols):
            for i, v in col.items():
                M[i, j] = v
        return M

    def term_gram(self, term: str) -> Tensor:
        """Gram matrix ``M^T Gram M`` of the weighted vectors of ``term``."""
        M = self.combination(term)
        return M.T @ self.gram @ M

    def spectrum(self, term: str) -> Tensor:
        """Non-negative eigenvalues of ``term`` (``G0``, ``G1``, ``G2``, ``G12`` or ``class``),
        descending.
        """
        vals = torch.linalg.eigvalsh(_sym(self.term_gram(term)))
        return vals.flip(0).clamp_min(0.0)

    def spectra(self) -> dict[str, Tensor]:
        """Every term's spectrum."""
        return {t: self.spectrum(t) for t in TERMS}

    def trace(self, term: str) -> float:
        """``tr(term) = sum_j ||a_j||^2``."""
        return float(self.term_gram(term).trace())

    def overlap_with(self, term: str, rank: int | None = None) -> float:
        """Grassmannian overlap ``||U^T Q||_F^2 / min(k, r)`` between the eigenvectors ``U``
        given at construction and the top-``rank`` eigenvectors ``Q`` of ``term``.

        ``Q = Delta M W Lambda^{-1/2}`` from the term's Gram eigenpairs ``(Lambda, W)``; with the
        exact projections ``U^T Delta`` this needs no ``P``-sized vector. Chance level for random
        subspaces: ``max(k, r) / P``.
        """
        if self.projections is None:
            raise ValueError("no eigenvectors were given to class_structure(eigenvectors=...).")
        M = self.combination(term)
        lam, W = torch.linalg.eigh(_sym(M.T @ self.gram @ M))
        lam, W = lam.flip(0), W.flip(1)
        positive = lam > lam.max().clamp_min(1e-300) * 1e-10
        r = int(positive.sum()) if rank is None else min(rank, int(positive.sum()))
        if r == 0:
            return 0.0
        UtQ = self.projections.to(torch.float64) @ M @ W[:, :r] / lam[:r].sqrt()
        k = self.projections.shape[0]
        return float((UtQ**2).sum() / min(k, r))

    def term_operator(self, term: str, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> LowRankOperator:
        """``term`` as a low-rank operator ``Q diag(Lambda) Q^T`` (needs the kept vectors).

        ``Q = Delta M W Lambda^{-1/2}`` from the term's Gram eigenpairs; e.g.
        ``GGNOperator(problem) - cs.term_operator("class")`` is the within-class scatter.
        """
        if self.vectors is None:
            raise ValueError("term_operator needs the class-pair vectors: call class_structure("
                             "..., mode='exact', keep_vectors=True).")
        M = self.combination(term)
        lam, W = torch.linalg.eigh(_sym(M.T @ self.gram @ M))
        keep = lam > lam.max().clamp_min(1e-300) * 1e-12
        lam, W = lam[keep], W[:, keep]
        Q = self.vectors.to(torch.float64) @ (M @ W / lam.sqrt())
        return LowRankOperator(Q.to(dtype=dtype or torch.float64, device=device or "cpu"),
                               lam.to(dtype=dtype or torch.float64, device=device or "cpu"))

    def means_gram(self) -> Tensor:
        """``[C, C]`` Gram matrix of the class means ``delta_c``."""
        C = self.num_classes
        M = torch.zeros(C * C, C, dtype=torch.float64)
        for c in range(C):
            for c2 in range(C):
                if c2 != c:
                    M[c * C + c2, c] = 1.0 / (C - 1)
        return M.T @ self.gram @ M

    def embedding(self, which: str = "class_means", dims: int = 2) -> Tensor:
        """PCA coordinates ``[m, dims]`` of the class means (``"class_means"``, ``m = C``) or of all
        class-pair means (``"pairs"``, ``m = C^2``), exactly from their Gram matrix (centred).
        """
        G = self.means_gram() if which == "class_means" else self.gram
        if which not in ("class_means", "pairs"):
            raise ValueError(f"which must be 'class_means' or 'pairs', got {which!r}.")
        m = G.shape[0]
        Hc = torch.eye(m, dtype=torch.float64) - 1.0 / m
        lam, W = torch.linalg.eigh(_sym(Hc @ G @ Hc))
        lam, W = lam.flip(0)[:dims].clamp_min(0.0), W.flip(1)[:, :dims]
        return W * lam.sqrt()

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON (the vectors are left out)."""
        return {
            "num_classes": self.num_classes, "mode": self.mode, "sketch_dim": self.sketch_dim,
            "class_counts": self.class_counts.tolist(),
            "class_weights": self.class_weights.tolist(),
            "spectra": {t: v.tolist() for t, v in self.spectra().items()},
            "traces": {t: self.trace(t) for t in TERMS}, **self.cost.to_dict(),
        }


def _sym(M: Tensor) -> Tensor:
    return (M + M.T) / 2


class _CountSketch:
    """A seeded CountSketch ``R^P -> R^s``: coordinate ``j`` adds ``sign_j x_j`` to ``bucket_j``."""

    def __init__(self, P: int, s: int, seed: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(seed)
        self.bucket = torch.randint(0, s, (P,), generator=g).to(device)
        self.sign = (torch.randint(0, 2, (P,), generator=g) * 2 - 1).to(device)
        self.s = s

    def __call__(self, X: Tensor) -> Tensor:
        """``[P, k] -> [s, k]``."""
        out = X.new_zeros(self.s, X.shape[1])
        return out.index_add_(0, self.bucket, X * self.sign.to(X.dtype).unsqueeze(1))


def class_structure(
    problem: Problem,
    *,
    eigenvectors: Tensor | None = None,
    mode: str = "auto",
    sketch_dim: int | None = None,
    seed: int = 0,
    keep_vectors: bool = False,
    chunk_size: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
) -> ClassStructure:
    """Class-pair gradient means of a cross-entropy problem: one pass, Gram matrix accumulated.

    Args:
        problem: a Problem with a cross-entropy loss over integer class targets ``[n]``.
        eigenvectors: ``U [P, k]`` (e.g. the Hessian's top eigenvectors) to project on exactly.
        mode: ``"exact"`` (store the ``C^2`` vectors in float64 host memory), ``"sketch"`` (a
            CountSketch of dimension ``sketch_dim``), or ``"auto"`` (exact when it needs at most
            2 GiB).
        sketch_dim: ``s`` (default ``max(4096, 16 C^2)``).
        seed: seed of the sketch.
        keep_vectors: return the vectors (exact mode) in the result.
        chunk_size: class pairs per vmapped vector-Jacobian product (default all ``C^2``).
        checkpoint: file to save the partial sums to every ``checkpoint_every`` batches; a rerun
            with the same arguments resumes after the last saved batch (the data must come in
            the same order).
        checkpoint_every: batches between saves.

    Raises:
        ValueError: the loss is not a plain cross-entropy, or a class has no example.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    counts, C = _class_counts(problem)
    P = problem.num_params
    if mode == "auto":
        mode = "exact" if C * C * P * 8 <= EXACT_BYTES_LIMIT else "sketch"
    if mode == "exact" and sketch_dim is not None:
        raise ValueError("sketch_dim applies to mode='sketch' only.")
    s = sketch_dim or max(4096, 16 * C * C)
    sketch = _CountSketch(P, s, seed, problem.device) if mode == "sketch" else None
    store = torch.zeros(P if mode == "exact" else s, C * C, dtype=torch.float64,
                        device="cpu" if mode == "exact" else problem.device)
    U = None
    if eigenvectors is not None:
        if eigenvectors.ndim != 2 or eigenvectors.shape[0] != P:
            raise ValueError(f"eigenvectors must have shape [{P}, k], got "
                             f"{tuple(eigenvectors.shape)}.")
        U = eigenvectors.to(device=problem.device, dtype=problem.dtype)
    proj = torch.zeros(0 if U is None else U.shape[1], C * C, dtype=torch.float64,
                       device=problem.device)
    meter = CostMeter([problem], problem.device)  # one "product" = one chunk of class pairs
    params = problem.parameters()
    frozen = problem.frozen_parameters(params)
    chunk = chunk_size or C * C
    ckpt = Checkpointer(checkpoint, checkpoint_every, {
        "algorithm": "class_structure", "P": P, "C": C, "mode": mode, "sketch_dim": s,
        "seed": seed, "counts": counts.tolist(), "N": problem.num_data,
        "eigenvectors": tensor_digest(U), "dtype": str(problem.dtype),
    })
    state = ckpt.load()
    last_done = -1
    if state is not None:
        store.copy_(state["store"])
        proj.copy_(state["proj"])
        last_done = state["last_batch"]
        # the products of the batches done; the data pass is the one this run makes
        meter.num_matvecs = int(state.get("num_matvecs", 0))
        meter.num_products = int(state.get("num_products", 0))
    done_batches = 0
    # batched vjps: the math SDPA path vmaps, fused kernels fall back to a slow loop
    with problem.model_context(), torch.enable_grad(), problem.product_context():
        for batch in problem.batches():
            if batch.index <= last_done:
                continue
            y = batch.target
            z, vjp_fn = cast(tuple[Tensor, Callable[..., Any]],
                             vjp(lambda p, b=batch: problem.forward({**frozen, **p}, b.inputs),
                                 params))
            prob = torch.softmax(z.detach(), dim=1)
            for start in range(0, C * C, chunk):
                pairs = torch.arange(start, min(start + chunk, C * C), device=z.device)
                cot = _cotangents(prob, y, pairs, C, counts.to(z.device))
                grads = vmap(vjp_fn)(cot)[0]
                flat = problem.param_space.join(grads, batched=True).to(torch.float64)
                meter.add(len(pairs))
                if sketch is None:
                    store[:, pairs.cpu()] += flat.cpu()
                else:
                    store[:, pairs] += sketch(flat)
                if U is not None:
                    proj[:, pairs] += U.T.to(torch.float64) @ flat
            done_batches += 1
            if ckpt.due(done_batches):
                ckpt.save({"store": store.cpu(), "proj": proj.cpu(), "last_batch": batch.index,
                           "num_matvecs": meter.num_matvecs,
                           "num_products": meter.num_products})
    problem.all_reduce(store)
    problem.all_reduce(proj)
    gram = (store.T @ store).cpu()
    weights = counts.to(torch.float64) * (1.0 / problem.num_data if problem.reduction == "mean"
                                          else 1.0)
    return ClassStructure(
        C, weights, counts, _sym(gram), mode, s if mode == "sketch" else None,
        None if U is None else proj.cpu(),
        store if (keep_vectors and mode == "exact") else None, meter.cost(),
    )


def _cotangents(prob: Tensor, y: Tensor, pairs: Tensor, C: int, counts: Tensor) -> Tensor:
    """``[len(pairs), n, C]``: row ``i`` of pair ``(c, c')`` is
    ``[y_i = c] / N_c * sqrt(p_ic') (e_c' - p_i)``.
    """
    c, c2 = pairs // C, pairs % C
    onehot = torch.nn.functional.one_hot(c2, C).to(prob.dtype)  # [k, C]
    member = (y.unsqueeze(0) == c.unsqueeze(1)).to(prob.dtype) / counts[c].unsqueeze(1)  # [k, n]
    root = prob[:, c2].T.clamp_min(0).sqrt()  # [k, n]
    diff = onehot.unsqueeze(1) - prob.unsqueeze(0)  # [k, n, C]
    return (member * root).unsqueeze(-1) * diff


def _class_counts(problem: Problem) -> tuple[Tensor, int]:
    """``N_c`` from one pass over the targets (no forward), after checking the loss."""
    counts: Tensor | None = None
    num_classes = None
    for _, target in problem._raw_batches():
        kind = recognise_loss(problem.loss_fn, target)
        if kind.name != "cross_entropy" or target.ndim != 1:
            raise ValueError(
                "class_structure needs a cross-entropy loss (default options) over integer class "
                f"targets of shape [n], got {type(problem.loss_fn).__name__} with targets of shape "
                f"{tuple(getattr(target, 'shape', ()))}."
            )
        if num_classes is None:
            num_classes = _num_logits(problem, target)
        c = torch.bincount(target.cpu(), minlength=num_classes)
        counts = c if counts is None else counts + c
    assert counts is not None and num_classes is not None
    counts = problem.all_reduce(counts.to(problem.device)).cpu()
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        raise ValueError(f"classes {empty} have no example; class means need every class.")
    return counts, num_classes


def _num_logits(problem: Problem, target: Tensor) -> int:
    """``C`` from the model's output on the first batch."""
    batch = next(iter(problem.batches()))
    with torch.no_grad(), problem.model_context():
        out = problem.forward(problem.parameters(), batch.inputs)
    return int(out.shape[1])
