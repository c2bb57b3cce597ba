"""PTQ on small models built in the tests: naming, multi-reader blobs, inputs that must stay float."""

from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import AmctError, io
from amct_caffe.io import record
from amct_caffe.runtime import TEST, Net
from tests.api.flow import calibration_model
from tests.golden import MODELS

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'


def conv(name, bottom, top, n=4, extra=""):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" {extra}'
            f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.3 }}'
            ' bias_filler { type: "constant" value: 0.1 } } }\n')


def make_model(tmp_path, text, seed=0):
    proto = tmp_path / "model.prototxt"
    proto.write_text(text)
    weights = tmp_path / "model.caffemodel"
    Net(str(proto), TEST, seed=seed).save(str(weights))
    return proto, weights


def quantize(tmp_path, proto, weights, batches, edit_config=None):
    graph, mm, mw = calibration_model(tmp_path, proto, weights, len(batches), edit_config)
    net = Net(mm, mw, TEST)
    for b in batches:
        net.forward(data=b)
    paths = amct.save_model(graph, "Both", str(tmp_path / "out/model"))
    return graph, paths


def batches(n=2, shape=(2, 3, 8, 8), seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for _ in range(n)]


def test_in_place_last_layer_keeps_the_output_name_and_meaning(tmp_path):
    text = INPUT + conv("c1", "data", "c2") + 'layer { name: "sig" type: "Sigmoid" bottom: "c2" top: "c2" }\n'
    proto, weights = make_model(tmp_path, text)
    _, paths = quantize(tmp_path, proto, weights, batches())
    x = batches(1, seed=5)[0]
    ref = Net(str(proto), str(weights), TEST).forward(data=x)
    for kind in ("fake_quant", "deploy"):
        out = Net(paths[f"{kind}_model"], paths[f"{kind}_weights"], TEST).forward(data=x)
        assert list(out) == ["c2"] == list(ref)
        np.testing.assert_allclose(out["c2"], ref["c2"], atol=0.05)  # sigmoid outputs, quantized
        assert out["c2"].min() >= 0 and out["c2"].max() <= 1


def test_readers_of_one_blob_with_different_settings_get_their_own_calibration(tmp_path):
    text = INPUT + conv("a", "data", "a") + conv("b", "data", "b")
    proto, weights = make_model(tmp_path, text)

    def sixteen_bits_for_b(c):
        c["b"]["activation_quant_params"]["num_bits"] = 16
        c["b"]["activation_quant_params"]["with_offset"] = False

    quantize(tmp_path, proto, weights, batches(), sixteen_bits_for_b)
    rec = record.read_record(tmp_path / "record.txt")
    a = record.activation_entry(record.layer_entry(rec, "a"), 0)
    b = record.activation_entry(record.layer_entry(rec, "b"), 0)
    assert (a.num_bits_d, b.num_bits_d) == (8, 16)
    assert b.offset_d == 0 and a.offset_d != 0


def test_roi_boxes_are_never_quantized(tmp_path):
    text = (INPUT + 'layer { name: "rois" type: "Input" top: "rois" input_param { shape { dim: 2 dim: 5 } } }\n'
            + conv("c1", "data", "c1")
            + 'layer { name: "roi" type: "ROIPooling" bottom: "c1" bottom: "rois" top: "roi" '
              'roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 } }\n')
    proto, weights = make_model(tmp_path, text)
    rois = np.array([[0, 0, 0, 5, 5], [1, 2, 1, 7, 6]], np.float32)
    graph, mm, mw = calibration_model(tmp_path, proto, weights)
    assert [t.inputs for t in graph.targets if t.name == "roi"] == [(0,)]
    Net(mm, mw, TEST).forward(data=batches(1)[0], rois=rois)
    paths = amct.save_model(graph, "Fakequant", str(tmp_path / "out/model"))
    fq = io.read_prototxt(paths["fake_quant_model"])
    quants = [lp for lp in fq.layer if lp.type == "Quant"]
    assert all(lp.bottom[0] != "rois" for lp in quants)


