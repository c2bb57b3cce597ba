"""label_free_retrain on the bundled LeNet and MNIST sample, the digits used without their labels.

The first 256 digits train (4 batches of 64), the last 192 are unseen. The training loss must
fall, and the saved fake-quant model must be closer to the FP32 model than PTQ's (the mean
cosine of the outputs, on the training digits and on the unseen ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe.api.compare import cosine_rows
from amct_caffe.api.label_free import CLIP_LR, DEFAULT_EPOCHS, MIN_ITERATIONS, WEIGHT_LR
from amct_caffe.api.workflow import calibrate
from amct_caffe.errors import AmctError
from amct_caffe.runtime import TEST, Net

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "mnist"
MODEL, WEIGHTS = SAMPLE / "lenet.prototxt", SAMPLE / "lenet_iter_10000.caffemodel"


def _batches(images: np.ndarray) -> list[dict[str, np.ndarray]]:
    x = images.astype(np.float32)[:, None] * np.float32(0.00390625)
    return [{"data": x[i:i + 64]} for i in range(0, len(x) - 63, 64)]


@pytest.fixture(scope="module")
def digits():
    with np.load(SAMPLE / "mnist_500.npz") as f:
        images = f[f.files[0]] if "images" not in f.files else f["images"]
    return _batches(images[:256]), _batches(images[-192:])


def _cosine(model, weights, batches) -> float:
    fp, q = Net(str(MODEL), str(WEIGHTS), TEST), Net(str(model), str(weights), TEST)
    cos = [cosine_rows(np.asarray(fp.forward(**b)["prob"]).reshape(64, -1),
                       np.asarray(q.forward(**b)["prob"]).reshape(64, -1)) for b in batches]
    return float(np.concatenate(cos).mean())


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    train, _ = digits
    work = tmp_path_factory.mktemp("lfqat")
    ptq = calibrate(str(MODEL), str(WEIGHTS), train, str(work / "ptq" / "lenet"), len(train), progress=False)
    qat = amct.label_free_retrain(str(MODEL), str(WEIGHTS), train, str(work / "qat" / "lenet"), iterations=80,
                                  progress=False)
    return ptq, qat


def test_writes_the_files_calibrate_writes(runs):
    ptq, qat = runs
    assert sorted(qat.outputs) == sorted(ptq)
    for path in qat.outputs.values():
        assert Path(path).is_file(), path
    assert "lenet_" in Path(qat.outputs["deploy_model"]).name


def test_the_loss_falls(runs, digits, tmp_path):
    _, qat = runs
    assert len(qat.losses) == qat.iterations == 80 and qat.batch_size == 64 and qat.samples == 256
    assert all(np.isfinite(qat.losses))
    # LeNet's INT8 outputs sit within 1e-6 of FP32 already: there the per-sample loss (the default) does not
    # fall in 80 iterations and the rounded start is kept; the loss over the data does fall
    assert qat.kept == "rounded" or qat.data_loss_after < qat.data_loss_before
    over_data = amct.label_free_retrain(str(MODEL), str(WEIGHTS), digits[0], str(tmp_path / "q"), iterations=80,
                                        per_sample_loss=False, progress=False)
    assert over_data.loss_end < 0.7 * over_data.loss_start, (over_data.loss_start, over_data.loss_end)


@pytest.mark.parametrize("split", ["training", "unseen"])
def test_closer_to_fp32_than_ptq(runs, digits, split):
    ptq, qat = runs
    batches = digits[0] if split == "training" else digits[1]
    before = _cosine(ptq["fake_quant_model"], ptq["fake_quant_weights"], batches)
    after = _cosine(qat.outputs["fake_quant_model"], qat.outputs["fake_quant_weights"], batches)
    assert 1 - after < 1 - before, (before, after)
    deploy = _cosine(qat.outputs["deploy_model"], qat.outputs["deploy_weights"], batches)
    assert deploy > before - 1e-4, (before, deploy)


def test_the_clis_help_defaults_are_the_apis():
    from amct_caffe.cli import retrain

    assert (retrain.CLIP_LR, retrain.WEIGHT_LR, retrain.DEFAULT_EPOCHS, retrain.MIN_ITERATIONS) == (
        CLIP_LR, WEIGHT_LR, DEFAULT_EPOCHS, MIN_ITERATIONS)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
    ({"iterations": "10"}, "iterations must be an integer >= 1, got '10'"),
    ({"batch_size": -1}, "batch_size must be an integer >= 0, got -1"),
    ({"batch_size": 1.5}, "batch_size must be an integer >= 0, got 1.5"),
    ({"seed": "a"}, "seed must be an integer >= 0, got 'a'"),
    ({"clip_lr": "0.1"}, "clip_lr must be a finite number >= 0, got '0.1'"),
    ({"clip_lr": -1.0}, "clip_lr must be a finite number >= 0"),
    ({"weight_lr": float("nan")}, "weight_lr must be a finite number >= 0"),
    ({"iterations": 10**20}, "iterations must be at most 2147483647 (a solver's max_iter), got 1000"),
    ({"batch_size": 1000}, "batch size 1000 is larger than the 256 sample(s)"),
])
def test_bad_arguments(digits, tmp_path, kwargs, message):
    with pytest.raises(AmctError, match=message.replace("(", r"\(").replace(")", r"\)")):
        amct.label_free_retrain(str(MODEL), str(WEIGHTS), digits[0], str(tmp_path / "q"), progress=False, **kwargs)


def test_no_data(tmp_path):
    with pytest.raises(AmctError, match="needs data"):
        amct.label_free_retrain(str(MODEL), str(WEIGHTS), [], str(tmp_path / "q"), progress=False)


def test_a_data_file_of_less_than_one_batch_is_refused(tmp_path):
    """A path of 8 samples for LeNet's batch of 64 gave an empty list of batches, and an IndexError."""
    data = tmp_path / "in" / "x.npy"
    data.parent.mkdir()
    np.save(data, np.zeros((8, 1, 28, 28), np.float32))
    with pytest.raises(AmctError, match=r"label_free_retrain data: array file .*x.npy holds 8 sample\(s\), fewer "
                                        "than one batch of 64"):
        amct.label_free_retrain(str(MODEL), str(WEIGHTS), str(data), str(tmp_path / "out" / "q"), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AmctError, match=r"x.npy holds 8 sample\(s\)"):
        amct.compare_model(str(MODEL), str(WEIGHTS), str(MODEL), str(WEIGHTS), str(data), str(tmp_path / "report"))


