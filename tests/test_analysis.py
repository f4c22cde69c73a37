"""Analyses (curvscope.analysis): Papyan's class structure against a brute-force computation from
dense per-example Jacobians, the outlier rule and overlaps on planted inputs, the power-law fit,
the sweeps, and analyze() end to end on the Gaussian-mixture zoo problem (C and C-1 outliers)."""

import copy
import math
import re

import pytest
import torch

import curvscope as cs
from conftest import rel_err
from curvscope.analysis import class_structure
from curvscope.analysis.class_structure import TERMS
from curvscope.analysis.outliers import (
    find_outliers,
    fit_power_law,
    mask_overlap,
    subspace_overlap,
    top_magnitude_mask,
)
from curvscope.analysis.spectrum import analyze
from curvscope.analysis.sweeps import checkpoint_sweep, first_per_class, sample_size_sweep
from curvscope.testing import dense_ggn, dense_hessian, dense_jacobian, tiny_mlp
from curvscope.zoo import gaussian_mixture

F64 = torch.float64
RTOL = 1e-10  # exact float64 computations


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ============================================================================ brute force (F3)


def _unbalanced(reduction):
    """tiny_mlp's model with 3 classes of 2, 4 and 9 examples in shuffled, unequal batches."""
    tp = tiny_mlp("classification", reduction=reduction)
    g = _gen(7)
    y = torch.tensor([0] * 2 + [1] * 4 + [2] * 9)[torch.randperm(15, generator=g)]
    X = torch.randn(15, 4, generator=g, dtype=F64) + 1.5 * torch.randn(3, 4, generator=g,
                                                                       dtype=F64)[y]
    tp.batches = list(zip(X.split([6, 5, 4]), y.split([6, 5, 4]), strict=True))
    return tp


CASES = {
    "balanced-mean": lambda: tiny_mlp("classification", batch_sizes=(5, 4, 3)),
    "balanced-sum": lambda: tiny_mlp("classification", batch_sizes=(5, 4, 3), reduction="sum"),
    "unbalanced-mean": lambda: _unbalanced("mean"),
    "unbalanced-sum": lambda: _unbalanced("sum"),
}


class Brute:
    """delta_{i,c'} = sqrt(p_ic') J_i^T (e_c' - p_i) from dense per-example Jacobians, and every
    term of the decomposition as a dense P x P matrix (no curvscope code besides testing.dense).
    """

    def __init__(self, tp):
        model, batches = tp.model, tp.split_batches()
        C = tp.num_classes
        deltas, labels = [], []
        for (x, y), J in zip(batches, dense_jacobian(model, batches), strict=True):
            with torch.no_grad():
                p = torch.softmax(model(x).to(F64), dim=1)
            n = y.shape[0]
            J = J.reshape(n, C, -1)  # rows = output.reshape(-1): example-major
            for i in range(n):
                E = torch.eye(C, dtype=F64) - p[i]  # row c' = (e_c' - p_i)^T
                deltas.append(p[i].sqrt().unsqueeze(1) * (E @ J[i]))  # [C, P], row c'
                labels.append(int(y[i]))
        self.C, self.deltas = C, torch.stack(deltas)  # [N, C, P]
        self.labels = torch.tensor(labels)
        self.N, self.P = self.deltas.shape[0], self.deltas.shape[2]
        self.counts = torch.bincount(self.labels, minlength=C)
        self.s = 1.0 / self.N if tp.reduction == "mean" else 1.0
        self.w = self.s * self.counts.to(F64)
        self.D = torch.stack([self.deltas[self.labels == c].mean(0) for c in range(C)])  # [C,C,P]
        self.flat = self.D.reshape(C * C, self.P)
        self.gram = self.flat @ self.flat.T
        # class means delta_c = mean_{c' != c} delta_{c,c'}
        self.means = torch.stack([self.D[c, [k for k in range(C) if k != c]].mean(0)
                                  for c in range(C)])

    def G(self):
        d = self.deltas.reshape(-1, self.P)
        return self.s * d.T @ d

    def within(self):
        out = torch.zeros(self.P, self.P, dtype=F64)
        for i in range(self.N):
            r = self.deltas[i] - self.D[self.labels[i]]
            out += self.s * r.T @ r
        return out

    def term(self, name):
        C, D, w = self.C, self.D, self.w
        out = torch.zeros(self.P, self.P, dtype=F64)
        for c in range(C):
            for c2 in range(C):
                a = D[c, c2].unsqueeze(1)
                nu = (D[c, c2] - self.means[c]).unsqueeze(1)
                if name == "class" or (name == "G0" and c2 == c) or (name == "G12" and c2 != c):
                    out += w[c] * a @ a.T
                elif name == "G2" and c2 != c:
                    out += w[c] * nu @ nu.T
            if name == "G1":
                m = self.means[c].unsqueeze(1)
                out += w[c] * (C - 1) * m @ m.T
        return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    tp = CASES[request.param]()
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    brute = Brute(tp)
    H = dense_hessian(tp.model, tp.loss_fn, tp.split_batches(), reduction=tp.reduction)
    U = torch.linalg.eigh(H).eigenvectors.flip(1)[:, :4]  # top-4 Hessian eigenvectors
    cls = class_structure(problem, eigenvectors=U, mode="exact", keep_vectors=True)
    return tp, problem, brute, U, cls


