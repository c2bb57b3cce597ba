"""The guide's QAT functions: the retrain model's layers, and saving a "trained" model.

Training itself needs the executor's retrain layers (another branch); here the trained
caffemodel is made by hand: clips and float weights set in the modified model's blobs. Running the
retrain model end to end (solver, TEST-phase record) is left to the integration tests.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import io
from amct_caffe.errors import AmctError, ConfigError, GraphError, WeightsError
from amct_caffe.io.graph_io import graph_from_net, layer_graph
from amct_caffe.io.record import read_record
from amct_caffe.quant.arq import arq_quantize_weight
from amct_caffe.quant.ulq import ulq_scale_offset
from tests.golden import MODELS

LENET = MODELS / "lenet_mnist/lenet_train_test.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
pytestmark = pytest.mark.skipif(not LENET.exists(), reason="../shared not beside the repository")
KINDS = ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
         "deploy_weights.caffemodel", "quant.json", "quant_param_record.txt", "quant_param_record.bin")


def _retrain(tmp, proto, weights, edit=None):
    config = tmp / "config.json"
    amct.create_quant_retrain_config(str(config), str(proto), str(weights))
    if edit is not None:
        config.write_text(edit(config.read_text()))
    mm, mw, rec = tmp / "modified.prototxt", tmp / "modified.caffemodel", tmp / "record.txt"
    amct.create_quant_retrain_model(str(proto), str(weights), str(config), str(mm), str(mw), str(rec))
    return config, mm, mw, rec


def _layers(path):
    return {lp.name: lp for lp in io.load_prototxt(path, filter_layers=False).layer}


def _train_by_hand(mm, mw, out, clips, seed=0):
    """A 'solver snapshot': clips set, float weights moved, the shared blob 0 left stale."""
    rng = np.random.default_rng(seed)
    graph = layer_graph(io.load_prototxt(mm, filter_layers=False), io.load_weights(mw))
    trained = {}
    for node in graph.nodes:
        if node.type == "RetrainDataQuant":
            layer = node.layer_param.retrain_data_quant_param.object_layer
            node.params = [np.array([clips[layer][0]], np.float32), np.array([clips[layer][1]], np.float32)]
        elif node.type == "RetrainWeightQuant":
            w = node.params[1]
            moved = (w + rng.normal(0, 0.01, w.shape)).astype(np.float32)
            node.params = [node.params[0], moved]
            trained[node.name[:-len("_weight_quant")]] = moved
    net, weights = io.graph_io.graph_to_net(graph)
    io.write_caffemodel(io.net_to_caffemodel(net, weights), out)
    return trained


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qat")
    config, mm, mw, rec = _retrain(tmp, LENET, LENET_W)
    return tmp, config, mm, mw, rec


def test_retrain_model_keeps_both_phases_and_inserts_the_layers(lenet):
    _, _, mm, _, rec = lenet
    net = io.load_prototxt(mm, filter_layers=False)
    types = [lp.type for lp in net.layer]
    assert types.count("Data") == 2 and "Accuracy" in types and "SoftmaxWithLoss" in types
    assert types.count("RetrainDataQuant") == 4 and types.count("RetrainWeightQuant") == 4
    layers = _layers(mm)
    for name, fixed_min, channel_wise, shape in (("conv1", False, True, (20, 1, 5, 5)),
                                                 ("conv2", False, True, (50, 20, 5, 5)),
                                                 ("ip1", False, False, (500, 800)), ("ip2", True, False, (10, 500))):
        dq, wq, layer = layers[f"{name}_data_quant"], layers[f"{name}_weight_quant"], layers[name]
        assert list(wq.bottom) == list(dq.top) and list(layer.bottom) == list(wq.top)
        p = dq.retrain_data_quant_param
        assert (p.ifmr_init, p.fixed_min, p.object_layer, p.num_bits, p.with_offset) == (True, fixed_min, name, 8, True)
        assert p.record_file_path == str(rec)
        assert [(s.lr_mult, s.decay_mult) for s in dq.param] == [(1, 0), (1, 0)]
        q = wq.retrain_weight_quant_param
        assert (q.cout, q.cin) == shape[:2] and q.channel_wise == channel_wise and not q.with_offset
        assert (q.HasField("h"), q.HasField("w")) == ((True, True) if len(shape) == 4 else (False, False))
        assert q.layer_type == ("Convolution" if name.startswith("conv") else "InnerProduct")
        shared = f"{name}_retrain_weight"
        assert (wq.param[0].name, wq.param[0].lr_mult, wq.param[0].decay_mult) == (shared, 0, 0)
        assert (wq.param[1].name, wq.param[1].lr_mult) == ("", 1)  # the weight's own ParamSpec
        # only the name: L's own (default) lr_mult keeps its weight gradient, which reaches the float weight
        assert layer.param[0].name == shared and not layer.param[0].HasField("lr_mult")
        assert layer.param[1].lr_mult == 2  # the bias keeps its own
    # ip1 follows pool2 (no ReLU), ip2 follows the in-place relu1: its input is a ReLU's output.
    assert list(layers["ip2_data_quant"].bottom) == ["ip1"]
    assert read_record(rec).layers == {}


def test_retrain_model_blobs(lenet):
    _, _, mm, mw, _ = lenet
    original, modified = io.load_weights(LENET_W), io.load_weights(mw)
    for name in ("conv1", "conv2", "ip1", "ip2"):
        np.testing.assert_array_equal(modified[f"{name}_data_quant"][0], [3.0])
        np.testing.assert_array_equal(modified[f"{name}_data_quant"][1], [0.0])
        for blob in modified[f"{name}_weight_quant"]:
            np.testing.assert_array_equal(blob, original[name][0])
        np.testing.assert_array_equal(modified[name][1], original[name][1])
    for phase in (io.TRAIN, io.TEST):  # each phase is a valid net
        graph_from_net(io.load_prototxt(mm, phase), modified)


def test_config_clips_and_fixed_min(tmp_path):
    def edit(text):
        d = json.loads(text)
        d["conv1"]["retrain_data_config"].update(clip_max=2.5, clip_min=-1.5)
        d["ip2"]["retrain_data_config"]["fixed_min"] = False
        return json.dumps(d)

    _, mm, mw, _ = _retrain(tmp_path, LENET, LENET_W, edit)
    layers = _layers(mm)
    p = layers["conv1_data_quant"].retrain_data_quant_param
    assert (p.ifmr_init, p.clip_max, p.clip_min) == (False, 2.5, -1.5)
    np.testing.assert_array_equal(io.load_weights(mw)["conv1_data_quant"][0], [2.5])
    assert layers["ip2_data_quant"].retrain_data_quant_param.fixed_min is False  # the config's choice wins


def _set_clips(**clips):
    def edit(text):
        d = json.loads(text)
        for layer, values in clips.items():
            d[layer]["retrain_data_config"].update(values)
        return json.dumps(d)
    return edit


def test_given_clip_min_wins_over_the_relu_rule(tmp_path, caplog):
    # the guide's tuning example gives clip_max 3 / clip_min -3 with fixed_min absent: on ip2, whose input is
    # relu1's output, the given lower clip is kept (with a warning) instead of being replaced by 0
    with caplog.at_level("WARNING", logger="amct_caffe"):
        _, mm, _, _ = _retrain(tmp_path, LENET, LENET_W, _set_clips(ip2={"clip_max": 3.0, "clip_min": -3.0}))
    p = _layers(mm)["ip2_data_quant"].retrain_data_quant_param
    assert (p.ifmr_init, p.fixed_min, p.clip_max, p.clip_min) == (False, False, 3.0, -3.0)
    assert "layer 'ip2': its input is a ReLU's output, but the config gives clip_min -3.0" in caplog.text


def test_clip_max_alone_where_the_lower_clip_is_held_at_zero(tmp_path):
    (tmp_path / "a").mkdir()
    _, mm, _, _ = _retrain(tmp_path / "a", LENET, LENET_W, _set_clips(ip2={"clip_max": 2.0}))  # after relu1
    p = _layers(mm)["ip2_data_quant"].retrain_data_quant_param
    assert (p.ifmr_init, p.fixed_min, p.clip_max, p.clip_min) == (False, True, 2.0, 0.0)
    (tmp_path / "b").mkdir()  # ip1 reads pool2, not a ReLU: its lower clip has no start value
    with pytest.raises(ConfigError, match=r"layer 'ip1'.*clip_max is given without clip_min and the layer's "
                                          r"input is not a ReLU's output"):
        _retrain(tmp_path / "b", LENET, LENET_W, _set_clips(ip1={"clip_max": 2.0}))
    assert not (tmp_path / "b" / "modified.prototxt").exists()
    (tmp_path / "c").mkdir()  # unless fixed_min says so
    _, mm, _, _ = _retrain(tmp_path / "c", LENET, LENET_W, _set_clips(ip1={"clip_max": 2.0, "fixed_min": True}))
    p = _layers(mm)["ip1_data_quant"].retrain_data_quant_param
    assert (p.ifmr_init, p.fixed_min, p.clip_max, p.clip_min) == (False, True, 2.0, 0.0)


def test_retrain_model_errors(tmp_path, lenet):
    _, config, mm, mw, _ = lenet
    with pytest.raises(AmctError, match="is a RetrainDataQuant layer"):
        amct.create_quant_retrain_model(str(mm), str(mw), str(config), str(tmp_path / "a.prototxt"),
                                        str(tmp_path / "a.caffemodel"), str(tmp_path / "r.txt"))
    with pytest.raises(AmctError, match="is the same file as the input model_file"):
        amct.create_quant_retrain_model(str(LENET), str(LENET_W), str(config), str(LENET),
                                        str(tmp_path / "a.caffemodel"), str(tmp_path / "r.txt"))
    off = tmp_path / "off.json"
    off.write_text(config.read_text().replace('"retrain_enable": true', '"retrain_enable": false'))
    with pytest.raises(ConfigError, match="no layer has retrain_enable true"):
        amct.create_quant_retrain_model(str(LENET), str(LENET_W), str(off), str(tmp_path / "a.prototxt"),
                                        str(tmp_path / "a.caffemodel"), str(tmp_path / "r.txt"))
    assert not (tmp_path / "a.prototxt").exists()


def test_weights_that_do_not_fit_the_shapes_a_readable_data_source_gives_are_refused(tmp_path):
    """Where the Data layers' LMDBs can be read, their first record gives the net its shapes (Caffe's
    DataLayerSetUp), and a layer whose caffemodel blobs do not fit them is refused naming it; such a model
    used to pass, and failed only when the solver built the net, naming the retrain layers amct_caffe inserts."""
    from amct_caffe.errors import WeightsError
    from tests.training.mnist import mnist_lenet

    mnist_lenet(tmp_path, train_batch=8, test_batch=10)
    text = (tmp_path / "lenet_train_test.prototxt").read_text()
    wrong = tmp_path / "wrong.prototxt"
    wrong.write_text(text.replace('bottom: "pool2"\n  top: "ip1"', 'bottom: "data"\n  top: "ip1"'))
    assert wrong.read_text() != text
    message = r"layer 'ip1' \(InnerProduct\) blob 0: shape mismatch: the caffemodel has \[500, 800\] but the " \
              r"prototxt defines \[500, 784\]"
    with pytest.raises(WeightsError, match=message):
        amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(wrong), str(LENET_W))
    # the same model whose data sources are elsewhere: nothing to check the weights against here
    elsewhere = tmp_path / "elsewhere.prototxt"
    elsewhere.write_text(wrong.read_text().replace(str(tmp_path / "mnist_"), "/nonexistent/mnist_"))
    amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(elsewhere), str(LENET_W))
    assert json.loads((tmp_path / "c.json").read_text())


def test_another_models_weights_are_refused_where_the_data_sources_are_elsewhere(tmp_path):
    """LeNet's train/test model (its LMDBs not on this machine) with MTCNN P-Net's caffemodel: the shapes the
    prototxt fixes by itself (conv1's 20 outputs of 5x5) are checked against the weights; it used to write a
    retrain model holding P-Net's [10, 3, 3, 3] conv1."""
    from amct_caffe.errors import WeightsError

    other = MODELS / "mtcnn/det1.caffemodel"
    message = r"layer 'conv1' \(Convolution\) blob 0: shape mismatch: the caffemodel has \[10, 3, 3, 3\]"
    with pytest.raises(WeightsError, match=message):
        amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(LENET), str(other))
    config = tmp_path / "lenet.json"
    amct.create_quant_retrain_config(str(config), str(LENET), str(LENET_W))
    with pytest.raises(WeightsError, match=message):
        amct.create_quant_retrain_model(str(LENET), str(other), str(config), str(tmp_path / "m.prototxt"),
                                        str(tmp_path / "m.caffemodel"), str(tmp_path / "r.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.json"]


def test_a_caffemodel_without_the_models_weights_is_named(tmp_path, caplog):
    """Weights for none of the weighted layers (an empty file): refused naming the file. Some missing (a new
    layer to fine-tune): a warning, and the layer is left out of the config (Caffe starts it from its
    fillers)."""
    from amct_caffe.errors import WeightsError

    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty.caffemodel holds weights for none of the 4 weighted layer\(s\) "
                                           r".*\('conv1', 'conv2', 'ip1', 'ip2'\): give the caffemodel trained"):
        amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(LENET), str(empty))
    renamed = tmp_path / "renamed.prototxt"
    renamed.write_text(LENET.read_text().replace('name: "ip2"', 'name: "classifier"'))
    assert renamed.read_text() != LENET.read_text()
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(renamed), str(LENET_W))
    assert "holds no weights for layer(s) 'classifier'" in caplog.text
    assert "classifier" not in json.loads((tmp_path / "c.json").read_text())


