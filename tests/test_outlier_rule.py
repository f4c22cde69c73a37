"""The outlier rule on planted spectra: a clear gap, a real-network-like gap below the threshold
(found, as "probable", at the class count), a smooth decay (no outliers and no bulk edge), and
the views that follow from it (no edge drawn, no term "carrying" outliers it does not have).
"""

import dataclasses

import pytest
import torch

from curvscope.analysis.outliers import find_outliers

F64 = torch.float64


def _bulk(n, ratio, start=1.0):
    """``n`` eigenvalues decaying by ``ratio`` each (a densely spaced bulk)."""
    return start / ratio ** torch.arange(n, dtype=F64)


def _with_outliers(count, gap, bulk_ratio=1.02, n_bulk=20, out_ratio=1.05):
    bulk = _bulk(n_bulk, bulk_ratio)
    # decreasing, the smallest ``gap`` times the bulk's top
    outliers = bulk[0] * gap * out_ratio ** torch.arange(count, dtype=F64).flip(0)
    return torch.cat([outliers, bulk])


def test_a_clear_gap_is_clear():
    s = find_outliers(_with_outliers(4, 3.0))
    assert (s.count, s.confidence) == (4, "clear")
    assert s.bulk_edge == pytest.approx(1.0) and s.gap_ratio == pytest.approx(3.0)


def test_a_gap_below_the_threshold_that_stands_out_of_the_bulk_is_probable():
    # a digits-CNN-like top-30: 10 class outliers 1.3x above a bulk spaced by 2 %
    lam = _with_outliers(10, 1.3)
    s = find_outliers(lam, num_classes=10)
    assert (s.count, s.confidence) == (10, "probable")
    assert s.bulk_edge == pytest.approx(1.0)
    assert "class count" in s.evidence and "1.30" in s.evidence
    # without C the same gap is found (it is the one that stands out most)
    assert find_outliers(lam).count == 10
    # the previous rule (threshold only) found none here
    assert float((lam[:-1] / lam[1:]).max()) < 1.5


def test_a_smooth_decay_has_no_outliers_and_no_bulk_edge():
    for ratio in (1.02, 1.08):
        s = find_outliers(_bulk(30, ratio), num_classes=10)
        assert s.count == 0 and s.confidence == "none" and s.bulk_edge is None
    # a power-law bulk (ratios shrinking down the ranks: 1.41 at the top) is not an outlier
    j = torch.arange(1, 31, dtype=F64)
    assert find_outliers(j ** -0.5).count == 0
    # nor is a 6 % step in a bulk spaced by 2 % (below MIN_RELATIVE_RATIO)
    assert find_outliers(_with_outliers(3, 1.06)).count == 0


def test_the_class_count_is_preferred_among_outstanding_gaps():
    # two outstanding gaps (after rank 3 and after rank 9); C = 10 picks the one at C - 1
    bulk = _bulk(20, 1.02)
    mid = 1.3 * 1.02 ** torch.arange(6, dtype=F64).flip(0)  # ranks 4-9, the smallest 1.3
    top = mid[0] * 1.3 * 1.02 ** torch.arange(3, dtype=F64).flip(0)  # ranks 1-3
    lam = torch.cat([top, mid, bulk])
    ratios = lam[:-1] / lam[1:]
    assert int(ratios.argmax()) in (2, 8) and float(ratios.max()) < 1.5
    assert find_outliers(lam, num_classes=10).count == 9
    assert find_outliers(lam, num_classes=4).count == 3


def test_no_outliers_draws_no_edge_and_g_carries_nothing(tmp_path):
    from curvscope.analysis.spectrum import analyze
    from curvscope.curvature._problem import Problem
    from curvscope.report.plots import plot_top_eigenvalues
    from curvscope.testing import tiny_mlp

    tp = tiny_mlp("classification")
    a = analyze(Problem(tp.model, tp.loss_fn, tp.batches), k=8, budget="small", exact=True)
    none = dataclasses.replace(a, outliers=find_outliers(_bulk(8, 1.02)))
    assert none.outliers.bulk_edge is None
    fig = plot_top_eigenvalues(none)
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert not any("bulk edge" in str(label) for label in labels), labels
    assert any("No outliers" in s for s in none.summary())
    assert not any("carried by" in s for s in none.summary())
    # outliers in H but every G eigenvalue below the edge: G is not said to carry them
    split = find_outliers(_with_outliers(2, 3.0, n_bulk=6))
    edge = split.bulk_edge
    low_g = dataclasses.replace(a.ggn_top, eigenvalues=torch.full_like(a.ggn_top.eigenvalues,
                                                                       edge / 10))
    b = dataclasses.replace(a, outliers=split, ggn_top=low_g, overlap_hessian_ggn=0.9)
    assert b.ggn_above_edge() == 0
    text = " ".join(b.summary())
    assert "does not carry the outliers" in text and "Outliers carried by G" not in text
    high_g = dataclasses.replace(low_g, eigenvalues=torch.full_like(low_g.eigenvalues, edge * 2))
    c = dataclasses.replace(b, ggn_top=high_g)
    assert "Outliers carried by G (the Gauss-Newton part)" in " ".join(c.summary())