def test_brute_force_reproduces_dense_ggn(case):
    """The reference itself: G = s sum_i sum_c' delta delta^T is testing.dense_ggn."""
    tp, _, brute, _, _ = case
    G = dense_ggn(tp.model, tp.loss_fn, tp.split_batches(), reduction=tp.reduction)
    assert rel_err(brute.G(), G) < RTOL


def test_gram_counts_weights_vectors_projections(case):
    tp, problem, brute, U, cls = case
    C = brute.C
    assert cls.num_classes == C and cls.mode == "exact" and cls.sketch_dim is None
    assert cls.gram.shape == (C * C, C * C) and cls.gram.dtype == F64
    assert rel_err(cls.gram, brute.gram) < RTOL
    assert torch.equal(cls.class_counts.cpu(), brute.counts)
    expected_w = brute.counts.to(F64) / (brute.N if tp.reduction == "mean" else 1)
    assert torch.allclose(cls.class_weights.to(F64), expected_w, rtol=1e-14, atol=0)
    if tp.reduction == "mean" and len(set(brute.counts.tolist())) == 1:
        assert torch.allclose(cls.class_weights.to(F64), torch.full((C,), 1 / C, dtype=F64))
    assert rel_err(cls.vectors, brute.flat.T) < RTOL  # [P, C^2], column c C + c'
    assert rel_err(cls.projections, U.T @ brute.flat.T) < RTOL  # exact U^T delta
    assert rel_err(cls.means_gram(), brute.means @ brute.means.T) < RTOL


def test_term_operator_and_within_class_spectrum(case):
    """G - term_operator("class") is the within-class scatter; its top eigenvalues by eigsh."""
    _, problem, brute, _, cls = case
    low = cls.term_operator("class")
    assert rel_err(low.to_dense(), brute.term("class")) < RTOL
    within = cs.GGNOperator(problem) - low
    assert rel_err(within.to_dense(), brute.within()) < RTOL
    k = 3
    res = cs.eigsh(within, k, tol=1e-10, generator=_gen(0))
    expected = torch.linalg.eigvalsh(brute.within()).flip(0)[:k]
    assert rel_err(res.eigenvalues, expected) < 1e-8
    with pytest.raises(ValueError, match="keep_vectors=True"):
        class_structure(problem).term_operator("class")


def test_chunked_pairs_and_auto_mode_agree(case):
    _, problem, brute, _, _ = case
    for kw in ({"chunk_size": 2}, {"chunk_size": 1}, {}):
        cls = class_structure(problem, **kw)
        assert cls.mode == "exact" and cls.vectors is None and cls.projections is None
        assert rel_err(cls.gram, brute.gram) < RTOL


def test_ggn_splits_into_class_and_within_class_terms(case):
    _, _, brute, _, cls = case
    G, G_class, G_within = brute.G(), brute.term("class"), brute.within()
    assert rel_err(G_class + G_within, G) < RTOL
    eig = torch.linalg.eigvalsh(G - G_class)
    assert eig.min() >= -1e-12 * eig.abs().max()
    # the library's "class" term as a matrix (from its vectors and combination) is G_class
    M = cls.combination("class")
    assert rel_err(cls.vectors @ M @ M.T @ cls.vectors.T, G_class) < RTOL
    assert cls.trace("class") == pytest.approx(float(G_class.trace()), rel=RTOL)