CLIPS = {"conv1": (0.9, -0.1), "conv2": (3.1, -2.2), "ip1": (4.5, -3.0), "ip2": (2.75, -1.0)}


@pytest.fixture(scope="module")
def saved(lenet):
    tmp, config, mm, mw, rec = lenet
    trained_w = tmp / "trained.caffemodel"
    trained = _train_by_hand(mm, mw, trained_w, CLIPS)
    paths = amct.save_quant_retrain_model(str(mm), str(trained_w), "Both", str(tmp / "out/lenet"), str(rec),
                                          str(config))
    return tmp, trained, paths


def test_saved_record_is_ulq_of_the_clips_and_arq_of_the_weights(saved):
    tmp, trained, _ = saved
    record = read_record(tmp / "out/lenet_quant_param_record.txt")
    assert list(record.layers) == ["conv1", "conv2", "ip1", "ip2"]
    for name, (cmax, cmin) in CLIPS.items():
        entry = record.layer(name)
        act = entry.activation(0)
        fixed_min = name == "ip2"
        scale_d, offset_d = ulq_scale_offset(cmax, 0.0 if fixed_min else cmin, 8)
        assert (act.scale_d, act.offset_d, act.num_bits_d) == (np.float32(scale_d), offset_d, 8)
        arq = arq_quantize_weight(trained[name], "Convolution" if name.startswith("conv") else "InnerProduct",
                                  name.startswith("conv"))
        np.testing.assert_array_equal(np.asarray(entry.scale_w, np.float32), arq.scale)
        assert list(entry.offset_w) == [0] * arq.scale.size
    assert read_record(tmp / "record.txt") == record  # the record file gets the final factors


