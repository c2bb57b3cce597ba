"""compare_model: the accuracy report's numbers against an independent computation, its files, and the
page rendered by a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from amct_caffe.api.accuracy import compare_model
from amct_caffe.api.compare import compare_batches
from amct_caffe.api.workflow import calibrate
from amct_caffe.errors import GraphError
from amct_caffe.runtime import TEST, Net
from tests.golden import MODELS, SHARED

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
MNIST = SHARED / "data/mnist_5k.npz"
NSFW = (MODELS / "open_nsfw/deploy.prototxt", MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel")
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason="../shared not beside the repository")


def _digits(lo, hi):
    z = np.load(MNIST)
    return z["images"][lo:hi, None].astype(np.float32) * np.float32(0.00390625)


@pytest.fixture(scope="module")
def lenet_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    x = _digits(0, 64)
    paths = calibrate(str(LENET), str(LENET_W), [{"data": x[:32]}, {"data": x[32:]}], str(tmp / "q/lenet"), 2,
                      progress=False)
    held_out = [{"data": b} for b in np.split(_digits(64, 160), 3)]
    result = compare_model(str(LENET), str(LENET_W), paths["fake_quant_model"], paths["fake_quant_weights"],
                           held_out, tmp / "report", batch_num=0, progress=False, dump=True)
    return tmp, paths, held_out, result


def test_numbers_equal_an_independent_computation(lenet_report):
    _, paths, held_out, result = lenet_report
    report = json.loads(Path(result["json"]).read_text())
    fp32, quant = Net(str(LENET), str(LENET_W), TEST), Net(paths["fake_quant_model"], paths["fake_quant_weights"], TEST)
    a = np.concatenate([fp32.forward(**f)["prob"].copy() for f in held_out]).astype(np.float64)
    b = np.concatenate([quant.forward(**f)["prob"].copy() for f in held_out]).astype(np.float64)
    cos = np.mean([u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) for u, v in zip(a, b, strict=True)])
    prob = next(r for r in report["blobs"] if r["name"] == "prob")
    assert prob["output"] and prob["layer"] == "prob" and prob["type"] == "Softmax"
    assert prob["cosine"] == pytest.approx(cos, rel=1e-12)
    assert prob["max_abs_error"] == pytest.approx(np.abs(a - b).max(), rel=1e-9)
    assert prob["relative_error"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-9)
    assert prob["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(a * a) / np.sum((a - b) ** 2)), rel=1e-9)
    assert prob["top1_agreement"] == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert report["summary"]["samples"] == 96 and report["summary"]["worst_output_cosine"] == prob["cosine"]


def test_every_layer_is_matched_through_fusion_and_inserted_layers(lenet_report):
    report = json.loads(Path(lenet_report[3]["json"]).read_text())
    by_name = {r["name"]: r for r in report["blobs"]}
    # LeNet's ReLU runs in place on ip1: the InnerProduct's own value and the ReLU's are both compared
    assert {"conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"} <= set(by_name)
    assert by_name["ip1"]["layer"] == "relu1" and by_name["ip1"]["quant_layer"] == "relu1"
    ip1_raw = next(r for r in report["blobs"] if r["layer"] == "ip1")
    assert ip1_raw["quant_layer"] == "ip1"  # the quantized InnerProduct, seen through its DeQuant
    for r in report["blobs"]:
        assert set(r) >= {"name", "layer", "type", "output", "cosine", "max_abs_error", "relative_error", "sqnr_db"}
        assert 0.999 < r["cosine"] <= 1.0 + 1e-12


def test_report_files_and_page(lenet_report):
    _, _, _, result = lenet_report
    page = Path(result["html"]).read_text()
    assert page.count("data:image/png;base64,") == len([k for k in result if k.endswith(".png")]) >= 3
    assert "Layers that add the most error" in page and "<script src" not in page  # self-contained
    for name in ("layer_error.png", "activation_1_0.png"):
        assert Path(result[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_nsfw_matches_fused_blobs(tmp_path):
    if not NSFW[0].exists():
        pytest.skip("open_nsfw not in ../shared")
    rng = np.random.default_rng(0)
    feeds = [{"data": (rng.standard_normal((2, 3, 224, 224)) * 40).astype(np.float32)}]
    paths = calibrate(str(NSFW[0]), str(NSFW[1]), feeds, str(tmp_path / "q/nsfw"), 1, progress=False)
    result = compare_model(str(NSFW[0]), str(NSFW[1]), paths["deploy_model"], paths["deploy_weights"], feeds,
                           tmp_path / "report", batch_num=0, progress=False)
    report = json.loads(Path(result["json"]).read_text())
    by_layer = {r["layer"]: r for r in report["blobs"]}
    # conv_1 + bn_1 + scale_1 fused: the fused convolution is compared with the float Scale's value
    assert by_layer["scale_1"]["quant_layer"] == "conv_1"
    assert report["summary"]["worst_output_cosine"] > 0.99
    # The nets of the report write over the values nobody compares (the Convolution's output before its
    # BatchNorm and Scale), and run those chains folded; the figures are those of nets keeping every value.
    quant = (paths["fake_quant_model"], paths["fake_quant_weights"])
    lean, _, lean_cmp = compare_batches(str(NSFW[0]), str(NSFW[1]), *quant, feeds)
    full, _, full_cmp = compare_batches(str(NSFW[0]), str(NSFW[1]), *quant, feeds, every_blob=True)
    assert lean == full and len(lean) == len(lean_cmp.names) > 100
    assert len(lean_cmp.fp32_net.blobs) < len(full_cmp.fp32_net.blobs) - 100
    assert len(lean_cmp.fp32_net._chains) >= 53 and not full_cmp.fp32_net._chains  # noqa: SLF001
    assert set(lean_cmp.names) <= set(lean_cmp.fp32_net.blobs) & set(lean_cmp.quant_net.blobs)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium for the headless rendering check (.ci/run installs "
                                                "Debian's chromium)")
def test_page_renders_its_plots_in_a_headless_browser(lenet_report, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    res = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--screenshot={shot}", "--window-size=1200,2600",
                          "file://" + str(lenet_report[3]["html"])], capture_output=True, text=True, timeout=120,
                         check=False)
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    r, g, b = pixels.T
    # only the plots draw in colour: matplotlib's blue histograms / lines and the orange SQNR line
    blue = np.sum((b - r > 60) & (b > 140))
    orange = np.sum((r > 200) & (g > 90) & (g < 190) & (b < 110))
    assert blue > 20000 and orange > 100, (blue, orange)


def test_blob_dumps_hold_every_blob_of_one_sample(lenet_report):
    _, paths, held_out, result = lenet_report
    fp32 = Net(str(LENET), str(LENET_W), TEST)
    fp32.forward(data=held_out[0]["data"])
    with np.load(result["fp32_blobs"]) as f, np.load(result["quant_blobs"]) as q:
        assert {"data", "conv1", "pool1", "ip1", "ip1_ip1", "prob"} <= set(f.files)
        assert f["prob"].shape == (1, 10)
        np.testing.assert_array_equal(f["prob"], fp32.blobs["prob"].data[:1])
        assert any(name.endswith("_quant") or "quant" in name for name in q.files)  # the Quant layers' values
        np.testing.assert_allclose(q["prob"], f["prob"], atol=0.02)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_num": -1}, "batch_num must be an integer >= 0 (0: every batch given), got -1"),
    ({"batch_num": "2"}, "batch_num must be an integer >= 0 (0: every batch given), got '2'"),
    ({"data": [{"data": np.zeros((0, 1, 28, 28), np.float32)}]},
     "compare_model data: batch 0: input 'data' holds no sample (shape [0, 1, 28, 28])"),
    ({"data": 7}, "compare_model data: expected {input blob: array} batches"),
    ({"data": str(MNIST), "batch_size": -2}, "batch_size must be an integer >= 0 (0: the model's), got -2"),
    ({"data": str(MNIST), "preprocess": {"bogus": 1}}, "preprocess: unknown field(s) bogus"),
    ({"data": str(MNIST), "preprocess": "x"}, "preprocess must be a Preprocess, a dict of its fields"),
    ({"output_dir": None}, "output_dir must be a file path, got NoneType None"),
])
def test_bad_arguments_get_the_librarys_errors(lenet_report, tmp_path, kwargs, message):
    from amct_caffe.errors import AmctError

    _, paths, held_out, _ = lenet_report
    args = {"data": held_out, "output_dir": tmp_path / "r", **kwargs}
    with pytest.raises(AmctError) as err:
        compare_model(str(LENET), str(LENET_W), paths["fake_quant_model"], paths["fake_quant_weights"],
                      progress=False, **args)
    assert message in str(err.value)
    assert not (tmp_path / "r").exists()


def test_one_batch_may_be_given_as_a_mapping(lenet_report, tmp_path):
    _, paths, held_out, _ = lenet_report
    one = compare_model(str(LENET), str(LENET_W), paths["fake_quant_model"], paths["fake_quant_weights"],
                        held_out[0], tmp_path / "a", progress=False)
    listed = compare_model(str(LENET), str(LENET_W), paths["fake_quant_model"], paths["fake_quant_weights"],
                           held_out[:1], tmp_path / "b", progress=False)
    assert one["summary"] == listed["summary"]


def test_batch_num_zero_reads_every_batch_of_a_data_path(lenet_report, tmp_path):
    """batch_num 0 means every batch, for a data path too (it used to ask the source for 0 batches)."""
    _, paths, _, _ = lenet_report
    np.savez(tmp_path / "x.npz", data=_digits(0, 96))
    result = compare_model(str(LENET), str(LENET_W), paths["fake_quant_model"], paths["fake_quant_weights"],
                           str(tmp_path / "x.npz"), tmp_path / "r", batch_size=32, batch_num=0, progress=False)
    assert result["summary"]["samples"] == 96


def test_blob_error_sums_kernel_equals_the_numpy_expressions_on_any_thread_count(monkeypatch):
    from amct_caffe.api import compare
    if compare.BLOB_STATS_KERNEL is None:
        pytest.skip("the C++ extension is not built")
    rng = np.random.default_rng(3)
    for shape, n in [((8, 16, 30, 30), 8), ((3, 40000, 3), 3), ((1, 5), 1), ((7,), 2), ((4, 3), 4)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y = (x + rng.standard_normal(shape).astype(np.float32) * np.float32(0.01)).astype(np.float32)
        got = [compare.BLOB_STATS_KERNEL(x, y, compare.sample_rows(x, n).shape[0], t) for t in (1, 2, 3)]
        assert all(np.array_equal(np.stack(g[:4]), np.stack(got[0][:4])) and g[4] == got[0][4] for g in got)
        monkeypatch.setattr(compare, "BLOB_STATS_KERNEL", None)
        reference = compare.blob_error_sums(x, y, n)  # the NumPy expressions
        monkeypatch.undo()
        for k, r in zip(compare.blob_error_sums(x, y, n), reference, strict=True):
            np.testing.assert_allclose(k, r, rtol=1e-12, atol=0)
    x = np.zeros((2, 5), np.float32)
    y = x.copy()
    y[1, 2] = np.nan
    dot, aa, bb, dd, max_abs = compare.blob_error_sums(x, y, 2)
    assert np.isnan(max_abs) and np.isnan(dot[1]) and dd[0] == 0 and bb[0] == 0


def test_activation_histogram_of_values_spanning_float32s_range():
    from amct_caffe.api.report import activation_plot
    png = activation_plot(np.array([-3e38, 2e38, 0.0], np.float32), (-1.0, 1.0), "extreme values")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"  # (float32 bin arithmetic overflowed here)


def test_blobs_of_nan_give_nan_figures_without_numpy_warnings(tmp_path):
    """LeNet with its pool2 STOCHASTIC (its TEST-phase average weighted by the values divides by their sum, zero
    where a window is all zero: NaN) compares to NaN figures, silently: the report must not print numpy's
    RuntimeWarnings (a line of our code under each) on the user's screen."""
    import warnings

    from amct_caffe.api.compare import compare_batches

    text = LENET.read_text()
    at = text.index('name: "pool2"')
    model = tmp_path / "lenet_stochastic.prototxt"
    model.write_text(text[:at] + text[at:].replace("pool: MAX", "pool: STOCHASTIC", 1))
    x = _digits(0, 16)
    paths = calibrate(str(model), str(LENET_W), [{"data": x}], str(tmp_path / "q/m"), 1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reports, summary, _ = compare_batches(str(model), str(LENET_W), paths["fake_quant_model"],
                                              paths["fake_quant_weights"], [{"data": x}])
    assert any(np.isnan(r.cosine) for r in reports) and summary["samples"] == 16


def test_sqnr_of_the_edge_cases():
    from amct_caffe.api.compare import _sqnr_db

    assert _sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert _sqnr_db(1.0, 0.0) == float("inf") and _sqnr_db(0.0, 1.0) == float("-inf")  # log10(0) used to raise
    assert np.isnan(_sqnr_db(float("inf"), float("inf"))) and np.isnan(_sqnr_db(float("nan"), 1.0))


def test_non_finite_figures_keep_their_sign_in_the_json_and_the_page():
    """SQNR +inf (identical blobs) and -inf (an all-zero FP32 blob against another) and NaN are told apart:
    report.json wrote null and the page "inf" for all of them."""
    from amct_caffe.api.compare import json_safe
    from amct_caffe.api.report import _fmt

    values = {"same": float("inf"), "zero_reference": float("-inf"), "undefined": float("nan"), "x": 1.5}
    assert json_safe(values) == {"same": "inf", "zero_reference": "-inf", "undefined": "nan", "x": 1.5}
    assert [_fmt(v) for v in values.values()] == ["inf", "-inf", "nan", "1.5"]


def test_a_blob_of_nan_or_infinities_is_reported_not_a_crash(tmp_path):
    """A Log of zeros and negative values makes -inf and NaN from finite data: the report counts them in its
    plots and still writes every file."""
    model = tmp_path / "log.prototxt"
    model.write_text(LENET.read_text().replace('bottom: "data"\n  top: "conv1"', 'bottom: "lg"\n  top: "conv1"', 1)
                     .replace('layer {\n  name: "conv1"', 'layer { name: "lg" type: "Log" bottom: "data" top: "lg" }\n'
                              'layer {\n  name: "conv1"', 1))
    assert 'type: "Log"' in model.read_text() and 'bottom: "lg"' in model.read_text()
    q = calibrate(str(model), str(LENET_W), [{"data": _digits(0, 16) + np.float32(0.5)}], str(tmp_path / "q/m"), 1,
                  progress=False)
    x = _digits(0, 8) - np.float32(0.5)  # zeros and negatives: -inf and NaN after the Log
    result = compare_model(str(model), str(LENET_W), q["fake_quant_model"], q["fake_quant_weights"], [{"data": x}],
                           tmp_path / "r", progress=False)
    assert any(name.startswith("activation") for name in result)
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "layer_error.png").is_file()
    assert np.isnan(result["summary"]["worst_output_cosine"])
    assert np.isnan(result["summary"]["most_sensitive_layers"][0]["error_added"])  # non-finite ranks first