@pytest.mark.parametrize(("data", "message"), [
    ([{"data": np.zeros((0, 1, 28, 28), np.float32)}], "batch 0: input 'data' holds no sample (shape [0, 1, 28, 28])"),
    ([{"data": np.zeros((4, 1, 28, 28))}, "x"], "batch 1 is str, not a {input blob: array} mapping"),
    ([{}], "batch 0 is dict (empty), not a {input blob: array} mapping"),
    ("/nonexistent/images", "/nonexistent/images"),
])
def test_bad_data(tmp_path, data, message):
    with pytest.raises(AmctError) as err:
        amct.label_free_retrain(str(MODEL), str(WEIGHTS), data, str(tmp_path / "q"), progress=False)
    assert message in str(err.value)
    assert not list(tmp_path.iterdir())


def test_one_batch_may_be_given_as_a_mapping(digits, tmp_path):
    # numpy scalars count as numbers, as a script that computes its rates gets them
    result = amct.label_free_retrain(str(MODEL), str(WEIGHTS), digits[0][0], str(tmp_path / "q"),
                                     iterations=np.int64(2), clip_lr=np.float32(0.005), weight_lr=np.float64(0),
                                     progress=False)
    assert result.samples == 64 and result.iterations == 2


def test_outputs_never_overwrite_inputs(digits, tmp_path):
    """An output prefix that would write over the model is refused before any work."""
    model = tmp_path / "m_fake_quant_model.prototxt"
    model.write_text(MODEL.read_text())
    with pytest.raises(AmctError):
        amct.label_free_retrain(str(model), str(WEIGHTS), digits[0], str(tmp_path / "m"), progress=False)