@pytest.mark.parametrize("term", TERMS)
def test_term_spectra_and_traces_match_dense(case, term):
    _, _, brute, _, cls = case
    dense = brute.term(term)
    expected = torch.linalg.eigvalsh(dense).flip(0)
    got = cls.spectrum(term)
    rank = {"G0": brute.C, "G1": brute.C, "G2": brute.C * (brute.C - 1),
            "G12": brute.C * (brute.C - 1), "class": brute.C * brute.C}[term]
    assert got.shape == (rank,)
    assert torch.all(got[:-1] >= got[1:]) and torch.all(got >= 0)
    scale = float(expected[0])
    assert float((got - expected[:rank].clamp_min(0)).abs().max()) <= RTOL * scale
    assert float(expected[rank:].abs().max()) <= RTOL * scale  # nothing beyond the Gram rank
    assert cls.trace(term) == pytest.approx(float(dense.trace()), rel=RTOL)
    M = cls.combination(term)
    assert rel_err(cls.vectors @ M @ M.T @ cls.vectors.T, dense) < RTOL


def test_trace_identities(case):
    _, _, _, _, cls = case
    assert cls.trace("G12") == pytest.approx(cls.trace("G1") + cls.trace("G2"), rel=1e-12)
    assert cls.trace("class") == pytest.approx(cls.trace("G0") + cls.trace("G12"), rel=1e-12)
    spectra, d = cls.spectra(), cls.to_dict()
    assert set(spectra) == set(TERMS) == set(d["spectra"]) == set(d["traces"])
    assert d["class_counts"] == cls.class_counts.tolist()


@pytest.mark.parametrize("term", ["G1", "G12", "G0", "G2", "class"])
@pytest.mark.parametrize("rank", [None, 1, 2])
def test_overlap_with_matches_dense_eigenvectors(case, term, rank):
    _, _, brute, U, cls = case
    lam, Q = torch.linalg.eigh(brute.term(term))
    lam, Q = lam.flip(0), Q.flip(1)
    r = int((lam > 1e-10 * lam[0]).sum())
    r = r if rank is None else min(rank, r)
    expected = float(((U.T @ Q[:, :r]) ** 2).sum()) / min(U.shape[1], r)
    assert cls.overlap_with(term, rank=rank) == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= cls.overlap_with(term, rank=rank) <= 1.0 + 1e-12


def test_embedding_preserves_distances(case):
    _, _, brute, _, cls = case
    C = brute.C
    emb = cls.embedding("class_means", dims=C - 1)  # centred C points: rank <= C - 1, exact
    assert emb.shape == (C, C - 1)
    assert rel_err(torch.cdist(emb, emb), torch.cdist(brute.means, brute.means)) < 1e-7
    assert float(emb.sum(0).abs().max()) < 1e-10 * float(emb.abs().max())  # centred
    emb2 = cls.embedding("class_means", dims=2)
    assert torch.allclose(emb2.abs(), emb[:, :2].abs(), atol=1e-10)  # leading PCA axes
    pairs = cls.embedding("pairs", dims=C * C - 1)
    assert pairs.shape == (C * C, C * C - 1)
    assert rel_err(torch.cdist(pairs, pairs), torch.cdist(brute.flat, brute.flat)) < 1e-7
    with pytest.raises(ValueError, match="which"):
        cls.embedding("bogus")


def test_class_structure_argument_errors():
    tp = tiny_mlp("classification")
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    for kind in ("regression", "binary"):  # MSE, BCE: not a cross-entropy over class indices
        t2 = tiny_mlp(kind)
        with pytest.raises(ValueError, match="cross-entropy"):
            class_structure(cs.Problem(t2.model, t2.loss_fn, t2.batches))
    # a class (2) with no example
    (x, y), = [(torch.cat([b[0] for b in tp.batches]), torch.cat([b[1] for b in tp.batches]))]
    keep = y != 2
    with pytest.raises(ValueError, match="no example"):
        class_structure(cs.Problem(tp.model, tp.loss_fn, [(x[keep], y[keep])]))
    with pytest.raises(ValueError, match="mode"):
        class_structure(problem, mode="dense")
    with pytest.raises(ValueError, match="sketch_dim"):
        class_structure(problem, mode="exact", sketch_dim=64)
    with pytest.raises(ValueError, match="eigenvectors"):
        class_structure(problem, eigenvectors=torch.zeros(problem.num_params + 1, 2, dtype=F64))
    cls = class_structure(problem)
    with pytest.raises(ValueError, match="eigenvectors"):
        cls.overlap_with("G1")
    with pytest.raises(ValueError, match="term"):
        cls.spectrum("G3")