def test_saved_models_hold_no_retrain_layers_and_round_trip(saved):
    tmp, trained, paths = saved
    for kind in KINDS:
        assert (tmp / "out" / f"lenet_{kind}").is_file(), kind
    net, weights = io.load_model(paths["fake_quant_model"], paths["fake_quant_weights"])
    types = [lp.type for lp in net.layer]
    assert "RetrainDataQuant" not in types and "RetrainWeightQuant" not in types
    assert types.count("Quant") == 4 and types.count("DeQuant") == 4 and "Data" in types and "Accuracy" in types
    conv1 = next(lp for lp in net.layer if lp.name == "conv1")
    assert not conv1.param[0].name and conv1.param[0].lr_mult == 1  # the original ParamSpec is back
    graph_from_net(net, weights)
    scale = np.asarray(read_record(tmp / "out/lenet_quant_param_record.txt").layer("conv1").scale_w, np.float32)
    fake = weights["conv1"][0]
    np.testing.assert_allclose(fake / scale[:, None, None, None],
                               np.round(fake / scale[:, None, None, None]), atol=1e-3)
    deploy = io.load_weights(paths["deploy_weights"])
    assert deploy["conv1"][0].dtype == np.int8


BN_NET = """name: "bnnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 decay_mult: 1 }
        param { lr_mult: 2 decay_mult: 0 } convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1" inner_product_param { num_output: 5 } }
"""