def test_training_that_does_not_help_keeps_the_ptq_factors(digits, tmp_path, caplog):
    """A step size far too large makes training worse: without the learned rounding the PTQ model
    is then saved, byte for byte what calibrate writes, with a warning."""
    train, _ = digits
    ptq = calibrate(str(MODEL), str(WEIGHTS), train, str(tmp_path / "ptq" / "lenet"), len(train), progress=False)
    qat = amct.label_free_retrain(str(MODEL), str(WEIGHTS), train, str(tmp_path / "qat" / "lenet"), iterations=20,
                                  clip_lr=5.0, weight_lr=500.0, rounding=False, progress=False)
    assert not qat.kept_trained and qat.kept == "ptq" and qat.data_loss_after >= qat.data_loss_before
    assert "the trained model is not kept" in caplog.text
    for kind in ("fake_quant_weights", "deploy_weights", "quant_param_record_txt"):
        if kind in ptq:
            assert Path(qat.outputs[kind]).read_bytes() == Path(ptq[kind]).read_bytes(), kind


def test_keeps_the_model_of_least_data_loss(runs):
    """Of PTQ, the rounded start and the trained model, the saved one has the lowest loss over the data."""
    _, qat = runs
    losses = {"ptq": qat.data_loss_ptq, "rounded": qat.data_loss_before, "trained": qat.data_loss_after}
    assert losses[qat.kept] == min(losses.values())
    assert qat.kept_trained == (qat.kept == "trained")


def test_a_trained_model_worse_than_ptq_is_not_kept(digits, tmp_path, monkeypatch):
    """A rounding that raised the loss (here made bad on purpose), then a training that lowers it, but not to
    PTQ's: the PTQ model is saved, whatever training gained over the rounded start (the trained one was)."""
    from amct_caffe.api import label_free

    real = label_free.round_weights

    def bad_rounding(graph, *args, **kwargs):
        done = real(graph, *args, **kwargs)
        for node in graph.nodes:  # the biases shifted: a rounding that hurts
            if node.type == "Convolution" and len(node.params) > 1:
                node.params[1] = (node.params[1] + 0.05).astype(node.params[1].dtype)
        return done

    monkeypatch.setattr(label_free, "round_weights", bad_rounding)
    qat = amct.label_free_retrain(str(MODEL), str(WEIGHTS), digits[0], str(tmp_path / "q"), iterations=10,
                                  progress=False)
    assert qat.data_loss_ptq < qat.data_loss_after < qat.data_loss_before  # training helped, not enough
    assert qat.kept == "ptq" and not qat.kept_trained


def test_training_that_does_not_help_keeps_the_rounded_start(digits, tmp_path):
    """With the learned rounding (the default), a failed training keeps the rounded start, which
    lowered the data loss below PTQ's and is closer to FP32 than PTQ on the training digits."""
    train, _ = digits
    ptq = calibrate(str(MODEL), str(WEIGHTS), train, str(tmp_path / "ptq" / "lenet"), len(train), progress=False)
    qat = amct.label_free_retrain(str(MODEL), str(WEIGHTS), train, str(tmp_path / "qat" / "lenet"), iterations=20,
                                  clip_lr=5.0, weight_lr=500.0, progress=False)
    assert qat.kept == "rounded" and qat.data_loss_before < qat.data_loss_ptq
    assert _cosine(qat.outputs["fake_quant_model"], qat.outputs["fake_quant_weights"], train) > _cosine(
        ptq["fake_quant_model"], ptq["fake_quant_weights"], train)


def test_after_the_rounding_only_the_clips_train_by_default(digits, tmp_path):
    """The default weight rate after the learned rounding is 0: the saved weight codes and scales are
    the rounded start's (training with every rate 0), and only the activation clips train."""
    from amct_caffe.io.record import read_record

    train, _ = digits
    saved, results = {}, {}
    for name, kwargs in (("default", {}), ("frozen", {"weight_lr": 0.0, "clip_lr": 0.0})):
        qat = results[name] = amct.label_free_retrain(str(MODEL), str(WEIGHTS), train, str(tmp_path / name / "q"),
                                                      iterations=20, per_sample_loss=False, progress=False, **kwargs)
        net = Net(qat.outputs["fake_quant_model"], qat.outputs["fake_quant_weights"], TEST)
        saved[name] = ({k: np.array(net.params[k][0].data) for k in ("conv1", "conv2", "ip1", "ip2")},
                       read_record(qat.outputs["quant_param_record_txt"]))
    (codes, record), (frozen_codes, frozen_record) = saved["default"], saved["frozen"]
    for layer in codes:  # whichever model the loss over the data keeps, trained or rounded
        np.testing.assert_array_equal(codes[layer], frozen_codes[layer], err_msg=layer)
        assert list(record.layer(layer).scale_w) == list(frozen_record.layer(layer).scale_w)
    # with every rate 0 nothing moves; by default the clips do (the weights cannot: the codes above), which
    # moves the loss over the data one way or the other (which way depends on the BLAS's roundings)
    frozen, default = results["frozen"], results["default"]
    assert frozen.data_loss_after == frozen.data_loss_before
    assert default.data_loss_after != default.data_loss_before
    moved = any(record.layer(k).activation(0).scale_d != frozen_record.layer(k).activation(0).scale_d for k in codes)
    assert moved == (default.kept == "trained")


