"""Every report section end to end: computed by the library (run_study), saved, loaded back,
drawn to a PNG and shown in the HTML with its caption and its summary; the sections' numbers
checked against independent computations.
"""

import re

import pytest
import torch

import curvscope as cs
from curvscope.analysis.sections import mask_overlap_curve, train_vs_test
from curvscope.analysis.spectrum import analyze
from curvscope.analysis.sweeps import sample_size_sweep
from curvscope.report import load_bundle, save_bundle
from curvscope.report.html import CAPTIONS, SECTION_CAPTIONS, SWEEP_CAPTION
from curvscope.report.plots import is_sweep, render_pngs
from curvscope.zoo import gaussian_mixture


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    zoo = gaussian_mixture(3, input_dim=12, hidden=6, n_per_class=30, n_test_per_class=20,
                           batch_size=45, seed=0)
    out = tmp_path_factory.mktemp("study")
    s = cs.run_study(zoo.model, zoo.loss_fn, zoo.batches, out=out, test_data=zoo.test_batches,
                  checkpoints=zoo.checkpoints, budget="small", k=8, seed=1)
    return zoo, out, s


def test_every_section_round_trips_and_renders(study):
    zoo, out, s = study
    assert set(s.extras) == {"checkpoints", "mask_overlap", "test"}
    bundle = load_bundle(out)
    assert set(bundle.extras) == set(s.extras)
    html = (out / "report.html").read_text()
    names = {p.stem for p in out.glob("*.png")}
    expected = {"density", "top_eigenvalues", "class_structure", "embedding",
                "sweep_checkpoints", "section_mask_overlap", "section_test"}
    assert expected <= names, names
    for name in expected:
        assert (out / f"{name}.png").stat().st_size > 5_000
        assert html.count(f"id='fig-{name}'") == 1, name  # once: sections' plots with them
    # each further section: its caption and its summary sentences, as computed
    assert SWEEP_CAPTION in html
    for kind in ("train_vs_test", "mask_overlap"):
        assert SECTION_CAPTIONS[kind] in html
    for name, section in bundle.extras.items():
        assert section == s.extras[name]  # read back as its class, every field equal
        for sentence in section.summary:
            assert sentence.replace("+-", "+-") in html.replace("&#x27;", "'"), sentence
    for caption in CAPTIONS.values():
        assert caption in html
    # the library's summary carries the sections' sentences too
    assert any(line.startswith("test: ") for line in s.summary())
    # a finished study leaves no resumable stages
    assert not (out / "stages").exists()


def test_the_checkpoint_sweep_is_a_plotted_sweep_with_its_numbers(study):
    zoo, _, s = study
    sweep = s.extras["checkpoints"]
    assert is_sweep(sweep) and sweep.x_label == "training step"
    assert sweep.x == [c[0] for c in zoo.checkpoints]
    # the last checkpoint is the trained model: its top eigenvalues are the analysis's
    last = torch.tensor(sweep.top_eigenvalues[-1], dtype=torch.float64)
    top = s.analysis.top.eigenvalues[: last.numel()].to(torch.float64)
    assert float(((last - top).abs() / top.abs()).max()) < 1e-3
    first, final = sweep.top_eigenvalues[0][0], sweep.top_eigenvalues[-1][0]
    assert f"{final / first:.2f}x" in sweep.summary[0]


def test_train_vs_test_against_an_independent_analysis(study):
    zoo, _, s = study
    section = s.extras["test"]
    test = analyze(cs.Problem(zoo.model, zoo.loss_fn, zoo.test_batches), k=8, budget="small",
                   seed=1, papyan=False, classes=False, bottom_k=1, exact=True)
    want = test.top.eigenvalues[: section.k].to(torch.float64)
    got = torch.tensor(section.test_top, dtype=torch.float64)
    assert float(((got - want).abs() / want.abs()).max()) < 1e-6
    assert section.test_outliers == test.outliers.count
    assert section.test_outlier_confidence == test.outliers.confidence
    told = f"{test.outliers.count} ({test.outliers.confidence}) on test" if test.outliers.count \
        else "0 on test"
    assert told in section.summary[0]
    assert section.top_ratio == pytest.approx(float(want[0]) / section.train_top[0])
    same = train_vs_test(s.analysis, s.analysis, 5)
    assert same.top_ratio == 1.0 and same.train_top == same.test_top


def test_mask_overlap_curve_against_a_direct_count(study):
    _, _, s = study
    section = s.extras["mask_overlap"]
    theta = s.problem.param_space.join(s.problem.parameters()).cpu()
    U = s.analysis.top.eigenvectors[:, : section.k]
    P = theta.numel()
    assert section.num_params == P and section.mask_sizes[-1] == round(P / 2)
    for m, ov, chance in zip(section.mask_sizes, section.overlap, section.chance):
        idx = theta.abs().argsort(descending=True)[:m]
        assert ov == pytest.approx(float((U[idx] ** 2).sum()) / U.shape[1], rel=1e-9)
        assert chance == pytest.approx(m / P)
    # a mask of every parameter holds the whole space
    full = mask_overlap_curve(s.analysis, theta, points=2)
    assert full.overlap[-1] <= 1 + 1e-12
    assert re.search(r"\d+% of its weight", section.summary[0])


def test_a_sample_size_sweep_renders_in_a_bundle(study, tmp_path):
    zoo, _, s = study
    sweep = sample_size_sweep(zoo.model, zoo.loss_fn, zoo.batches, [5, 30], k=4)
    assert is_sweep(sweep)
    assert "sweep_sizes" in render_pngs(s.analysis, {"sizes": sweep})
    save_bundle(s.analysis, tmp_path, extras={"sizes": sweep})
    assert (tmp_path / "sweep_sizes.png").exists()
    assert load_bundle(tmp_path).extras["sizes"] == sweep


def test_key_numbers_round_trip_through_result_json(tmp_path):
    """The page reads typed key numbers back from result.json: every figure as it was saved."""
    import json

    import curvscope as cs
    from curvscope.analysis.key_numbers import KeyNumbers, key_numbers
    from curvscope.analysis.spectrum import analyze
    from curvscope.report import load_bundle, save_bundle
    from curvscope.testing import tiny_mlp

    tp = tiny_mlp("classification")
    a = analyze(cs.Problem(tp.model, tp.loss_fn, tp.batches), budget="small", exact=False)
    kn = key_numbers(a)
    save_bundle(a, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())["key_numbers"]
    back = load_bundle(tmp_path).key_numbers
    assert isinstance(back, KeyNumbers) and back.to_dict() == saved
    assert back.trace == kn.trace and back.outliers == kn.outliers
    assert back.smallest_eigenvalue.value == float(a.bottom.eigenvalues.min())
    assert set(back.terms) == {"ggn_density", "residual_density"} | (
        {"bulk_density"} if a.bulk_density is not None else set())
    assert back.class_overlaps == kn.class_overlaps and back.class_overlaps
    assert KeyNumbers.from_dict({}) == KeyNumbers()  # a partial document: nothing invented
