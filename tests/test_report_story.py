"""One story: the headline, the summary, the key-number table and result.json give the negative
part and the trace as the same figures with the same kind of error bar (95 % interval), on an
exact and on an iterative analysis."""

import json
import re

import pytest

import curvscope as cs
from curvscope.analysis.formatting import rounded_to_error
from curvscope.analysis.spectrum import analyze
from curvscope.report import save_bundle
from curvscope.report.html import _headline, _key_table
from curvscope.testing import tiny_cnn, tiny_mlp


@pytest.mark.parametrize("make,exact", [(tiny_mlp, None), (tiny_cnn, False), (tiny_cnn, True)])
def test_headline_summary_table_and_json_tell_one_story(make, exact, tmp_path):
    tp = make()
    a = analyze(cs.Problem(tp.model, tp.loss_fn, tp.batches), budget="small", exact=exact)
    save_bundle(a, tmp_path)
    doc = json.loads((tmp_path / "result.json").read_text())
    kn = doc["key_numbers"]
    part = a.negative_part()
    neg, near = part["clearly_negative"][0], part["near_zero"][0]
    # JSON: the resolvable split, never the raw fraction below zero
    assert kn["negative_fraction"]["value"] == pytest.approx(neg)
    assert kn["near_zero_fraction"]["value"] == pytest.approx(near)
    assert kn["resolution"] == pytest.approx(part["resolution"])
    tr, half = a.trace_interval()
    assert kn["trace"]["value"] == pytest.approx(tr) and kn["trace"]["interval_95"] == \
        pytest.approx(half)
    summary, headline, table = " ".join(doc["summary"]), _headline(doc), _key_table(doc)
    assert f"{neg:.0%} of eigenvalues clearly negative" in summary
    assert f"{neg:.0%} of eigenvalues clearly negative" in headline
    assert f"{near:.0%} within" in summary and f"{near:.0%} within" in headline
    if a.density.exact:
        assert "exact" in headline and "exact" in summary and "(exact)" in table
    else:
        # the same figure, rounded to its 95% interval, in the summary, the headline and the table
        value, err = rounded_to_error(tr, half)
        assert f"Trace {value} +- {err} (95% interval" in summary
        assert f"trace {value} ± {err} (95%)" in headline
        assert f"{value}</td><td>± {err} (95%)" in table.replace("<td class='num'>", "<td>")
        assert ("unresolved" in summary) == (half >= abs(tr))
        assert ("unresolved" in headline) == (half >= abs(tr))
    # no other percentage of negative eigenvalues anywhere in the headline
    shown = re.findall(r"(\d+)% of eigenvalues clearly negative", headline)
    assert shown == [f"{neg:.0%}"[:-1]]


def test_the_smallest_eigenvalue_carries_its_residual_when_not_converged():
    """Summary and key-number table give an unconverged smallest eigenvalue with its residual
    norm as the error bar (it bounds the distance to an eigenvalue of H); a converged one plain."""
    import dataclasses

    import torch

    tp = tiny_mlp()
    a = analyze(cs.Problem(tp.model, tp.loss_fn, tp.batches), budget="small", exact=False)
    lam = float(a.bottom.eigenvalues.min())
    assert f"(smallest eigenvalue {lam:.3g})" in " ".join(a.summary())
    b = a.bottom
    stuck = dataclasses.replace(b, converged=torch.zeros_like(b.converged),
                                residual_norms=torch.full_like(b.residual_norms, 0.0044))
    text = " ".join(dataclasses.replace(a, bottom=stuck).summary())
    value, err = rounded_to_error(lam, 0.0044)
    assert f"(smallest eigenvalue {value} +- {err}, its residual bound: not converged)" in text