def _bn_model(tmp):
    proto = tmp / "bn.prototxt"
    proto.write_text(BN_NET)
    rng = np.random.default_rng(3)
    w = {"conv1": [rng.normal(0, 0.3, (4, 3, 3, 3)), rng.normal(0, 0.1, 4)],
         "bn1": [rng.normal(0, 0.2, 4) * 2, rng.uniform(0.5, 2, 4) * 2, np.array([2.0])],
         "scale1": [np.array([1.5, -0.7, 0.9, 1.1]), rng.normal(0, 0.1, 4)],
         "ip1": [rng.normal(0, 0.1, (5, 144)), rng.normal(0, 0.1, 5)]}
    w = {k: [np.asarray(a, np.float32) for a in v] for k, v in w.items()}
    net = io.load_prototxt(proto)
    weights = tmp / "bn.caffemodel"
    io.write_caffemodel(io.net_to_caffemodel(net, w), weights)
    return proto, weights, w


def test_bn_is_kept_for_training_and_folded_at_save(tmp_path):
    proto, weights, w = _bn_model(tmp_path)
    config, mm, mw, rec = _retrain(tmp_path, proto, weights)
    assert [lp.type for lp in io.load_prototxt(mm).layer].count("BatchNorm") == 1
    trained_w = tmp_path / "trained.caffemodel"
    clips = {"conv1": (2.0, -1.0), "ip1": (1.5, -0.5)}
    trained = _train_by_hand(mm, mw, trained_w, clips)
    paths = amct.save_quant_retrain_model(str(mm), str(trained_w), "Both", str(tmp_path / "out/bn"), str(rec),
                                          str(config))
    record = read_record(paths["quant_param_record_txt"])
    # BN then Scale folded into conv1 by hand: w * gamma / sqrt(var / f + eps), eps = 1e-5.
    mean, var, f = w["bn1"]
    k = w["scale1"][0] / np.sqrt(var / f[0] + np.float32(1e-5))
    fused = trained["conv1"] * k[:, None, None, None]
    np.testing.assert_allclose(np.asarray(record.layer("conv1").scale_w), arq_quantize_weight(fused).scale,
                               rtol=1e-6)
    assert record.layer("ip1").activation(0).scale_d == np.float32(ulq_scale_offset(1.5, 0.0)[0])  # after relu1
    types = [lp.type for lp in io.load_prototxt(paths["fake_quant_model"]).layer]
    assert "BatchNorm" not in types and "Scale" not in types

    # The same record through convert_model (the PTQ output path) on the equivalent float model:
    # the trained float weights in the original prototxt. The files are byte for byte equal.
    float_w = tmp_path / "float.caffemodel"
    eq = dict(w, conv1=[trained["conv1"], w["conv1"][1]], ip1=[trained["ip1"], w["ip1"][1]])
    io.write_caffemodel(io.net_to_caffemodel(io.load_prototxt(proto), eq), float_w)
    other = amct.convert_model(str(proto), str(float_w), paths["quant_param_record_txt"], str(tmp_path / "cv/bn"))
    for kind in ("fake_quant_model", "fake_quant_weights", "deploy_model", "deploy_weights",
                 "quant_param_record_txt"):
        assert Path(paths[kind]).read_bytes() == Path(other[kind]).read_bytes(), kind