# ---------------------------------------------------------------------------- sketch mode


@pytest.fixture(scope="module")
def wide():
    """P = 515 > s = 256."""
    tp = tiny_mlp("classification", hidden=64)
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    assert problem.num_params == 515
    return problem, class_structure(problem, mode="exact")


def test_sketch_gram_error_and_determinism(wide):
    problem, exact = wide
    s = 256
    a = class_structure(problem, mode="sketch", sketch_dim=s, seed=3)
    b = class_structure(problem, mode="sketch", sketch_dim=s, seed=3)
    c = class_structure(problem, mode="sketch", sketch_dim=s, seed=4)
    assert a.mode == "sketch" and a.sketch_dim == s and a.vectors is None
    assert torch.equal(a.gram, b.gram)
    assert not torch.equal(a.gram, c.gram)
    errs = torch.tensor([rel_err(class_structure(problem, mode="sketch", sketch_dim=s,
                                                 seed=seed).gram, exact.gram)
                         for seed in range(20)])
    # inner products of s-dim CountSketches: relative error about sqrt(2/s), a few at most
    assert float(errs.max()) < 4 * math.sqrt(2 / s)
    assert 0.3 * math.sqrt(2 / s) < float(errs.median()) < 2.5 * math.sqrt(2 / s)
    # a larger sketch is more accurate
    big = torch.tensor([rel_err(class_structure(problem, mode="sketch", sketch_dim=16 * s,
                                                seed=seed).gram, exact.gram) for seed in range(5)])
    assert float(big.median()) < float(errs.median()) / 2


def test_sketch_gram_is_unbiased(wide):
    """Mean over 200 seeds: per-entry z-scores of the error stay small (a biased sketch, e.g.
    signs correlated with buckets, fails this)."""
    problem, exact = wide
    grams = torch.stack([class_structure(problem, mode="sketch", sketch_dim=256, seed=seed).gram
                         for seed in range(100, 300)])
    err = grams - exact.gram
    z = err.mean(0) / (err.std(0) / math.sqrt(len(grams))).clamp_min(1e-300)
    assert float(z.abs().max()) < 5
    assert rel_err(grams.mean(0), exact.gram) < 0.25 * math.sqrt(2 / 256)


def test_sketch_keeps_projections_exact(wide):
    problem, exact = wide
    U = torch.linalg.qr(torch.randn(problem.num_params, 3, generator=_gen(0), dtype=F64)).Q
    ex = class_structure(problem, eigenvectors=U, mode="exact")
    sk = class_structure(problem, eigenvectors=U, mode="sketch", sketch_dim=256)
    assert rel_err(sk.projections, ex.projections) < RTOL


# ============================================================================ outlier rule


def test_find_outliers_clear_gap():
    lam = torch.tensor([10.0, 9.0, 8.5, 2.0, 1.9, 1.7, 1.5], dtype=F64)
    split = find_outliers(lam[torch.randperm(7, generator=_gen(0))])  # any order
    assert split.count == 3
    assert split.gap_ratio == pytest.approx(8.5 / 2.0)
    assert split.bulk_edge == pytest.approx(2.0)
    assert split.threshold == 1.5 and split.other_gaps == ()
    assert split.bulk_edge_slq is None
    assert find_outliers(lam, bulk_upper_bound=2.01).bulk_edge_slq == 2.01
    assert find_outliers(lam, threshold=5.0, relative_gap=None).count == 0  # 4.25 < 5
    # below the threshold the gap still stands 13x above the bulk's spacing: probable
    loose = find_outliers(lam, threshold=5.0)
    assert (loose.count, loose.confidence) == (3, "probable")