def test_weighted_layer_with_two_inputs_is_refused(tmp_path):
    second = INPUT.replace('"data"', '"d2"')
    text = (INPUT + second
            + 'layer { name: "c" type: "Convolution" bottom: "data" bottom: "d2" top: "y1" top: "y2" '
              'convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }\n')
    proto, weights = make_model(tmp_path, text)
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(proto), str(weights))
    graph = amct.init(str(config), str(proto), str(weights), str(tmp_path / "record.txt"))
    with pytest.raises(AmctError, match="layer 'c' .*2 inputs"):
        amct.weights_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))


def test_convert_reproduces_save_when_an_unfused_layer_is_not_quantized(tmp_path):
    bn = ('layer { name: "bn" type: "BatchNorm" bottom: "c1" top: "c1" }\n'
          'layer { name: "sc" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }\n')
    text = INPUT + conv("c1", "data", "c1") + bn + conv("c2", "c1", "c2")
    proto, weights = make_model(tmp_path, text)
    net = Net(str(proto), str(weights), TEST)
    net.params["bn"][1].data[...] = 1.5  # a non-trivial variance, factor 1
    net.params["bn"][2].data[...] = 1.0
    net.save(str(weights))

    def keep_c1_unfused_and_float(c):
        c["skip_fusion_layers"] = ["c1"]
        c["c1"]["quant_enable"] = False

    _, paths = quantize(tmp_path, proto, weights, batches(), keep_c1_unfused_and_float)
    again = tmp_path / "again"
    amct.convert_model(str(proto), str(weights), str(tmp_path / "record.txt"), str(again / "model"))
    for kind, path in paths.items():
        name = path.rsplit("/", 1)[1]
        assert (again / name).read_bytes() == Path(path).read_bytes(), kind


def test_failed_save_leaves_no_new_files(tmp_path):
    text = INPUT + conv("c1", "data", "c1")
    proto, weights = make_model(tmp_path, text)
    graph, mm, mw = calibration_model(tmp_path, proto, weights)
    Net(mm, mw, TEST).forward(data=batches(1)[0])
    out = tmp_path / "out"
    (out / "model_quant.json").mkdir(parents=True)  # a directory where a file must go
    with pytest.raises(AmctError, match="model_quant.json"):
        amct.save_model(graph, "Both", str(out / "model"))
    assert sorted(p.name for p in out.iterdir()) == ["model_quant.json"]


def test_staged_outputs_roll_back_when_a_rename_fails(tmp_path, monkeypatch):
    import os

    from amct_caffe.io.outputs import StagedOutputs

    (tmp_path / "a.txt").write_text("old a")
    out = StagedOutputs()
    out.add_text(tmp_path / "a.txt", "new a")
    out.add_text(tmp_path / "b.txt", "new b")
    out.add_text(tmp_path / "c.txt", "new c")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("c.txt"):
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(AmctError, match="c.txt"):
        out.commit()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old a"


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_integer_simulation_is_exact_with_wide_activations(tmp_path, bits):
    """The deploy model's INT8 layers accumulate exactly, whatever the activation width.

    With 12/16-bit activation codes the int32 accumulators pass 2**24, beyond float32's exact
    integers. Reference: the integer computation from the deploy model's own integers, in Python
    ints via float64 (exact below 2**53): acc = sum(q_x * q_w) + bias_int32, y = acc * deq_scale.
    """
    from amct_caffe.quant.fake_quant import unpack_deq_scale
    from amct_caffe.runtime.layers.integer_ops import conv2d_exact

    text = INPUT + conv("c1", "data", "c1", n=32) + conv("c2", "c1", "c2", n=8)
    proto, weights = make_model(tmp_path, text)

    def wide(c):
        for name in ("c1", "c2"):
            c[name]["activation_quant_params"]["num_bits"] = bits

    data = [b * 50 for b in batches()]
    _, paths = quantize(tmp_path, proto, weights, data, wide)
    dep = Net(paths["deploy_model"], paths["deploy_weights"], TEST)
    dep.forward(data=data[0])
    raw = io.load_weights(paths["deploy_weights"])
    biggest = 0.0
    for layer in ("c1", "c2"):
        q_x = dep.blobs[dep.top_names[f"{layer}_quant"][0]].data
        assert np.array_equal(q_x, np.round(q_x)) and np.abs(q_x).max() < 2 ** bits
        w, b = raw[layer]
        acc = conv2d_exact(q_x, w, b, (1, 1), (1, 1), (1, 1), 1)
        biggest = max(biggest, float(np.abs(acc).max()))
        deq, _ = unpack_deq_scale(raw[f"{layer}_dequant"][0])
        ref = (acc * deq.astype(np.float64)[None, :, None, None]).astype(np.float32)
        out = dep.top_names[f"{layer}_dequant"][0]
        np.testing.assert_array_equal(dep.blobs[out].data, ref)
    if bits == 16:
        assert biggest > 2 ** 24  # the case float32 accumulation would get wrong