def test_a_per_tensor_layer_that_batchnorm_folds_into_is_named(tmp_path, caplog):
    """One weight grid cannot hold the trained Q(w) scaled per channel by the folded BatchNorm / Scale:
    both calls say which layer is re-quantized at save (per channel, nothing is said)."""
    proto, weights, _ = _bn_model(tmp_path)
    per_tensor = lambda text: text.replace('"channel_wise": true', '"channel_wise": false', 1)  # noqa: E731
    for edit, warned in ((None, False), (per_tensor, True)):
        out = tmp_path / ("pt" if warned else "pc")
        out.mkdir()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="amct_caffe"):
            config, mm, mw, rec = _retrain(out, proto, weights, edit)
            trained_w = out / "trained.caffemodel"
            _train_by_hand(mm, mw, trained_w, {"conv1": (2.0, -1.0), "ip1": (1.5, -0.5)})
            amct.save_quant_retrain_model(str(mm), str(trained_w), "Both", str(out / "out/bn"), str(rec), str(config))
        found = [r.getMessage() for r in caplog.records if "quantizes its weights on one grid" in r.getMessage()]
        assert len(found) == (2 if warned else 0), found
        assert all("layer 'conv1'" in m and "'bn1', 'scale1' fold into it" in m for m in found)


def test_save_errors(tmp_path, saved, lenet):
    tmp, _, _ = saved
    _, config, mm, mw, rec = lenet
    with pytest.raises(AmctError, match="save_type must be one of Fakequant, Deploy, Both"):
        amct.save_quant_retrain_model(str(mm), str(mw), "fake", str(tmp_path / "x"))
    with pytest.raises(GraphError, match="has no retrain layers"):
        amct.save_quant_retrain_model(str(LENET), str(LENET_W), "Both", str(tmp_path / "x"))
    with pytest.raises(AmctError, match="same file as the input retrained_model_file"):
        amct.save_quant_retrain_model(str(mm), str(tmp / "trained.caffemodel"), "Both", str(tmp_path / "x"),
                                      str(mm))
    bad = tmp_path / "c.json"
    bad.write_text(config.read_text().replace('"retrain_enable": true', '"retrain_enable": false', 1))
    with pytest.raises(ConfigError, match=r"retrained in the model but not enabled in the config: \['conv1'\]"):
        amct.save_quant_retrain_model(str(mm), str(tmp / "trained.caffemodel"), "Both", str(tmp_path / "x"),
                                      None, str(bad))
    # A config whose data settings are not the model's: the record would not say what the model trained.
    for field, value, message in (("num_bits", 16, "retrain_data_config.num_bits 16 differs from the retrained "
                                                   r"model's \(8\)"),
                                  ("fixed_min", True, "retrain_data_config.fixed_min true differs from the "
                                                      r"retrained model's \(false\)")):
        edited = json.loads(config.read_text())
        edited["conv1"]["retrain_data_config"][field] = value
        bad.write_text(json.dumps(edited))
        with pytest.raises(ConfigError, match=f"layer 'conv1': {message}"):
            amct.save_quant_retrain_model(str(mm), str(tmp / "trained.caffemodel"), "Both", str(tmp_path / "x"),
                                          None, str(bad))
    assert not list(tmp_path.glob("x_*"))