def test_rounding_lowers_the_data_loss(runs):
    _, qat = runs
    assert qat.data_loss_before < 0.95 * qat.data_loss_ptq


def test_the_saved_models_keep_the_models_param_specs(runs):
    """The training's learning rates (lr_mult 0 on the frozen layers, tiny ones on the trained blobs)
    stay in the training net: the fake-quant and deploy models carry LeNet's own lr_mult 1 / 2, as
    calibrate's do, so that the user can fine-tune them."""
    from amct_caffe import io

    ptq, qat = runs
    assert qat.kept != "ptq"  # else the files are calibrate's by construction

    def specs(model):
        return {lp.name: [(p.lr_mult, p.decay_mult) for p in lp.param] for lp in io.load_prototxt(model).layer}

    for kind in ("fake_quant_model", "deploy_model"):
        got, want = specs(qat.outputs[kind]), specs(ptq[kind])
        assert got == want, kind
        assert want["conv1"] == [(1.0, 1.0), (2.0, 1.0)]


def test_quantizes_the_layers_ptq_quantizes(runs):
    """The data-only layers (LeNet's pooling) get their Quant / AntiQuant pairs and record entries
    as in calibrate's models, at PTQ's factors."""
    ptq, qat = runs
    from amct_caffe.io.record import read_record

    def quant_layers(model):
        text = Path(model).read_text()
        return sorted(line.split('"')[1] for line in text.splitlines() if line.strip().startswith("name:")
                      and ("_quant" in line or "_antiquant" in line or "_dequant" in line))

    assert quant_layers(qat.outputs["deploy_model"]) == quant_layers(ptq["deploy_model"])
    assert any("pool" in name for name in quant_layers(ptq["deploy_model"]))
    before, after = read_record(ptq["quant_param_record_txt"]), read_record(qat.outputs["quant_param_record_txt"])
    assert list(after.layers) == list(before.layers)
    for name in ("pool1", "pool2"):
        assert after.layer(name).activation(0).scale_d == before.layer(name).activation(0).scale_d


def test_training_computes_the_deploy_function(tmp_path):
    """A BatchNorm no convolution absorbs, a Dropout and a TEST-only layer: the training net must compute
    what the deploy model computes (BatchNorm on its stored statistics, no dropout, every layer kept), so
    the PTQ data loss it reports is the one of the saved PTQ model, and the saved BatchNorm blobs are the
    model's own (no moving-average updates)."""
    from amct_caffe.api.outputs import write_graph
    from amct_caffe.io import load_weights
    from tests.passes.helpers import model

    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" include { phase: TEST } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" }
