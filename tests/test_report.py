"""Reports: bundle round trip (exact), provenance, atomic writes, load errors, plots, HTML page
checked in a headless Chromium."""

from __future__ import annotations

import dataclasses
import datetime
import html
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import curvscope as cs
from curvscope.analysis.spectrum import SpectrumAnalysis, analyze
from curvscope.report import (
    SCHEMA_VERSION,
    BundleError,
    load_bundle,
    plot_class_structure,
    plot_density,
    plot_embedding,
    plot_sweep,
    plot_top_eigenvalues,
    provenance,
    render_html,
    save_bundle,
)
from curvscope.report import bundle as bundle_mod
from curvscope.testing import tiny_mlp
from curvscope.zoo import gaussian_mixture

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- fixtures
def _quiet_analyze(problem: cs.Problem, **kw) -> SpectrumAnalysis:
    with warnings.catch_warnings():  # tiny problems: bottom pairs may not meet tol 1e-6
        warnings.simplefilter("ignore")
        return analyze(problem, budget="small", **kw)


@pytest.fixture(scope="module")
def mixture() -> SpectrumAnalysis:
    """Cross-entropy with outliers: every part present (bulk density, G, residual, classes)."""
    z = gaussian_mixture(3, input_dim=10, hidden=8, n_per_class=30)
    a = _quiet_analyze(cs.Problem(z.model, z.loss_fn, z.batches), k=8)
    assert a.outliers.count > 0 and a.bulk_density is not None and a.classes is not None
    return a


@pytest.fixture(scope="module")
def tiny_classes() -> SpectrumAnalysis:
    """A tiny MLP (51 parameters): no outliers, so no bulk density and no power-law split."""
    tp = tiny_mlp()
    return _quiet_analyze(cs.Problem(tp.model, tp.loss_fn, tp.batches), k=6)


@pytest.fixture(scope="module")
def regression() -> SpectrumAnalysis:
    """MSE without the G / H - G split: no class structure, no G."""
    tp = tiny_mlp("regression")
    a = _quiet_analyze(cs.Problem(tp.model, tp.loss_fn, tp.batches), k=6, papyan=False)
    assert a.classes is None and a.ggn_top is None
    return a