def test_find_outliers_no_gap():
    lam = 10.0 * 0.9 ** torch.arange(20, dtype=F64)  # ratios 1.11
    split = find_outliers(lam)
    assert split.count == 0
    assert split.gap_ratio == pytest.approx(1 / 0.9)
    assert split.bulk_edge is None  # no outliers: no bulk edge (not one drawn at l_1)
    assert find_outliers(torch.tensor([3.0], dtype=F64)).count == 0
    assert find_outliers(torch.tensor([], dtype=F64)).count == 0


def test_find_outliers_two_level_hierarchy():
    bulk = [1.0, 0.9, 0.8, 0.75, 0.7]
    lam = torch.tensor([100.0, 90.0, 80.0, 20.0, 18.0, 16.0, 15.0] + bulk, dtype=F64)
    split = find_outliers(lam)  # gaps 80/20 = 4 and 15/1 = 15: the larger wins
    assert split.count == 7
    assert split.gap_ratio == pytest.approx(15.0)
    assert split.bulk_edge == pytest.approx(1.0)
    assert len(split.other_gaps) == 1
    j, r = split.other_gaps[0]
    assert (j, r) == (3, pytest.approx(4.0))
    # reversed dominance: 100/2 = 50 after the third, 20/1 = 20 after the seventh
    lam2 = torch.tensor([100.0, 90.0, 80.0, 1.6, 1.5, 1.3, 1.0] + [0.05, 0.04, 0.035], dtype=F64)
    split2 = find_outliers(lam2)
    assert split2.count == 3 and split2.gap_ratio == pytest.approx(50.0)
    assert [j for j, _ in split2.other_gaps] == [7]
    d = split.to_dict()
    assert d["count"] == 7 and d["other_gaps"] == [[3, pytest.approx(4.0)]]


def test_find_outliers_ignores_non_positive_and_validates_threshold():
    lam = torch.tensor([-50.0, 6.0, 0.0, 1.0, 0.9, -0.5, 0.8], dtype=F64)
    split = find_outliers(lam)
    assert split.count == 1 and split.gap_ratio == pytest.approx(6.0)
    assert split.bulk_edge == pytest.approx(1.0)
    assert find_outliers(torch.tensor([-3.0, -1.0, 0.0], dtype=F64)).count == 0
    for bad in (1.0, 0.5, -2.0):
        with pytest.raises(ValueError, match="threshold"):
            find_outliers(lam, threshold=bad)


# ---------------------------------------------------------------------------- overlaps (F5)


def _orth(D, k, seed):
    return torch.linalg.qr(torch.randn(D, k, generator=_gen(seed), dtype=F64)).Q


def test_subspace_overlap_closed_forms():
    D = 40
    U = _orth(D, 5, 0)
    assert subspace_overlap(U, U) == pytest.approx(1.0, abs=1e-12)
    R = torch.linalg.qr(torch.randn(5, 5, generator=_gen(1), dtype=F64)).Q
    assert subspace_overlap(U, U @ R) == pytest.approx(1.0, abs=1e-12)  # basis-independent
    assert subspace_overlap(U, U[:, :2]) == pytest.approx(1.0, abs=1e-12)  # nested
    eye = torch.eye(D, dtype=F64)
    assert subspace_overlap(eye[:, :5], eye[:, 5:12]) == 0.0
    # principal angles: span(e1, e2) vs span(cos t e1 + sin t e3, e2): (cos^2 t + 1) / 2
    t = 0.3
    V = torch.stack([math.cos(t) * eye[0] + math.sin(t) * eye[2], eye[1]], 1)
    assert subspace_overlap(eye[:, :2], V) == pytest.approx((math.cos(t) ** 2 + 1) / 2)
    # F5: 1 - ||UU^T - VV^T||_F^2 / (2k)
    W = _orth(D, 5, 2)
    expected = 1 - float(((U @ U.T - W @ W.T) ** 2).sum()) / 10
    assert subspace_overlap(U, W) == pytest.approx(expected, abs=1e-12)
    assert subspace_overlap(U, eye[:, :0]) == 0.0
    with pytest.raises(ValueError):
        subspace_overlap(U, _orth(D + 1, 5, 3))