def test_a_retrained_caffemodel_without_a_retrained_layer_says_so(tmp_path, saved, lenet):
    from amct_caffe.errors import WeightsError
    from amct_caffe.io.schema import caffe_pb

    tmp, _, _ = saved
    _, _, mm, _, _ = lenet
    net = caffe_pb().NetParameter()
    net.ParseFromString((tmp / "trained.caffemodel").read_bytes())
    del net.layer[[lp.name for lp in net.layer].index("ip2")]
    (tmp_path / "w.caffemodel").write_bytes(net.SerializeToString())
    with pytest.raises(WeightsError, match="layer 'ip2' is not in the weights file: give the caffemodel of the "
                                           "retrained model"):
        amct.save_quant_retrain_model(str(mm), str(tmp_path / "w.caffemodel"), "Both", str(tmp_path / "x"))
    assert not list(tmp_path.glob("x_*"))


def test_saving_the_untrained_retrain_model_warns(tmp_path, saved, lenet, caplog):
    # the retrain model before any forward: its IFMR-initialised clips still hold the placeholders
    tmp, _, _ = saved
    _, _, mm, mw, _ = lenet
    with caplog.at_level("WARNING", logger="amct_caffe"):
        amct.save_quant_retrain_model(str(mm), str(mw), "Fakequant", str(tmp_path / "untrained"))
    assert "the clips of 'conv1', 'conv2', 'ip1', 'ip2' still hold the start placeholders [0.0, 3.0]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="amct_caffe"):  # the hand-trained one moved its clips: no warning
        amct.save_quant_retrain_model(str(mm), str(tmp / "trained.caffemodel"), "Fakequant", str(tmp_path / "t"))
    assert "placeholders" not in caplog.text


def test_layers_sharing_a_weight_are_left_out_of_the_generated_config(tmp_path):
    text = (MODELS / "lenet_mnist/lenet.prototxt").read_text()
    at = text.index('name: "ip2"')
    text = text[:at] + text[at:].replace("lr_mult: 1", 'name: "sw" lr_mult: 1', 1).replace(
        "lr_mult: 2", 'name: "sb" lr_mult: 2', 1)
    text += ('layer { name: "ip2b" type: "InnerProduct" bottom: "ip1" top: "ip2b" param { name: "sw" } '
             'param { name: "sb" } inner_product_param { num_output: 10 } }\n')
    proto, config = tmp_path / "shared.prototxt", tmp_path / "config.json"
    proto.write_text(text)
    amct.create_quant_retrain_config(str(config), str(proto), str(LENET_W))
    generated = json.loads(config.read_text())
    assert {"conv1", "conv2", "ip1"} <= set(generated) and not {"ip2", "ip2b"} & set(generated)
    amct.create_quant_retrain_model(str(proto), str(LENET_W), str(config), str(tmp_path / "m.prototxt"),
                                    str(tmp_path / "m.caffemodel"), str(tmp_path / "r.txt"))  # the generated one runs
    generated["ip2"] = generated["ip1"]  # enabled by hand: refused, naming the config and the reason
    config.write_text(json.dumps(generated))
    with pytest.raises(ConfigError, match=r"config.json: layer 'ip2': cannot be retrained: it shares its weight "
                                          r"with other layers \(param name 'sw'\)"):
        amct.create_quant_retrain_model(str(proto), str(LENET_W), str(config), str(tmp_path / "n.prototxt"),
                                        str(tmp_path / "n.caffemodel"), str(tmp_path / "s.txt"))


def test_a_param_name_no_other_layer_uses_does_not_make_a_weight_shared(tmp_path):
    """Converters name every param ("conv1_w"): a name no other layer uses shares nothing, so conv1 is retrained
    (it was left out of the generated config as a shared weight), trained and saved like the others."""
    text = LENET.read_text()
    at = text.index('name: "conv1"')
    text = text[:at] + text[at:].replace("lr_mult: 1", 'name: "conv1_w" lr_mult: 1', 1).replace(
        "lr_mult: 2", 'name: "conv1_b" lr_mult: 2', 1)
    proto = tmp_path / "named.prototxt"
    proto.write_text(text)
    config, mm, mw, rec = _retrain(tmp_path, proto, LENET_W)
    assert "conv1" in json.loads(config.read_text())
    assert "conv1_weight_quant" in _layers(mm)
    trained = tmp_path / "trained.caffemodel"
    _train_by_hand(mm, mw, trained, CLIPS)
    paths = amct.save_quant_retrain_model(str(mm), str(trained), "Both", str(tmp_path / "out" / "m"), str(rec),
                                          str(config))
    assert read_record(paths["quant_param_record_txt"]).layer("conv1").scale_w