def _extras() -> dict:
    return {
        "sample_size": {
            "x": [10, 20, 40, 80], "x_label": "examples per class",
            "top_eigenvalues": torch.tensor([[3.0, 2.0, 0.5], [2.6, 1.9, 0.45],
                                             [2.5, 1.8, 0.42], [2.45, 1.8, 0.41]],
                                            dtype=torch.float64),
            "bulk_edge": np.array([0.5, 0.45, 0.42, 0.41]),
        },
        "train_vs_test": {"rows": [{"split": "train", "lambda_max": 2.4},
                                   {"split": "test", "lambda_max": 3.1}],
                          "note": "<b>not bold</b> & escaped"},
        "mask_overlaps": {"mask": np.array([True, False, True]),
                          "half": {"overlap": 0.31, "chance": 0.5},
                          "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16)},
    }


@pytest.fixture(scope="module")
def saved(mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "run"
    paths = save_bundle(mixture, out, extras=_extras(), provenance={"note": "test run"})
    return out, paths


# ----------------------------------------------------------------------------- helpers
def assert_same(a, b, where: str = "analysis") -> None:
    """Field-by-field equality: tensors bit for bit with their dtype, floats exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- round trip
def test_roundtrip_is_exact(saved, mixture):
    out, _ = saved
    b = load_bundle(out)
    assert_same(mixture, b.analysis)
    assert b.summary == mixture.summary() == b.analysis.summary()
    assert b.analysis.top.eigenvectors is not None
    assert b.analysis.bulk_density.deflated.numel() == mixture.outliers.count


@pytest.mark.parametrize("which", ["tiny_classes", "regression"])
def test_roundtrip_of_partial_analyses(which, request, tmp_path):
    a = request.getfixturevalue(which)
    save_bundle(a, tmp_path, plots=False)
    b = load_bundle(tmp_path / "result.json")  # the JSON path works as well as the folder
    assert_same(a, b.analysis)
    assert b.summary == a.summary()
    assert b.plots == "skipped: plots=False"


def test_extras_roundtrip_keeps_arrays_and_types(saved):
    out, _ = saved
    ex = load_bundle(out).extras
    want = _extras()
    got = ex["sample_size"]["top_eigenvalues"]
    assert isinstance(got, torch.Tensor) and torch.equal(got, want["sample_size"]["top_eigenvalues"])
    edge = ex["sample_size"]["bulk_edge"]
    assert isinstance(edge, np.ndarray) and np.array_equal(edge, want["sample_size"]["bulk_edge"])
    mask = ex["mask_overlaps"]["mask"]
    assert mask.dtype == np.bool_ and np.array_equal(mask, want["mask_overlaps"]["mask"])
    bf = ex["mask_overlaps"]["bf16"]
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, want["mask_overlaps"]["bf16"])
    assert ex["train_vs_test"]["rows"] == want["train_vs_test"]["rows"]
    assert ex["mask_overlaps"]["half"] == {"overlap": 0.31, "chance": 0.5}


def test_eigenvectors_can_be_left_out(mixture, tmp_path):
    save_bundle(mixture, tmp_path, plots=False, eigenvectors=False)
    with np.load(tmp_path / "arrays.npz") as npz:
        assert not [k for k in npz.files if k.endswith("eigenvectors")]
    b = load_bundle(tmp_path)
    assert b.analysis.top.eigenvectors is None
    assert torch.equal(b.analysis.top.eigenvalues, mixture.top.eigenvalues)


# ----------------------------------------------------------------------------- JSON content
def test_json_has_schema_provenance_and_no_large_arrays(saved, mixture):
    out, _ = saved
    doc = json.loads((out / "result.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION == 2
    prov = doc["provenance"]
    for key in ("curvscope", "torch", "numpy", "python"):
        assert prov["versions"][key], key
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["versions"]["curvscope"] == cs.__version__
    stamp = datetime.datetime.fromisoformat(prov["timestamp_utc"])
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert isinstance(prov["peak_memory_bytes"], int) and prov["peak_memory_bytes"] > 2**20
    info = mixture.info
    assert prov["seed"] == info["seed"] and prov["dtype"] == info["dtype"] == "torch.float64"
    assert prov["num_params"] == info["num_params"] and prov["num_data"] == info["num_data"]
    assert prov["budgets"] == {"budget": "small", "k": 8, "num_probes": info["num_probes"],
                               "num_iters": info["num_iters"], "outlier_threshold": 1.5}
    assert prov["note"] == "test run"  # caller's provenance entries are kept
    # total products: every part's cost, summed independently here
    parts = [mixture.top, mixture.bottom, mixture.ggn_top, mixture.density,
             mixture.bulk_density, mixture.ggn_density, mixture.residual_density,
             mixture.classes]
    assert prov["matrix_products"]["num_matvecs"] == sum(p.cost.num_matvecs for p in parts)
    assert prov["matrix_products"]["num_data_passes"] == sum(p.cost.num_data_passes for p in parts)
    assert prov["wall_time_s"] == pytest.approx(sum(p.cost.wall_time for p in parts), rel=1e-12)
    assert doc["summary"] == mixture.summary()
    assert doc["plots"] == ["density.png", "top_eigenvalues.png", "class_structure.png",
                            "embedding.png", "sweep_sample_size.png"]
    # the P-sized and [p, m] arrays live in the npz only
    dens = doc["analysis"]["density"]
    for key in ("nodes", "weights"):  # [p, m]: a reference into the npz, no values
        assert dens[key] == {"__array__": f"density.{key}", "dtype": "torch.float64",
                             "shape": list(getattr(mixture.density, key).shape)}
    assert doc["key_numbers"]["trace"]["value"] == pytest.approx(mixture.trace()[0], rel=1e-12)
    top = doc["analysis"]["top"]
    assert top["__dataclass__"] == "curvscope.solvers._results:EigenResult"
    assert top["eigenvalues"]["values"] == mixture.top.eigenvalues.tolist()  # short: shown
    assert top["eigenvectors"]["__array__"] == "top.eigenvectors"
    assert "values" not in top["eigenvectors"] and "values" not in doc["analysis"]["classes"]["gram"]
    assert doc["analysis"]["classes"]["vectors"] is None  # [P, C^2]: never in a bundle

    def longest(x) -> int:
        if isinstance(x, dict):
            return max([longest(v) for v in x.values()] or [0])
        if isinstance(x, list):
            return max([len(x)] + [longest(v) for v in x])
        return 0

    assert longest(doc) < info["num_params"]
    # the manifest describes the npz exactly
    with np.load(out / "arrays.npz") as npz:
        assert set(npz.files) == set(doc["arrays"])
        for key, spec in doc["arrays"].items():
            assert list(npz[key].shape) == spec["shape"], key
        assert npz["top.eigenvectors"].dtype == np.float64
        assert np.array_equal(npz["classes.gram"], mixture.classes.gram.numpy())
    # what follows from the saved fields follows again from the loaded ones
    loaded = load_bundle(out).analysis.classes
    assert torch.equal(loaded.embedding(), mixture.classes.embedding())


def test_provenance_is_hostname_free_and_extra_wins():
    p = provenance({"seed": 7, "versions": "mine"})
    assert p["seed"] == 7 and p["versions"] == "mine"
    text = json.dumps(provenance())
    node = platform.node()
    if len(node) >= 4:
        assert node not in text
    assert "node" not in provenance()["machine"]


# ----------------------------------------------------------------------------- atomic writes
def test_no_temporary_files_left(saved):
    out, paths = saved
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    assert set(paths) == {"arrays", "report", "result", "density", "top_eigenvalues",
                          "class_structure", "embedding", "sweep_sample_size"}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0


def test_crash_mid_write_keeps_old_file_and_leaves_no_temp(tiny_classes, tmp_path, monkeypatch):
    save_bundle(tiny_classes, tmp_path, plots=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(tiny_classes, tmp_path, plots=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing replaced, no temporary file left
    load_bundle(tmp_path)


def test_result_json_is_written_last(tiny_classes, tmp_path, monkeypatch):
    import curvscope.report.html as html_mod

    def boom(*args, **kwargs):
        raise RuntimeError("crash while rendering")

    monkeypatch.setattr(html_mod, "render_html", boom)
    with pytest.raises(RuntimeError, match="crash while rendering"):
        save_bundle(tiny_classes, tmp_path, plots=False)
    assert not (tmp_path / "result.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_bundle(tmp_path)


# ----------------------------------------------------------------------------- load errors
def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no bundle folder"):
        load_bundle(tmp_path / "nowhere")


def test_load_folder_without_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="result.json does not exist"):
        load_bundle(tmp_path)


def test_load_missing_npz(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "b")
    (d / "arrays.npz").unlink()
    with pytest.raises(FileNotFoundError, match="arrays.npz does not exist"):
        load_bundle(d)


@pytest.mark.parametrize("version", [99, 0, "1", None])
def test_load_unknown_schema_version(saved, tmp_path, version):
    d = _copy(saved[0], tmp_path / "b")
    doc = json.loads((d / "result.json").read_text())
    doc["schema_version"] = version
    (d / "result.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=f"schema_version {re.escape(repr(version))}"):
        load_bundle(d)
    if version == 99:
        with pytest.raises(BundleError, match="upgrade curvscope"):
            load_bundle(d)


def test_load_corrupted_json(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "b")
    text = (d / "result.json").read_text()
    (d / "result.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(d)
    (d / "result.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(d)
    (d / "result.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="expected an object"):
        load_bundle(d)


def test_load_truncated_npz(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "b")
    data = (d / "arrays.npz").read_bytes()
    (d / "arrays.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupted"):
        load_bundle(d)


def test_load_npz_missing_key(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "b")
    with np.load(d / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "top.eigenvalues"}
    np.savez(d / "arrays.npz", **arrays)
    with pytest.raises(BundleError, match=r"lacks the arrays \['top.eigenvalues'\]"):
        load_bundle(d)


def test_load_npz_shape_mismatch(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "b")
    with np.load(d / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["density.nodes"] = arrays["density.nodes"][:, :-1]
    np.savez(d / "arrays.npz", **arrays)
    with pytest.raises(BundleError, match="density.nodes.*shape"):
        load_bundle(d)


def test_load_json_missing_part(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "b")
    doc = json.loads((d / "result.json").read_text())
    del doc["analysis"]["top"]["method"]
    (d / "result.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="lacks 'method'"):
        load_bundle(d)


# ----------------------------------------------------------------------------- save errors
def test_save_rejects_wrong_inputs(mixture, tmp_path):
    with pytest.raises(TypeError, match="SpectrumAnalysis"):
        save_bundle(mixture.top, tmp_path)
    with pytest.raises(TypeError, match="must be a section .a dict"):
        save_bundle(mixture, tmp_path, plots=False, extras={"sweep": [1, 2]})
    with pytest.raises(TypeError, match="reserved"):
        save_bundle(mixture, tmp_path, plots=False, extras={"odd": {"__array__": 1}})
    with pytest.raises(TypeError, match=r"extras\.odd\.value: a object cannot be saved"):
        save_bundle(mixture, tmp_path, plots=False, extras={"odd": {"value": object()}})
    assert not (tmp_path / "result.json").exists()


# ----------------------------------------------------------------------------- plots
def _check_figure(fig, num_axes: int) -> None:
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    assert fig.canvas.manager is None  # not a pyplot figure: no global state, never shown
    assert len(fig.axes) == num_axes
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax
        assert ax.lines or ax.collections or ax.patches, f"empty panel {ax.get_title()}"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    png = buf.getvalue()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000


def test_plots_are_labelled_figures(mixture):
    pytest.importorskip("matplotlib")
    _check_figure(plot_density(mixture), 2)
    _check_figure(plot_top_eigenvalues(mixture), 2)
    _check_figure(plot_class_structure(mixture), 2)
    _check_figure(plot_embedding(mixture), 2)
    _check_figure(plot_sweep(_extras()["sample_size"], name="sample_size"), 1)


def test_plots_of_partial_analyses(regression, tiny_classes):
    pytest.importorskip("matplotlib")
    _check_figure(plot_density(regression), 2)
    _check_figure(plot_top_eigenvalues(regression), 1)  # no G: one panel
    _check_figure(plot_top_eigenvalues(tiny_classes), 2)
    with pytest.raises(ValueError, match="no class structure"):
        plot_class_structure(regression)
    with pytest.raises(ValueError, match="no class structure"):
        plot_embedding(regression)


def test_outliers_are_highlighted(mixture):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from curvscope.report.plots import COLORS

    ax = plot_top_eigenvalues(mixture).axes[0]
    red = [ln for ln in ax.lines if ln.get_marker() == "o"
           and to_hex(ln.get_color()) == COLORS["outlier"]]
    assert sum(len(ln.get_xdata()) for ln in red) == mixture.outliers.count
    edge = [ln for ln in ax.lines if list(ln.get_ydata()) == [mixture.outliers.bulk_edge] * 2]
    assert edge, "bulk edge line missing"


def test_plot_sweep_validates():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="needs 'x'"):
        plot_sweep({"x": [1, 2]})
    with pytest.raises(ValueError, match="shape"):
        plot_sweep({"x": [1, 2, 3], "top_eigenvalues": [[1.0, 0.5], [1.0, 0.4]]})


def test_without_matplotlib(mixture, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'curvscope[plot]'")):
        plot_density(mixture)
    with caplog.at_level("WARNING", logger="curvscope.report.bundle"):
        paths = save_bundle(mixture, tmp_path)
    assert "plots skipped" in caplog.text
    doc = json.loads(paths["result"].read_text())
    assert doc["plots"].startswith("skipped: matplotlib missing")
    assert not list(tmp_path.glob("*.png"))
    page = paths["report"].read_text()
    assert "<img" not in page and "matplotlib missing" in page
    assert_same(mixture, load_bundle(tmp_path).analysis)


def test_import_does_not_load_matplotlib():
    code = "import sys, curvscope.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- HTML
def test_html_is_self_contained(saved, mixture):
    out, paths = saved
    page = paths["report"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page), "external resource"
    assert "http://" not in page and "https://" not in page and "@import" not in page
    srcs = re.findall(r"<img src='([^']*)'", page)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    import base64

    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG_MAGIC)
    for sentence in mixture.summary():
        assert html.escape(sentence, quote=True) in page
    assert f"{mixture.outliers.count} outliers for 3 classes" in page  # the headline
    for section in ("Key numbers", "Provenance", "sample size", "train vs test",
                    "mask overlaps", "Cost by part"):
        assert section in page, section
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; escaped" in page  # extras text is escaped
    assert "images ok: " in page  # the load check script
    # each eigenpair table: the solver's own cost and its pairs, rank by rank
    from curvscope.report.html import _num

    for title, r in (("Top eigenpairs of H", mixture.top), ("Bottom eigenpairs of H", mixture.bottom),
                     ("Top eigenpairs of G", mixture.ggn_top)):
        head = re.search(re.escape(title) + r"[^<]*</summary>(.*?)</details>", page, re.S)
        assert head, title
        assert (f"{_num(r.cost.num_matvecs)} products, {_num(r.cost.num_data_passes)} data passes"
                in head.group(0)), head.group(0)[:200]
        assert head.group(1).count("<tr") == r.k + 1  # a header and one row per pair
        assert _num(float(r.eigenvalues[0]), 8) in head.group(1)


def test_render_html_rejects_wrong_inputs():
    with pytest.raises(TypeError, match="JSON document"):
        render_html(["not", "a", "dict"], {})
    with pytest.raises(TypeError, match="PNG bytes"):
        render_html({}, {"density": "not bytes"})


# ----------------------------------------------------------------------------- Chromium
def _chromium() -> str | None:
    env = os.environ.get("CURVSCOPE_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(binary: str, page: Path, profile: Path, *extra: str) -> str:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", *extra, page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _title(dom: str) -> str:
    m = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert m, dom[:500]
    return m.group(1)


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium binary found (apt-get install -y chromium); CI installs it")
    return binary


def test_html_renders_in_headless_chromium(saved, chromium, tmp_path):
    out, paths = saved
    n = len(json.loads(paths["result"].read_text())["plots"])
    assert n == 5
    title = _title(_run_chromium(chromium, paths["report"], tmp_path / "profile", "--dump-dom"))
    assert f"images ok: {n}/{n}" in title, title
    assert "errors" not in title, title
    shot = tmp_path / "screenshot.png"
    _run_chromium(chromium, paths["report"], tmp_path / "profile", f"--screenshot={shot}",
                  "--window-size=1280,2400", "--hide-scrollbars")
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000


def test_chromium_check_catches_broken_images_and_errors(chromium, tmp_path):
    """The title check fails when it should: a broken image and a script error show up."""
    page = render_html({"summary": ["x"]}, {"density": b"not a png"})
    page = page.replace("</main>", "<script>undefinedFunction();</script></main>")
    path = tmp_path / "broken.html"
    path.write_text(page)
    title = _title(_run_chromium(chromium, path, tmp_path / "profile", "--dump-dom"))
    assert "images ok: 0/1" in title, title
    assert "[errors:" in title and "undefinedFunction" in title, title


def test_bundle_files_are_valid(saved):
    out, _ = saved
    with zipfile.ZipFile(out / "arrays.npz") as z:
        assert z.testzip() is None
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC)