layer { name: "bn" type: "BatchNorm" bottom: "sum" top: "bn" }
layer { name: "drop" type: "Dropout" bottom: "bn" top: "bn" dropout_param { dropout_ratio: 0.5 } }
layer { name: "conv3" type: "Convolution" bottom: "bn" top: "out"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
"""
    graph, _ = model(text, seed=2)
    files = str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel")
    write_graph(graph, *files)
    rng = np.random.default_rng(0)
    batches = [{"data": rng.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    ptq = calibrate(*files, batches, str(tmp_path / "ptq" / "q"), len(batches), progress=False)
    result = amct.label_free_retrain(*files, batches, str(tmp_path / "qat" / "q"), iterations=20, progress=False)
    fp, q = Net(*files, TEST), Net(ptq["fake_quant_model"], ptq["fake_quant_weights"], TEST)
    t = np.concatenate([np.array(fp.forward(**b)["out"]).reshape(4, -1) for b in batches]).astype(np.float64)
    y = np.concatenate([np.array(q.forward(**b)["out"]).reshape(4, -1) for b in batches]).astype(np.float64)
    energy = np.sum(t * t, axis=1)
    want = np.mean(np.sum((y - t) ** 2, axis=1) / energy)
    assert result.data_loss_ptq == pytest.approx(want, rel=2e-2)  # the same grid, up to ULQ's float32 clips
    saved = load_weights(result.outputs["fake_quant_weights"])
    for a, b in zip(saved["bn"], graph.node("bn").params, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_training_that_diverges_keeps_the_start_with_a_warning(digits, tmp_path, caplog):
    """A rate far too large drives a clip range non-finite, which the retrain layers refuse: the run keeps the
    model training started from instead of failing after the calibration and the rounding."""
    with caplog.at_level("WARNING", logger="amct_caffe"):
        result = amct.label_free_retrain(str(MODEL), str(WEIGHTS), digits[0], str(tmp_path / "q"), iterations=5,
                                         clip_lr=1e308, progress=False)
    assert result.kept in ("ptq", "rounded") and "label-free QAT diverged at iteration" in caplog.text
    assert (tmp_path / "q_fake_quant_model.prototxt").is_file()


DEPTHWISE = '''name: "dw"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 12 dim: 12 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8 kernel_size: 3 pad: 1
  weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "dw" type: "Convolution" bottom: "c1" top: "dw" convolution_param { num_output: 8 group: 8 kernel_size: 3
  pad: 1 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "r2" type: "ReLU" bottom: "dw" top: "dw" }
layer { name: "fc" type: "InnerProduct" bottom: "dw" top: "fc" inner_product_param { num_output: 6
  weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 0.1 } } }
'''


def _distillation_loss(prefix, reference, batches) -> float:
    """label_free_retrain's per-sample loss (module doc, step 3), recomputed from saved files."""
    quantized = Net(f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel", TEST)
    t = np.concatenate([reference.forward(**b)["fc"].astype(np.float64) for b in batches])
    y = np.concatenate([quantized.forward(**b)["fc"].astype(np.float64) for b in batches])
    energy = (t ** 2).sum(1)
    return float((((y - t) ** 2).sum(1) / np.maximum(energy, 0.01 * energy.mean())).mean())


def test_never_worse_than_calibrates_ptq_when_equalization_does_not_help(tmp_path):
    """A depthwise model whose equalized PTQ is further from FP32 than its own: the model's own PTQ is the start
    (label-free QAT used to compare its result with the equalized PTQ only, and saved a model worse than
    calibrate's). With 36 samples in batches of 8 the loss counts the last 4 too."""
    (tmp_path / "dw.prototxt").write_text(DEPTHWISE)
    net = Net(str(tmp_path / "dw.prototxt"), TEST, seed=3)
    rng = np.random.default_rng(3)
    net.params["c1"][0].data[...] *= rng.uniform(0.02, 3, size=(8, 1, 1, 1)).astype(np.float32)
    net.save(str(tmp_path / "dw.caffemodel"))
    x = rng.standard_normal((36, 3, 12, 12)).astype(np.float32)
    feeds = [{"data": x[i:i + 4]} for i in range(0, 36, 4)]
    model, weights = str(tmp_path / "dw.prototxt"), str(tmp_path / "dw.caffemodel")
    result = amct.label_free_retrain(model, weights, feeds, str(tmp_path / "qat"), batch_size=8, progress=False)
    calibrate(model, weights, feeds, str(tmp_path / "ptq"), len(feeds), progress=False)
    reference = Net(model, weights, TEST)
    ptq = _distillation_loss(tmp_path / "ptq", reference, feeds)
    assert result.data_loss_ptq == pytest.approx(ptq, rel=1e-5)  # calibrate's PTQ, over all 36 samples
    assert _distillation_loss(tmp_path / "qat", reference, feeds) <= ptq * (1 + 1e-6)


def test_a_model_with_nothing_to_retrain_is_refused_before_any_work(tmp_path):
    from amct_caffe.runtime import TEST, Net
    model, weights = tmp_path / "m.prototxt", tmp_path / "m.caffemodel"
    model.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 '
                     'dim: 4 } } }\nlayer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
                     'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')
    Net(str(model), TEST).save(str(weights))
    data = [{"data": np.ones((1, 3, 4, 4), np.float32)}]
    with pytest.raises(AmctError, match=f"{model}: no layer to retrain"):
        amct.label_free_retrain(str(model), str(weights), data, str(tmp_path / "out" / "q"), progress=False)
    assert not (tmp_path / "out").exists()