def test_a_layer_defined_once_per_phase_is_not_taken_for_a_test_only_one(tmp_path):
    """ip2 defined twice, a TRAIN copy and a TEST copy of one name: not taken for a TEST-only layer; it is left
    out of the generated config as a layer defined twice (create_quant_retrain_model takes one definition
    per retrained layer), and the other layers stay."""
    text = LENET.read_text()
    start = text.index("layer {", text.index('name: "ip2"') - 40)
    end = text.index("\nlayer {", start + 1)
    ip2 = text[start:end]
    copies = "\n".join(ip2.replace('name: "ip2"', f'name: "ip2" include {{ phase: {phase} }}', 1)
                       for phase in ("TRAIN", "TEST"))
    proto = tmp_path / "copies.prototxt"
    proto.write_text(text[:start] + copies + text[end:])
    config = tmp_path / "config.json"
    amct.create_quant_retrain_config(str(config), str(proto), str(LENET_W))
    written = json.loads(config.read_text())
    assert {"conv1", "conv2", "ip1"} <= set(written) and not written.get("ip2", {}).get("retrain_enable", False)


def test_a_weighted_layer_only_in_the_test_phase(tmp_path):
    """Not retrained (a solver trains the TRAIN net, whose snapshots lack it), and a retrained caffemodel without
    its weights is refused naming it (the saved fake-quant model could not be loaded)."""
    text = LENET.read_text() + ('layer { name: "extra" type: "InnerProduct" bottom: "ip1" top: "extra" '
                                'include { phase: TEST } inner_product_param { num_output: 5 weight_filler { '
                                'type: "xavier" } } }\n')
    proto = tmp_path / "extra.prototxt"
    proto.write_text(text)
    weights = tmp_path / "extra.caffemodel"
    net = io.load_prototxt(proto, io.TEST)
    loaded = io.load_weights(LENET_W)
    loaded["extra"] = [np.full((5, 500), 0.01, np.float32), np.zeros(5, np.float32)]
    io.write_caffemodel(io.net_to_caffemodel(net, loaded), weights)
    config, mm, mw, rec = _retrain(tmp_path, proto, weights)
    assert "extra" not in json.loads(config.read_text())
    trained = tmp_path / "trained.caffemodel"
    _train_by_hand(mm, mw, trained, CLIPS)
    amct.save_quant_retrain_model(str(mm), str(trained), "Both", str(tmp_path / "out" / "m"), str(rec))
    snapshot = tmp_path / "snapshot.caffemodel"
    msg = io.read_caffemodel(trained)
    kept = [layer for layer in msg.layer if layer.name != "extra"]
    del msg.layer[:]
    msg.layer.extend(kept)
    snapshot.write_bytes(msg.SerializeToString())
    with pytest.raises(WeightsError, match=r"snapshot.caffemodel holds no weights for layer\(s\) 'extra' of the TEST"):
        amct.save_quant_retrain_model(str(mm), str(snapshot), "Both", str(tmp_path / "out2" / "m"), str(rec))
    assert not (tmp_path / "out2").exists()


def test_a_test_only_layer_sharing_its_weights_needs_none_of_its_own(tmp_path):
    """A TEST-only layer whose params name another layer's (Caffe's sharing) takes that layer's weights: a snapshot
    without it saves (only a layer with weights of its own is refused when they are missing)."""
    text = LENET.read_text()
    at = text.index('name: "ip2"')
    text = text[:at] + text[at:].replace("lr_mult: 1", 'name: "w2" lr_mult: 1', 1).replace(
        "lr_mult: 2", 'name: "b2" lr_mult: 2', 1)
    text += ('layer { name: "twin" type: "InnerProduct" bottom: "ip1" top: "twin" include { phase: TEST } '
             'param { name: "w2" } param { name: "b2" } inner_product_param { num_output: 10 } }\n')
    proto = tmp_path / "twin.prototxt"
    proto.write_text(text)
    config, mm, mw, rec = _retrain(tmp_path, proto, LENET_W)
    trained = tmp_path / "trained.caffemodel"
    _train_by_hand(mm, mw, trained, {k: v for k, v in CLIPS.items() if k != "ip2"})
    msg = io.read_caffemodel(trained)
    kept = [layer for layer in msg.layer if layer.name != "twin"]
    del msg.layer[:]
    msg.layer.extend(kept)
    snapshot = tmp_path / "snapshot.caffemodel"
    snapshot.write_bytes(msg.SerializeToString())
    paths = amct.save_quant_retrain_model(str(mm), str(snapshot), "Both", str(tmp_path / "out" / "m"), str(rec))
    assert Path(paths["fake_quant_weights"]).is_file()