@pytest.mark.parametrize(("k", "r"), [(4, 4), (3, 8)])
def test_subspace_overlap_chance_level(k, r):
    D, trials = 60, 300
    ov = torch.tensor([subspace_overlap(_orth(D, k, 2 * t), _orth(D, r, 2 * t + 1))
                       for t in range(trials)])
    # E ||U^T V||_F^2 = k r / D, divided by min(k, r): max(k, r) / D
    assert float(ov.mean()) == pytest.approx(max(k, r) / D, rel=0.1)


def test_mask_overlap_closed_forms():
    D = 30
    eye = torch.eye(D, dtype=F64)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[[1, 4, 7, 20]] = True
    ov, chance = mask_overlap(eye[:, [1, 4, 7]], mask)  # inside the mask
    assert ov == pytest.approx(1.0) and chance == pytest.approx(4 / D)
    assert mask_overlap(eye[:, [0, 2, 3]], mask)[0] == 0.0  # outside
    assert mask_overlap(eye[:, [1, 2, 20, 29]], mask)[0] == pytest.approx(0.5)  # half in
    # a vector spread over two coordinates, one in the mask
    v = ((eye[1] + eye[2]) / math.sqrt(2)).unsqueeze(1)
    assert mask_overlap(v, mask)[0] == pytest.approx(0.5)
    # float / flat-shaped masks are accepted
    assert mask_overlap(eye[:, [1]], mask.to(F64).reshape(5, 6))[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mask_overlap(eye[:, :2], mask[:-1])
    # chance level m / D for random subspaces
    ovs = torch.tensor([mask_overlap(_orth(D, 3, t), mask)[0] for t in range(300)])
    assert float(ovs.mean()) == pytest.approx(4 / D, rel=0.1)


def test_top_magnitude_mask():
    theta = torch.tensor([0.1, -5.0, 2.0, -0.2, 3.0, 0.0], dtype=F64)
    mask = top_magnitude_mask(theta, 3)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [False, True, True, False, True, False]
    assert int(top_magnitude_mask(theta.reshape(2, 3), 2).sum()) == 2
    assert top_magnitude_mask(theta, 0).sum() == 0
    assert top_magnitude_mask(theta, 6).all()


# ---------------------------------------------------------------------------- power law


def test_power_law_exact():
    j = torch.arange(1, 41, dtype=F64)
    fit = fit_power_law((3.0 * j**-0.7).flip(0))  # any order
    assert abs(fit.exponent - 0.7) < 1e-12
    assert fit.std_error < 1e-12 and fit.num_points == 40
    fit2 = fit_power_law(torch.cat([3.0 * j**-0.7, torch.tensor([0.0, -1.0], dtype=F64)]))
    assert fit2.num_points == 40 and abs(fit2.exponent - 0.7) < 1e-12  # non-positive dropped
    assert fit.to_dict()["num_points"] == 40
    with pytest.raises(ValueError):
        fit_power_law(torch.tensor([2.0, 1.0, 0.0], dtype=F64))


def test_power_law_noise_std_error():
    """Small multiplicative noise (the ranked order is kept): the OLS standard error matches
    the spread over repetitions, and the estimate is within a few of them."""
    g = _gen(0)
    j = torch.arange(1, 31, dtype=F64)
    x = torch.log(j)
    sigma = 0.005
    fits = [fit_power_law(3.0 * j**-0.7 * torch.exp(sigma * torch.randn(30, generator=g,
                                                                          dtype=F64)))
            for _ in range(200)]
    alpha = torch.tensor([f.exponent for f in fits])
    se = torch.tensor([f.std_error for f in fits])
    theory = sigma / float((x - x.mean()).norm())
    assert float(se.mean()) == pytest.approx(theory, rel=0.2)
    assert float(alpha.std()) == pytest.approx(theory, rel=0.25)
    assert float(((alpha - 0.7) / se).abs().max()) < 5
    assert float(alpha.mean()) == pytest.approx(0.7, abs=3 * theory / math.sqrt(200) + 1e-4)


# ============================================================================ sweeps


@pytest.fixture(scope="module")
def gm5():
    return gaussian_mixture(5)


def _top_eigs(problem, k, tol=1e-10):
    res = cs.eigsh(cs.HessianOperator(problem), k, which="LA", tol=tol, generator=_gen(123))
    return res.eigenvalues


def test_first_per_class_keeps_data_order(gm5):
    (x, y), = first_per_class(gm5.batches, 3)
    X = torch.cat([b[0] for b in gm5.batches])
    Y = torch.cat([b[1] for b in gm5.batches])
    idx = torch.cat([(Y == c).nonzero().squeeze(1)[:3] for c in range(5)]).sort().values
    assert torch.equal(y, Y[idx]) and torch.equal(x, X[idx])
    (xa, ya), = first_per_class(gm5.batches, 10**6)
    assert torch.equal(xa, X) and torch.equal(ya, Y)
    with pytest.raises(ValueError):
        first_per_class([], 3)


def test_sample_size_sweep(gm5):
    k = 8
    sweep = sample_size_sweep(gm5.model, gm5.loss_fn, gm5.batches, [10, 30, 100], k=k)
    assert sweep.kind == "sample_size" and sweep.x == [10, 30, 100]
    assert [len(r) for r in sweep.top_eigenvalues] == [k, k, k]
    assert [len(r) for r in sweep.residual_norms] == [k, k, k]
    # n = all examples per class: the full-data problem
    full = _top_eigs(cs.Problem(gm5.model, gm5.loss_fn, gm5.batches), k)
    got = torch.tensor(sweep.top_eigenvalues[-1], dtype=F64)
    assert float(((got - full).abs() / full.abs()).max()) < 1e-6
    # n = 10: the first 10 examples of each class, selected here independently
    X = torch.cat([b[0] for b in gm5.batches])
    Y = torch.cat([b[1] for b in gm5.batches])
    idx = torch.cat([(Y == c).nonzero().squeeze(1)[:10] for c in range(5)])
    small = _top_eigs(cs.Problem(gm5.model, gm5.loss_fn, [(X[idx], Y[idx])]), k)
    got10 = torch.tensor(sweep.top_eigenvalues[0], dtype=F64)
    assert float(((got10 - small).abs() / small.abs()).max()) < 1e-6


def test_checkpoint_sweep_final_matches_and_model_untouched(gm5):
    k = 6
    model = gm5.model
    before = copy.deepcopy(model.state_dict())
    # the trained state first: a sweep that loaded checkpoints into the user's model would
    # leave it at the initialisation
    ckpts = [gm5.checkpoints[-1], gm5.checkpoints[0]]
    assert ckpts[0][0] > 0 and ckpts[1][0] == 0
    sweep = checkpoint_sweep(model, ckpts, gm5.loss_fn, gm5.batches, k=k)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())
    assert sweep.kind == "checkpoints" and sweep.x == [c[0] for c in ckpts]
    assert [len(r) for r in sweep.top_eigenvalues] == [k, k]
    trained = _top_eigs(cs.Problem(model, gm5.loss_fn, gm5.batches), k)
    got = torch.tensor(sweep.top_eigenvalues[0], dtype=F64)
    assert float(((got - trained).abs() / trained.abs()).max()) < 1e-6
    # the initialisation's spectrum is a different one
    init = torch.tensor(sweep.top_eigenvalues[1], dtype=F64)
    assert float(((init - got).abs() / got.abs()).max()) > 1e-2