def test_the_calibration_net_runs_the_fast_kernels_and_keeps_the_exact_nets_record(tmp_path):
    """A calibration net (streaming IFMR) runs FAST's kernels on its convolutions (runtime/fold.py, CALIBRATION):
    its record is the one a net of Caffe's arithmetic writes, within float noise, and its offsets are equal."""
    bn = ('layer {{ name: "{0}_bn" type: "BatchNorm" bottom: "{0}" top: "{0}" }}\n'
          'layer {{ name: "{0}_scale" type: "Scale" bottom: "{0}" top: "{0}" scale_param {{ bias_term: true }} }}\n'
          'layer {{ name: "{0}_relu" type: "ReLU" bottom: "{0}" top: "{0}" }}\n')
    text = (INPUT.replace("dim: 3 dim: 8 dim: 8", "dim: 6 dim: 20 dim: 20") + conv("c1", "data", "c1", 16)
            + bn.format("c1") + conv("c2", "c1", "c2", 16) + bn.format("c2")
            + 'layer { name: "p" type: "Convolution" bottom: "c2" top: "p" convolution_param { num_output: 8 '
              'kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }\n'
            + 'layer { name: "sum" type: "Eltwise" bottom: "p" bottom: "p" top: "sum" }\n')
    proto, weights = make_model(tmp_path, text)
    xs = batches(2, (2, 6, 20, 20))
    records = {}
    for fold in ("exact", "auto"):
        folder = tmp_path / fold
        folder.mkdir()
        _, mm, mw = calibration_model(folder, proto, weights, len(xs))
        net = Net(mm, mw, TEST, fold=fold)
        assert {c.mode.value for c in net._chains.values()} == {"exact" if fold == "exact" else "calibration"}
        for x in xs:
            blobs = {k: v.copy() for k, v in net.forward(data=x, blobs=["c2", "p"]).items()}
        records[fold] = (record.read_record(str(folder / "record.txt")), blobs)
    (exact, exact_blobs), (fast, fast_blobs) = records["exact"], records["auto"]
    assert not np.array_equal(fast_blobs["c2"], exact_blobs["c2"])  # Winograd ran on c2
    assert exact.layers.keys() == fast.layers.keys() == {"c1", "c2", "p", "sum"}
    for name, want in exact.layers.items():
        got = fast.layers[name]
        assert list(got.scale_w) == list(want.scale_w), name
        for a, b in zip(got.record_d, want.record_d, strict=True):
            assert a.offset_d == b.offset_d and abs(a.scale_d - b.scale_d) <= 1e-5 * b.scale_d, name


def test_a_pruned_channel_whose_deploy_bias_is_rounded_coarsely_is_named(tmp_path, caplog):
    """All-zero weights get scale_w 1 (ARQ's rule for a zero range), so the deploy model's int32 bias of that
    channel has the input's step, scale_d: a bias of 1.5 steps reads 2 there, and save_model names the channel;
    one of half a step (below the noise of the other channels) is not named."""
    proto, weights = make_model(tmp_path, INPUT + conv("c1", "data", "c1", 4) + conv("c2", "c1", "c2", 4))
    net = Net(str(proto), str(weights), TEST)
    net.params["c1"][0].data[2] = 0
    scale_d = None
    for steps, warned in ((0.0, False), (1.5, True), (0.5, False)):  # (c1's input step does not depend on its bias)
        net.params["c1"][1].data[2] = steps * (scale_d or 0.0)
        net.save(str(weights))
        caplog.clear()
        with caplog.at_level("WARNING", logger="amct_caffe"):
            _, paths = quantize(tmp_path, proto, weights, batches())
        scale_d = record.read_record(paths["quant_param_record_txt"]).layers["c1"].record_d[0].scale_d
        messages = [r.getMessage() for r in caplog.records if "all-zero weights" in r.getMessage()]
        assert bool(messages) is warned, steps
        if warned:
            assert messages[0].startswith("layer 'c1': output channel(s) 2 have all-zero weights")
            assert f"a step of scale_d ({scale_d:.6g})" in messages[0]