@pytest.mark.parametrize("phase", ["TRAIN", "TEST", None])
def test_a_new_layer_the_caffemodel_lacks_is_left_out_of_the_modified_caffemodel(tmp_path, phase):
    """A layer to fine-tune that the float caffemodel does not name: the modified caffemodel listed it with no blob,
    which Caffe's CopyTrainedLayersFrom refuses (Incompatible number of blobs), as the executor now does; it is not
    named there at all now, so both start it from its fillers, as they would from the float caffemodel."""
    from amct_caffe.runtime import TEST, TRAIN, Net

    float_model = ('layer { name: "data" type: "Input" top: "data" top: "t" input_param { shape { dim: 2 dim: 1 '
                   'dim: 8 dim: 8 } shape { dim: 2 dim: 4 } } }\n'
                   'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { '
                   'num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { '
                   'num_output: 4 weight_filler { type: "xavier" } } }\nNEW'
                   'layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "t" top: "loss" }\n')
    (tmp_path / "float.prototxt").write_text(float_model.replace("NEW", ""))
    Net(str(tmp_path / "float.prototxt"), TEST).save(str(tmp_path / "float.caffemodel"))
    include = f" include {{ phase: {phase} }}" if phase else ""
    new = (f'layer {{ name: "head" type: "Convolution" bottom: "conv1" top: "head"{include} convolution_param {{ '
           'num_output: 2 kernel_size: 1 weight_filler { type: "xavier" } } }\n')
    model = tmp_path / "m.prototxt"
    model.write_text(float_model.replace("NEW", new))
    weights = str(tmp_path / "float.caffemodel")
    amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(model), weights)
    amct.create_quant_retrain_model(str(model), weights, str(tmp_path / "c.json"), str(tmp_path / "mod.prototxt"),
                                    str(tmp_path / "mod.caffemodel"), str(tmp_path / "rec.txt"))
    written = io.read_caffemodel(str(tmp_path / "mod.caffemodel"))
    assert "head" not in [layer.name for layer in written.layer]
    assert {"conv1", "ip"} <= {layer.name for layer in written.layer if len(layer.blobs)}
    for net_phase in (TRAIN, TEST):
        net = Net(str(tmp_path / "mod.prototxt"), str(tmp_path / "mod.caffemodel"), net_phase)
        assert ("head" in net.params) is (phase in (None, "TRAIN" if net_phase == TRAIN else "TEST"))


def test_fixed_min_after_something_else_than_a_relu_warns_once_naming_the_config(tmp_path, caplog):
    """conv1 reads the data, not a ReLU's output: fixed_min true there is warned about, once, with the config
    file's name (the check of the config and the building of the model each said it)."""
    with caplog.at_level("WARNING", logger="amct_caffe"):
        _retrain(tmp_path, LENET, LENET_W, _set_clips(conv1={"clip_max": 3.0, "fixed_min": True}))
    said = [r.getMessage() for r in caplog.records if "fixed_min is true but the layer" in r.getMessage()]
    assert len(said) == 1 and ".json" in said[0] and "conv1" in said[0], said


def test_a_layer_defined_once_per_phase_is_left_out_of_the_generated_config(tmp_path, caplog):
    """'ip' defined for TRAIN and again for TEST under one name (Caffe shares its trained weights by name): the
    generated config enabled it and create_quant_retrain_model then refused it; now the config leaves it out,
    saying why, and the model is written with conv1 retrained."""
    from amct_caffe.runtime import TRAIN, Net

    model = tmp_path / "m.prototxt"
    model.write_text(
        'layer { name: "data" type: "Input" top: "data" top: "t" input_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } '
        'shape { dim: 2 dim: 4 } } }\n'
        'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 '
        'kernel_size: 3 weight_filler { type: "xavier" } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" include { phase: TRAIN } '
        'inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" include { phase: TEST } '
        'inner_product_param { num_output: 4 } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "t" top: "loss" }\n')
    weights = tmp_path / "m.caffemodel"
    Net(str(model), TRAIN).save(str(weights))
    caplog.set_level(logging.INFO, logger="amct_caffe")
    amct.create_quant_retrain_config(str(tmp_path / "c.json"), str(model), str(weights))
    config = json.loads((tmp_path / "c.json").read_text())
    assert config.get("conv1", {}).get("retrain_enable") and not config.get("ip", {}).get("retrain_enable", False)
    assert any("'ip'" in r.getMessage() and "defines it twice under one name" in r.getMessage()
               for r in caplog.records)
    amct.create_quant_retrain_model(str(model), str(weights), str(tmp_path / "c.json"), str(tmp_path / "mod.prototxt"),
                                    str(tmp_path / "mod.caffemodel"), str(tmp_path / "rec.txt"))