# ============================================================================ analyze()


@pytest.fixture(scope="module", params=[5, 10])
def mixture(request):
    C = request.param
    z = request.getfixturevalue("gm5") if C == 5 else gaussian_mixture(C)
    stages = []
    a = analyze(cs.Problem(z.model, z.loss_fn, z.batches), budget="small", seed=0,
                on_stage=lambda name, done: stages.append((name, sorted(done))))
    return C, z, a, stages


def test_mixture_outliers_count(mixture):
    C, _, a, _ = mixture
    assert a.info["num_classes"] == C
    assert abs(a.outliers.count - C) <= 1  # C (Papyan) or C - 1 (softmax)
    assert a.outliers.gap_ratio >= 2.0
    # the deflated SLQ density's upper bound is the bulk edge (a consistency check)
    assert a.outliers.bulk_edge_slq == pytest.approx(a.outliers.bulk_edge, rel=1e-3)


def test_mixture_outliers_come_from_ggn(mixture):
    _, _, a, _ = mixture
    assert a.overlap_hessian_ggn > 0.9
    n = a.outliers.count
    # not equal: a deep ReLU net is not linear in its parameters (only tr H = tr G is exact),
    # but near a low loss the residual H - G is small
    assert torch.allclose(a.ggn_top.eigenvalues[:n], a.top.eigenvalues[:n], rtol=0.05)