def test_top1_agreement_is_reported_for_the_softmax_output_only(tmp_path):
    """MTCNN O-Net's outputs: prob1 (Softmax) and the box / landmark regressions conv6-2 and conv6-3, of one row
    per sample each: only prob1 is a classifier (the headline took the regressions' argmax agreement)."""
    from amct_caffe.api.accuracy import compare_model
    from amct_caffe.api.workflow import calibrate

    proto, weights = MODELS / "mtcnn/det3.prototxt", MODELS / "mtcnn/det3.caffemodel"
    rng = np.random.default_rng(0)
    batches = [{"data": rng.uniform(-1, 1, (4, 3, 48, 48)).astype(np.float32)} for _ in range(2)]
    paths = calibrate(str(proto), str(weights), batches, str(tmp_path / "q" / "q"), 2, progress=False)
    summary = compare_model(str(proto), str(weights), paths["fake_quant_model"], paths["fake_quant_weights"], batches,
                            str(tmp_path / "rep"), progress=False, batch_num=0)["summary"]
    assert summary["outputs"]["prob1"]["top1_agreement"] is not None
    assert summary["outputs"]["conv6-2"]["top1_agreement"] is None
    assert summary["outputs"]["conv6-3"]["top1_agreement"] is None


def test_the_dump_of_a_detection_list_holds_the_first_samples_boxes(tmp_path):
    """--dump keeps each blob of the first sample; a DetectionOutput's list holds every sample's boxes (column 0
    the sample): the dump keeps sample 0's rows (it kept the whole batch's)."""
    from amct_caffe.api.accuracy import compare_model
    from amct_caffe.api.workflow import calibrate

    proto = MODELS / "hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt"
    weights = MODELS / "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel"
    rng = np.random.default_rng(0)
    batches = [{"data": rng.uniform(-1, 1, (2, 3, 512, 512)).astype(np.float32)}]
    paths = calibrate(str(proto), str(weights), batches, str(tmp_path / "q" / "q"), 1, progress=False)
    result = compare_model(str(proto), str(weights), paths["fake_quant_model"], paths["fake_quant_weights"], batches,
                           str(tmp_path / "rep"), progress=False, batch_num=0, dump=True)
    with np.load(result["fp32_blobs"]) as z:
        boxes = z["detection_out"]
    full = Net(str(proto), str(weights), TEST).forward(**batches[0])["detection_out"]
    assert set(full[0, 0, :, 0].tolist()) == {0.0, 1.0}  # (both samples have boxes in the batch)
    np.testing.assert_array_equal(boxes, full[:, :, full[0, 0, :, 0] == 0])