def test_rankings_put_nan_first_and_keep_the_finite_order():
    from types import SimpleNamespace

    from amct_caffe.api.compare import by_error_added, worst_cosine

    reports = [SimpleNamespace(name=n, error_added=e) for n, e in (("a", 0.01), ("n1", float("nan")), ("b", 0.49),
                                                                     ("c", 0.0), ("n2", float("nan")))]
    assert [r.name for r in by_error_added(reports)] == ["n1", "n2", "b", "a", "c"]
    assert np.isnan(worst_cosine([0.5, float("nan")])) and np.isnan(worst_cosine([float("nan"), 0.5]))
    assert worst_cosine([0.9, 0.5]) == 0.5 and worst_cosine([], default=1.0) == 1.0


def test_a_layer_of_several_tops_is_one_of_the_most_sensitive_layers_once():
    """An LSTM's y, h_T and c_T each add error; the summary's ranking names the layer once (it filled the
    command line's three places with it)."""
    from amct_caffe.api.compare import BlobReport, summary

    def report(name, layer, added):
        return BlobReport(name, layer, "LSTM" if layer == "lstm" else "InnerProduct", layer, name == "fc", 0.99,
                          0.1, 0.01, 40.0, added, [2, 4])

    reports = [report("fc0", "fc0", 1e-5), report("y", "lstm", 3e-4), report("hT", "lstm", 2e-4),
               report("cT", "lstm", 1e-4), report("fc", "fc", 5e-5)]
    ranked = summary(reports, samples=2)["most_sensitive_layers"]
    assert [(r["layer"], r["blob"]) for r in ranked] == [("lstm", "y"), ("fc", "fc"), ("fc0", "fc0")]