def test_mixture_class_structure_accounts_for_outliers(mixture):
    C, _, a, _ = mixture
    assert a.classes is not None and a.classes.num_classes == C
    assert a.class_overlaps["G12"] > 0.8
    assert abs(a.class_outliers["G12"] - a.outliers.count) <= 1
    assert set(a.class_overlaps) == set(a.class_outliers) == {"G0", "G1", "G2", "G12"}
    # class_outliers counts G-term eigenvalues above the bulk edge
    for term, count in a.class_outliers.items():
        assert count == int((a.classes.spectrum(term) > a.outliers.bulk_edge).sum())


def test_mixture_summary_names_counts(mixture):
    C, _, a, _ = mixture
    lines = a.summary()
    m = re.match(r"(\d+) outliers? for (\d+) classes", lines[0])
    assert m is not None, lines[0]
    assert (int(m.group(1)), int(m.group(2))) == (a.outliers.count, C)
    assert any(line.startswith("Class structure of G") for line in lines)


def test_mixture_stages_in_order(mixture):
    _, _, a, stages = mixture
    names = [s[0] for s in stages]
    # the plan is announced first (the CLI prints it before any solver runs)
    assert names == ["plan", "top", "bottom", "density", "papyan", "classes"]
    for i, (_, keys) in enumerate(stages):  # results so far, growing
        assert set(keys) == set(names[: i + 1])


# MSE: torch's forward-over-reverse fails (ZeroTensor); the operator falls back, with a warning
@pytest.mark.filterwarnings("ignore::curvscope.EngineFallbackWarning")
def test_analyze_regression_has_no_class_structure():
    tp = tiny_mlp("regression")
    stages, partial = [], {}

    def on_stage(name, done):
        stages.append((name, sorted(done)))
        partial[name] = done[name]

    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    a = analyze(problem, budget="small", seed=0, on_stage=on_stage)
    assert a.info["num_classes"] is None
    assert a.classes is None and a.class_overlaps == {} and a.class_outliers == {}
    assert [s[0] for s in stages] == ["plan", "top", "bottom", "density", "papyan"]
    assert [s[1] for s in stages] == [["plan"], ["plan", "top"], ["bottom", "plan", "top"],
                                      ["bottom", "density", "plan", "top"],
                                      ["bottom", "density", "papyan", "plan", "top"]]
    assert partial["plan"]["method"] == a.info["method"]
    assert a.top.k == 20 and a.info["k"] == 20 and a.bottom.k == 5
    assert "classes" not in a.summary()[0]
    # the partial results are the final ones
    assert partial["top"]["eigenvalues"] == pytest.approx(a.top.eigenvalues.tolist(), rel=1e-12)
    assert partial["papyan"]["overlap_hessian_ggn"] == a.overlap_hessian_ggn
    # the top eigenvalues are the dense Hessian's
    H = dense_hessian(tp.model, tp.loss_fn, tp.batches)
    ev = torch.linalg.eigvalsh(H).flip(0)[:20]
    assert float((a.top.eigenvalues - ev).abs().max()) < 1e-5 * float(ev.abs().max())
    assert a.trace()[0] == pytest.approx(float(H.trace()), rel=0.5)


def test_analyze_options_and_validation():
    tp = tiny_mlp("classification")
    problem = cs.Problem(tp.model, tp.loss_fn, tp.batches)
    with pytest.raises(ValueError, match="budget"):
        analyze(problem, budget="huge")
    stages = []
    a = analyze(problem, budget="small", papyan=False, classes=False, k=4,
                on_stage=lambda n, d: stages.append(n))
    assert stages == ["plan", "top", "bottom", "density"]
    assert a.classes is None and a.ggn_top is None and a.overlap_hessian_ggn is None
    assert a.top.k == 4 and a.info["num_classes"] == 3
    b = analyze(problem, budget="small", k=4)  # cross-entropy: classes by default
    assert b.classes is not None and b.classes.num_classes == 3
    c = analyze(problem, budget="small", k=500, papyan=False, classes=False)
    assert c.top.k == c.info["k"] == problem.num_params  # capped at P