@pytest.mark.parametrize("sharer_blobs_in_file", [True, False])
def test_layers_sharing_weights_each_run_their_own_quantized_values(tmp_path, sharer_blobs_in_file):
    """Two Convolutions sharing weight and bias by param name, one per channel and one per tensor: each
    saved model runs each layer with its own values (the int32 bias divides by the layer's own
    scale_w * scale_d), though Caffe makes named params one memory; a sharer whose blobs the caffemodel
    leaves out takes its owner's and is quantized as a weighted layer."""
    shared = 'param { name: "w" } param { name: "b" } '
    text = (INPUT.replace('"data"', '"a"', 2) + INPUT.replace('"data"', '"b"', 2)
            + conv("c1", "a", "c1", extra=shared) + conv("c2", "b", "c2", extra=shared))
    proto, weights = make_model(tmp_path, text)
    if not sharer_blobs_in_file:
        model = io.schema.caffe_pb().NetParameter.FromString(weights.read_bytes())
        keep = [layer for layer in model.layer if layer.name != "c2"]
        del model.layer[:]
        model.layer.extend(keep)
        weights.write_bytes(model.SerializeToString())
    w, bias = io.load_weights(str(weights))["c1"]

    def per_tensor_c2(config):
        config["c2"]["weight_quant_params"]["channel_wise"] = False

    graph, mm, mw = calibration_model(tmp_path, proto, weights, 2, per_tensor_c2)
    calibration = Net(mm, mw, TEST)
    rng = np.random.default_rng(3)
    for _ in range(2):  # the two inputs span different ranges: different scale_d
        calibration.forward(a=rng.normal(size=(2, 3, 8, 8)).astype(np.float32),
                            b=4 * rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
    assert not np.array_equal(calibration.params["c1"][0].data, calibration.params["c2"][0].data)
    paths = amct.save_model(graph, "Both", str(tmp_path / "out/model"))
    factors = record.read_record(str(tmp_path / "record.txt"))
    assert len(factors.layer("c1").scale_w) == 4 and len(factors.layer("c2").scale_w) == 1
    fake = Net(paths["fake_quant_model"], paths["fake_quant_weights"], TEST)
    deploy = Net(paths["deploy_model"], paths["deploy_weights"], TEST)
    for name in ("c1", "c2"):
        entry = factors.layer(name)
        scale_w = np.asarray(entry.scale_w, np.float32).reshape(-1, 1, 1, 1)
        codes = np.clip(np.round(w / scale_w), -128, 127)
        np.testing.assert_array_equal(fake.params[name][0].data, (codes * scale_w).astype(np.float32))
        np.testing.assert_array_equal(deploy.params[name][0].data, codes)
        scale_d = np.float32(entry.record_d[0].scale_d)
        expected_bias = np.round(bias / (scale_w.ravel() * scale_d))
        np.testing.assert_allclose(deploy.params[name][1].data, expected_bias, atol=1)
    assert not np.array_equal(deploy.params["c1"][1].data, deploy.params["c2"][1].data)
    converted = amct.convert_model(str(proto), str(weights), str(tmp_path / "record.txt"), str(tmp_path / "conv/model"))
    for key in ("deploy_model", "deploy_weights", "fake_quant_model", "fake_quant_weights"):
        assert Path(converted[key]).read_bytes() == Path(paths[key]).read_bytes(), key


@pytest.mark.parametrize("axis, quantized", [(2, False), (-4, True)])
def test_a_convolution_whose_channels_are_not_axis_1_is_neither_fused_nor_quantized(tmp_path, axis, quantized):
    """convolution_param.axis 2 on (N, V, C, H, W) convolves each of the V volumes' C channels: the BatchNorm
    after it normalizes axis 1 (not the convolution's outputs) and the DeQuant's per-channel factors would
    run along V. Such a layer stays float, its BatchNorm / Scale too, and the models compute what the float
    one does; axis -4 on the same 5-D blob is axis 1 and is quantized as usual."""
    shape = (2, 3, 3, 6, 6)  # V = C = num_output = 3, so wrong axes would not even fail on shapes
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 3 dim: 6 '
            'dim: 6 } } }\n'
            f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ num_output: 3 '
            f'kernel_size: 3 axis: {axis} weight_filler {{ type: "gaussian" std: 0.5 }} }} }}\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: '
            'true } }\n'
            'layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }\n')
    proto = tmp_path / "model.prototxt"
    proto.write_text(text)
    net = Net(str(proto), TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.uniform(0.5, 2.0, b.data.shape)
    net.params["bn"][2].data[...] = 1.0
    weights = tmp_path / "model.caffemodel"
    net.save(str(weights))
    x = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    reference = net.forward(data=x[0])["conv"].copy()
    graph, paths = quantize(tmp_path, proto, weights, x)
    for kind in ("fake_quant", "deploy"):
        saved = Net(paths[f"{kind}_model"], paths[f"{kind}_weights"], TEST)
        kinds = [layer.type for layer in saved.layers]
        assert ("BatchNorm" not in kinds) is quantized and ("Convolution" in kinds)
        out = saved.forward(data=x[0])
        y = out[next(iter(out))]
        error = np.abs(y - reference).max() / np.abs(reference).max()
        assert (error < 1e-6) is not quantized and error < 0.05, (kind, error)