def test_a_report_folder_used_again_holds_only_the_new_reports_files(lenet_report, tmp_path):
    """The plots of more layers and the dumps of an earlier report (with --dump) are removed when a report without
    them is written into the same folder; other files stay."""
    _, paths, _, _ = lenet_report
    out = tmp_path / "report"
    out.mkdir()
    (out / "activation_9_0.png").write_bytes(b"an earlier report's plot")
    (out / "fp32_blobs.npz").write_bytes(b"an earlier report's dump")
    (out / "notes.txt").write_text("mine")
    compare_model(str(LENET), str(LENET_W), paths["fake_quant_model"], paths["fake_quant_weights"],
                  [{"data": _digits(0, 16)}], out, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert "activation_9_0.png" not in names and "fp32_blobs.npz" not in names
    assert "notes.txt" in names and "report.json" in names and "layer_error.png" in names


def _bn_chain_net(tmp_path) -> tuple[Path, Path]:
    """data -> 3 x (Convolution without bias -> BatchNorm -> Scale -> ReLU, all in place): a linear chain."""
    layers = ['layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 12 '
              'dim: 12 } } }']
    bottom = "data"
    for i in (1, 2, 3):
        c = f"c{i}"
        layers += [f'layer {{ name: "{c}" type: "Convolution" bottom: "{bottom}" top: "{c}" convolution_param {{ '
                   f'num_output: 8 kernel_size: 3 pad: 1 bias_term: false weight_filler {{ type: "msra" }} }} }}',
                   f'layer {{ name: "{c}_bn" type: "BatchNorm" bottom: "{c}" top: "{c}" }}',
                   f'layer {{ name: "{c}_sc" type: "Scale" bottom: "{c}" top: "{c}" '
                   'scale_param { bias_term: true } }',
                   f'layer {{ name: "{c}_relu" type: "ReLU" bottom: "{c}" top: "{c}" }}']
        bottom = c
    proto = tmp_path / "bn_chain.prototxt"
    proto.write_text("\n".join(layers) + "\n")
    net = Net(str(proto), TEST)
    rng = np.random.default_rng(1)
    for name, p in net.params.items():
        if name.endswith("_bn"):
            p[0].data[...] = rng.normal(0, 0.1, p[0].data.shape)
            p[1].data[...] = rng.uniform(0.5, 1.5, p[1].data.shape)
            p[2].data[...] = 1
        elif name.endswith("_sc"):
            p[0].data[...] = rng.uniform(0.5, 1.5, p[0].data.shape)
            p[1].data[...] = rng.normal(0, 0.1, p[1].data.shape)
    weights = tmp_path / "bn_chain.caffemodel"
    net.save(str(weights))
    return proto, weights


def test_error_added_of_a_folded_chain_starts_from_the_chains_compared_input(tmp_path):
    """The blob compared for a Convolution + BatchNorm + Scale chain is the Scale's; its input (the BatchNorm's
    output) exists only in the float model. The error the chain adds is measured from the chain's compared input,
    so along a linear net the errors added sum to the output's 1 - cosine; each used to count from a perfect
    input, which ranked the deepest layers first with every error before them."""
    proto, weights = _bn_chain_net(tmp_path)
    rng = np.random.default_rng(2)
    feeds = [{"data": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(2)]
    paths = calibrate(str(proto), str(weights), feeds, str(tmp_path / "q/bn"), 2, progress=False)
    result = compare_model(str(proto), str(weights), paths["fake_quant_model"], paths["fake_quant_weights"], feeds,
                           tmp_path / "report", batch_num=0, progress=False)
    blobs = {r["name"]: r for r in json.loads(Path(result["json"]).read_text())["blobs"]}
    # the chains' Scale outputs and the ReLUs' in-place outputs, in net order: a linear chain of compared blobs
    assert list(blobs) == ["c1_sc", "c1", "c2_sc", "c2", "c3_sc", "c3"] and blobs["c3"]["output"]
    assert [blobs[n]["quant_layer"] for n in ("c1_sc", "c2_sc", "c3_sc")] == ["c1", "c2", "c3"]
    assert sum(r["error_added"] for r in blobs.values()) == pytest.approx(1 - blobs["c3"]["cosine"], abs=1e-12)
    for chain, before in (("c2_sc", "c1"), ("c3_sc", "c2")):
        assert blobs[chain]["error_added"] == pytest.approx(
            (1 - blobs[chain]["cosine"]) - (1 - blobs[before]["cosine"]), abs=1e-12)


@pytest.mark.parametrize(("feed", "time_major", "samples"), [
    ({"data": np.zeros((8, 3, 4, 4)), "im_info": np.zeros((1, 3))}, (), 8),   # one row per batch
    ({"im_info": np.zeros((1, 3)), "data": np.zeros((8, 3, 4, 4))}, (), 8),   # in any order
    ({"data": np.zeros((1, 3, 4, 4)), "rois": np.zeros((128, 5))}, (), 1),    # regions of one image
    ({"data": np.zeros((1, 6, 5, 8)), "mask": np.zeros((6, 5, 8))}, (), 1),   # a constant broadcast over N
    ({"seq": np.zeros((5, 3, 7)), "cont": np.zeros((5, 3))}, ("seq", "cont"), 3),  # time-major: axis 1
    # an LSTM's (T, N, ...) data through a Python layer, which hides that it is time-major: the cont input tells
    ({"data": np.zeros((2, 4, 2, 8)), "cont": np.zeros((2, 4))}, ("cont",), 4),
    ({"x": np.zeros((4, 2)), "y": np.zeros((4, 2))}, (), 4),
])
def test_the_samples_of_a_batch_are_those_of_its_input_with_the_most_axes(feed, time_major, samples):
    from amct_caffe.api.compare import batch_samples
    assert batch_samples(feed, frozenset(time_major)) == samples


def test_blobs_after_a_python_layer_are_compared_beside_a_constant_input(tmp_path):
    """A (C, H, W) input added to the batch by a Bias counted as 6 samples per batch of 1 (the largest first
    axis), so every blob after a Python layer, which must hold one row per sample, went uncompared."""
    model, weights = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    model.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 dim: 5 dim: 8 } } }\n'
        'layer { name: "py" type: "Python" bottom: "data" top: "b1" '
        'python_param { module: "tests.differential.netgen_python" layer: "PyReLU" } }\n'
        'layer { name: "mask" type: "Input" top: "mask" input_param { shape { dim: 6 dim: 5 dim: 8 } } }\n'
        'layer { name: "bias" type: "Bias" bottom: "b1" bottom: "mask" top: "b2" bias_param { axis: -3 } }\n'
        'layer { name: "conv" type: "Convolution" bottom: "b2" top: "b3" convolution_param { num_output: 4 '
        'kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }\n')
    Net(str(model), TEST, seed=3).save(str(weights))
    rng = np.random.default_rng(0)
    batches = [{"data": rng.normal(size=(1, 6, 5, 8)).astype(np.float32),
                "mask": rng.normal(size=(6, 5, 8)).astype(np.float32)} for _ in range(2)]
    calibrate(str(model), str(weights), batches, str(tmp_path / "q" / "m"), 2, progress=False)
    _, summary, _ = compare_batches(str(model), str(weights), str(tmp_path / "q" / "m_fake_quant_model.prototxt"),
                                    str(tmp_path / "q" / "m_fake_quant_weights.caffemodel"), batches)
    assert summary["samples"] == 2
    compared = {entry["blob"]: entry["cosine"] for entry in summary["most_sensitive_layers"]}
    assert summary["blobs_compared"] == 3 and set(compared) == {"b1", "b2", "b3"} and compared["b3"] > 0.99


def test_a_quantized_model_of_another_network_is_named(tmp_path):
    """Both models have a 'conv1': the shape error did not say which file it came from."""
    det1 = MODELS / "mtcnn"
    rng = np.random.default_rng(0)
    calibrate(str(det1 / "det1.prototxt"), str(det1 / "det1.caffemodel"),
              [{"data": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)}], str(tmp_path / "q" / "det1"), 1,
              progress=False)
    lenet = MODELS / "lenet_mnist"
    quant = tmp_path / "q" / "det1_fake_quant_model.prototxt"
    with pytest.raises(GraphError, match=rf"{quant}: layer 'conv1' \(Convolution\): weight shape .*; give the "
                                         rf"quantized model made from {lenet / 'lenet.prototxt'}"):
        compare_batches(str(lenet / "lenet.prototxt"), str(lenet / "lenet_iter_10000.caffemodel"), str(quant),
                        str(tmp_path / "q" / "det1_fake_quant_weights.caffemodel"),
                        [{"data": rng.random((2, 1, 28, 28)).astype(np.float32)}])
