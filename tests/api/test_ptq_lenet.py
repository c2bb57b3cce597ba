"""Post-training quantization end to end on LeNet + MNIST, in the embedded executor."""

import json
from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import AmctError, io
from amct_caffe.io import record
from amct_caffe.runtime import TEST, Net
from tests.api.flow import calibration_model
from tests.golden import MODELS, SHARED

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
MNIST = SHARED / "data/mnist_5k.npz"
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason="../shared not beside the repository")
KINDS = ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
         "deploy_weights.caffemodel", "quant.json", "quant_param_record.txt", "quant_param_record.bin")


def _digits():
    z = np.load(MNIST)
    return z["images"][:, None].astype(np.float32) * np.float32(0.00390625), z["labels"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lenet")
    x, _ = _digits()
    graph, mm, mw = calibration_model(tmp, LENET, LENET_W, batch_num=2)
    net = Net(mm, mw, TEST)
    for b in range(2):  # calibrate on 64 digits
        net.forward(data=x[b * 32:(b + 1) * 32])
    paths = amct.save_model(graph, "Both", str(tmp / "out/lenet"))
    return tmp, graph, paths


def test_all_outputs_written(quantized):
    tmp, _, _ = quantized
    for kind in KINDS:
        assert (tmp / "out" / f"lenet_{kind}").is_file(), kind


def test_record_has_every_factor(quantized):
    tmp, graph, _ = quantized
    rec = record.read_record(tmp / "record.txt")
    for target in graph.targets:
        entry = record.layer_entry(rec, target.name)
        act = record.activation_entry(entry, 0)
        assert act.scale_d > 0 and -128 <= act.offset_d <= 127 and act.num_bits_d == 8
        assert act.channels > 0 and act.height > 0 and act.width > 0
        assert bool(len(entry.scale_w)) == target.weighted
    conv1 = record.layer_entry(rec, "conv1")
    assert len(conv1.scale_w) == 20  # per output channel
    assert len(record.layer_entry(rec, "ip1").scale_w) == 1  # InnerProduct: per tensor


def test_fake_quant_accuracy_close_to_float(quantized):
    tmp, _, _ = quantized
    x, labels = _digits()
    x, labels = x[64:1064], labels[64:1064]  # digits not used for calibration
    fp = Net(str(LENET), str(LENET_W), TEST)
    fq = Net(str(tmp / "out/lenet_fake_quant_model.prototxt"), str(tmp / "out/lenet_fake_quant_weights.caffemodel"),
             TEST)
    acc = []
    for net in (fp, fq):
        pred = np.concatenate([net.forward(data=x[i:i + 250])["prob"].argmax(1) for i in range(0, len(x), 250)])
        acc.append(float(np.mean(pred == labels)))
    assert acc[1] >= acc[0] - 0.005, acc


def test_fake_quant_model_structure(quantized):
    tmp, _, _ = quantized
    net = io.read_prototxt(tmp / "out/lenet_fake_quant_model.prototxt")
    names = [(lp.name, lp.type) for lp in net.layer]
    i = names.index(("conv1", "Convolution"))
    assert names[i - 1] == ("conv1_quant", "Quant") and names[i + 1] == ("conv1_dequant", "DeQuant")
    assert ("pool1_quant", "Quant") in names and ("pool1_antiquant", "AntiQuant") in names
    # original blob names keep their meaning: conv1's DeQuant writes "conv1"
    dq = net.layer[i + 1]
    assert list(dq.top) == ["conv1"]
    assert not any(lp.type == "IFMR" for lp in net.layer)


def test_deploy_model_integer_weights_and_simulation(quantized):
    """Each quantized layer of the deploy model, run in integer arithmetic on the same input as the
    fake-quant model, gives the fake-quant output within one quantization step."""
    tmp, _, _ = quantized
    w = io.load_weights(tmp / "out/lenet_deploy_weights.caffemodel")
    assert w["conv1"][0].dtype == np.int8 and w["conv1"][1].dtype == np.int32
    assert w["conv1_dequant"][0].dtype == np.uint64
    x, _ = _digits()
    x = x[2000:2100]
    fq = Net(str(tmp / "out/lenet_fake_quant_model.prototxt"),
             str(tmp / "out/lenet_fake_quant_weights.caffemodel"), TEST)
    dep = Net(str(tmp / "out/lenet_deploy_model.prototxt"), str(tmp / "out/lenet_deploy_weights.caffemodel"), TEST)
    fq.forward(data=x)
    dep.forward(data=x)
    rec = record.read_record(tmp / "out/lenet_quant_param_record.txt")
    for layer in ("conv1", "conv2", "ip1", "ip2"):
        bottom = dep.bottom_names[f"{layer}_quant"][0]
        dep.blobs[bottom].data = fq.blobs[bottom].data.copy()
        dep.forward(start=f"{layer}_quant", end=f"{layer}_dequant")
        entry = record.layer_entry(rec, layer)
        step = np.asarray(entry.scale_w, np.float64) * record.activation_entry(entry, 0).scale_d
        out = dep.top_names[f"{layer}_dequant"][0]
        diff = np.abs(dep.blobs[out].data - fq.blobs[out].data)
        per_channel = diff.max(axis=tuple(a for a in range(diff.ndim) if a != 1)) if step.size > 1 else diff.max()
        assert np.all(per_channel <= step * 1.001), (layer, np.max(per_channel / step))
    # end to end the two models agree on the class of almost every digit
    dep.forward(data=x)
    agree = np.mean(dep.blobs["prob"].data.argmax(1) == fq.blobs["prob"].data.argmax(1))
    assert agree >= 0.99


def test_quant_json_maps_layers(quantized):
    tmp, _, _ = quantized
    mapping = json.loads((tmp / "out/lenet_quant.json").read_text())
    assert mapping["layers"]["conv1"]["origin"] == ["conv1"] and mapping["layers"]["conv1"]["quantized"]
    assert mapping["layers"]["conv1_quant"]["inserted_for"] == "conv1"


def test_convert_model_reproduces_save_model_byte_for_byte(quantized, tmp_path):
    tmp, _, _ = quantized
    amct.convert_model(str(LENET), str(LENET_W), str(tmp / "record.txt"), str(tmp_path / "lenet"))
    for kind in KINDS:
        assert (tmp_path / f"lenet_{kind}").read_bytes() == (tmp / "out" / f"lenet_{kind}").read_bytes(), kind


def test_convert_model_names_the_record_a_factor_is_missing_from(quantized, tmp_path):
    tmp, _, _ = quantized
    rec = record.read_record(tmp / "record.txt")
    rec.layers["ip1"].scale_w = []
    bad = tmp_path / "no_scale_w.txt"
    record.write_record(rec, bad)
    with pytest.raises(record.RecordError, match=r"no_scale_w.txt: Cannot find scale_w of layer 'ip1' in record file"):
        amct.convert_model(str(LENET), str(LENET_W), str(bad), str(tmp_path / "lenet"))
    assert not list(tmp_path.glob("lenet_*"))
    rec = record.read_record(tmp / "record.txt")
    rec.layers["ip1"].record_d = []  # an entry of weight factors only: convert runs no calibration to fill it
    record.write_record(rec, tmp_path / "no_record_d.txt")
    with pytest.raises(record.RecordError, match=r"no_record_d.txt: Cannot find scale_d of layer 'ip1' in record "
                                                 r"file: give its entry a record_d \{ scale_d offset_d index \}"):
        amct.convert_model(str(LENET), str(LENET_W), str(tmp_path / "no_record_d.txt"), str(tmp_path / "lenet"))


@pytest.mark.parametrize("edit, message", [
    (lambda e: setattr(e, "shift_bit", [17] * 20), r"shift_bit values must be all 0 or all integers in \[1, 16\]"),
    (lambda e: setattr(e, "shift_bit", [0] + [3] * 19), r"\(mixed zero/non-zero is not allowed\), got \[0, 3, 3"),
    # conv1 has a bias, ip2's deq_scale is checked as well: both refuse an overflowing scale_w * scale_d
    (lambda e: (setattr(e, "scale_w", [3e38] * 20), setattr(e.record_d[0], "scale_d", 100.0)),
     r"scale_w \* scale_d must be finite and > 0"),
])
def test_convert_model_refuses_factors_the_dequant_layer_cannot_take(quantized, tmp_path, edit, message):
    """A hand-edited record whose shift_bit or deq_scale the DeQuant layer refuses is refused by convert_model,
    naming the layer, and nothing is written (it used to write a fake-quant model that could not be loaded)."""
    tmp, _, _ = quantized
    rec = record.read_record(tmp / "record.txt")
    edit(rec.layers["conv1"])
    bad = tmp_path / "bad.txt"
    record.write_record(rec, bad)
    with pytest.raises(record.RecordError, match=f"bad.txt: layer 'conv1': .*{message}"):
        amct.convert_model(str(LENET), str(LENET_W), str(bad), str(tmp_path / "lenet"))
    assert not list(tmp_path.glob("lenet_*"))


def test_a_layer_without_bias_refuses_an_overflowing_deq_scale(tmp_path):
    """The deq_scale check of a layer without bias (none quantizes a bias there to say it)."""
    proto = tmp_path / "nobias.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 '
                     'dim: 6 } } }\nlayer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                     'convolution_param { num_output: 4 kernel_size: 3 bias_term: false weight_filler { '
                     'type: "gaussian" std: 0.3 } } }\n')
    weights = tmp_path / "nobias.caffemodel"
    Net(str(proto), TEST, seed=1).save(str(weights))
    rec = record.Record()
    rec.layers["conv"] = entry = record.LayerRecord(scale_w=[1e30] * 4, offset_w=[0] * 4)
    act = entry.activation(0, create=True)
    act.scale_d, act.offset_d = 1e10, 0
    path = tmp_path / "record.txt"
    record.write_record(rec, path)
    with pytest.raises(record.RecordError, match=r"layer 'conv': scale_w \* scale_d must be finite and > 0"):
        amct.convert_model(str(proto), str(weights), str(path), str(tmp_path / "out" / "m"))
    assert not (tmp_path / "out").exists()


def test_convert_model_rejects_quantized_models(quantized, tmp_path):
    tmp, _, _ = quantized
    with pytest.raises(AmctError, match="already quantized"):
        amct.convert_model(str(tmp / "out/lenet_fake_quant_model.prototxt"),
                           str(tmp / "out/lenet_fake_quant_weights.caffemodel"), str(tmp / "record.txt"),
                           str(tmp_path / "again"))
    assert not list(tmp_path.iterdir())


def test_save_model_without_calibration_names_the_layer(tmp_path):
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(LENET), str(LENET_W))
    graph = amct.init(str(config), str(LENET), str(LENET_W), str(tmp_path / "record.txt"))
    amct.weights_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    amct.activation_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    with pytest.raises(RuntimeError, match=r"record.txt: Cannot find scale_d of layer 'conv1' in record file"):
        amct.save_model(graph, "Both", str(tmp_path / "out/model"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(AmctError, match="save_type"):
        amct.save_model(graph, "Everything", str(tmp_path / "out/model"))


def test_convert_model_with_fusion_settings_only_quantizes_nothing(tmp_path, caplog):
    """A record of fusion settings alone (what calibrate writes when no layer is quantized): the float model is
    saved, with a warning."""
    rec = tmp_path / "settings_only.txt"
    rec.write_text('record { key: "conv1" value { skip_fusion: true } }\n')
    caplog.set_level("WARNING", logger="amct_caffe")
    paths = amct.convert_model(str(LENET), str(LENET_W), str(rec), str(tmp_path / "out/model"))
    assert "no record entry gives quantization factors" in caplog.text
    assert "Quant" not in Path(paths["fake_quant_model"]).read_text()


def test_save_model_failing_after_the_fake_quant_model_was_written_ahead_leaves_nothing(quantized, tmp_path,
                                                                                        monkeypatch):
    """The fake-quant model is being written while the deploy model is built: a failure there removes it."""
    from amct_caffe.api import outputs
    from amct_caffe.passes.quantized_models import DEPLOY

    _, graph, _ = quantized
    real = outputs.build_quantized_graph

    def failing(float_graph, targets, rec, kind, codes=None):
        if kind == DEPLOY:
            raise AmctError("the deploy model cannot be built")
        return real(float_graph, targets, rec, kind, codes)

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept/lenet_quant.json").write_text("an earlier run's")
    monkeypatch.setattr(outputs, "build_quantized_graph", failing)
    for save_path in (tmp_path / "new/dir/lenet", tmp_path / "kept/lenet"):
        with pytest.raises(AmctError, match="deploy model cannot be built"):
            amct.save_model(graph, "Both", str(save_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["kept", "kept/lenet_quant.json"]
    assert (tmp_path / "kept/lenet_quant.json").read_text() == "an earlier run's"


@pytest.mark.parametrize("record_file", [None, 3, ""])
def test_init_refuses_a_record_path_that_is_no_path(tmp_path, record_file):
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(LENET), str(LENET_W))
    with pytest.raises(AmctError, match="scale_offset_record_file (must be a file path|is empty)"):
        amct.init(str(config), str(LENET), str(LENET_W), record_file)


@pytest.mark.parametrize("save_path", [None, 7, "", "out/"])
def test_every_saving_call_refuses_a_save_path_that_is_no_prefix(quantized, tmp_path, monkeypatch, save_path):
    """Before this check, save_path None wrote None_fake_quant_model.prototxt & co. into the working
    directory; now every call that saves refuses it, before any work, and writes nothing."""
    from amct_caffe.api.workflow import calibrate

    monkeypatch.chdir(tmp_path)
    x = np.zeros((4, 1, 28, 28), np.float32)
    _, graph, paths = quantized
    record = paths["quant_param_record_txt"]
    calls = {
        "calibrate": lambda: calibrate(str(LENET), str(LENET_W), [{"data": x}], save_path, 1, progress=False),
        "fallback": lambda: amct.calibrate_with_fallback(str(LENET), str(LENET_W), [{"data": x}], save_path, 1,
                                                         progress=False),
        "label_free": lambda: amct.label_free_retrain(str(LENET), str(LENET_W), [{"data": x}], save_path,
                                                      progress=False),
        "convert": lambda: amct.convert_model(str(LENET), str(LENET_W), str(record), save_path),
        "save_model": lambda: amct.save_model(graph, "Both", save_path),
    }
    for name, call in calls.items():
        with pytest.raises(AmctError, match="save_path"):
            call()
        assert not list(tmp_path.iterdir()), name


def test_every_long_call_refuses_an_output_that_is_an_input_before_drawing_data(tmp_path):
    """A save_path whose deploy prototxt would be the model file: calibrate, the fallback and label-free QAT
    refuse it before drawing a batch (they used to calibrate, or search, first), and write nothing."""
    from amct_caffe.api.workflow import calibrate

    model = tmp_path / "m_deploy_model.prototxt"
    model.write_bytes(LENET.read_bytes())
    drawn = []

    def data():
        drawn.append(1)
        yield {"data": np.zeros((4, 1, 28, 28), np.float32)}

    calls = {
        "calibrate": lambda: calibrate(str(model), str(LENET_W), data(), str(tmp_path / "m"), 1, progress=False),
        "fallback": lambda: amct.calibrate_with_fallback(str(model), str(LENET_W), data(), str(tmp_path / "m"), 1,
                                                         progress=False),
        "label_free": lambda: amct.label_free_retrain(str(model), str(LENET_W), data(), str(tmp_path / "m"),
                                                      progress=False),
    }
    for name, call in calls.items():
        with pytest.raises(AmctError, match="is the same file as the input model_file"):
            call()
        assert not drawn, name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m_deploy_model.prototxt"], name
    assert model.read_bytes() == LENET.read_bytes()


def test_a_config_that_enables_no_layer_warns_that_the_models_are_float(tmp_path, caplog):
    def disable_all(config):
        for value in config.values():
            if isinstance(value, dict) and "quant_enable" in value:
                value["quant_enable"] = False

    graph, mm, mw = calibration_model(tmp_path, LENET, LENET_W, edit_config=disable_all)
    Net(mm, mw, TEST).forward(data=_digits()[0][:32])
    with caplog.at_level("WARNING", logger="amct_caffe"):
        paths = amct.save_model(graph, "Both", str(tmp_path / "out/lenet"))
    assert "no layer is quantized (the config enables none)" in caplog.text
    types = {lp.type for lp in io.load_prototxt(paths["deploy_model"]).layer}
    assert not types & {"Quant", "DeQuant", "AntiQuant"}


@pytest.mark.parametrize("bits", [12, 16])
def test_data_of_more_than_8_bits_calibrates_as_the_exact_search_does(tmp_path, bits):
    """The streaming IFMR's histogram cannot resolve a step of 12- or 16-bit data (at 16 bits its losses went
    negative and the search failed with an IndexError; at 12 bits it picked a clip 12 % worse): such layers use
    the exact search in any net, so the record is that of an ifmr="exact" net."""
    with np.load(MNIST) as z:
        x = z["images"][:128, None].astype(np.float32) / 256

    def edit(c):
        c["conv2"]["activation_quant_params"]["num_bits"] = bits

    records = []
    for mode in ("stream", "exact"):
        graph, mm, mw = calibration_model(tmp_path / mode, LENET, LENET_W, batch_num=2, edit_config=edit) \
            if (tmp_path / mode).mkdir() is None else None
        net = Net(mm, mw, TEST, ifmr=mode)
        for b in range(2):
            net.forward(data=x[b * 64:(b + 1) * 64])
        amct.save_model(graph, "Both", str(tmp_path / mode / "out"))
        records.append((tmp_path / mode / "out_quant_param_record.txt").read_text())
    assert records[0] == records[1]


TRAIN_TEST = MODELS / "lenet_mnist/lenet_train_test.prototxt"


@pytest.mark.parametrize("call", ["create_quant_config", "init", "convert_model", "create_quant_retrain_config",
                                  "create_quant_retrain_model", "save_quant_retrain_model"])
def test_the_guides_calls_refuse_a_missing_weights_file(tmp_path, call):
    """weights_file is a required string in the guide: None is refused before anything is written (it
    used to quantize nothing and save models without weights)."""
    config, record_file = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, str(LENET), str(LENET_W))
    before = sorted(p.name for p in tmp_path.iterdir())
    calls = {
        "create_quant_config": lambda: amct.create_quant_config(str(tmp_path / "c2.json"), str(LENET), None),
        "init": lambda: amct.init(config, str(LENET), None, record_file),
        "convert_model": lambda: amct.convert_model(str(LENET), None, record_file, str(tmp_path / "out/m")),
        "create_quant_retrain_config": lambda: amct.create_quant_retrain_config(str(tmp_path / "r.json"),
                                                                                str(TRAIN_TEST), None),
        "create_quant_retrain_model": lambda: amct.create_quant_retrain_model(
            str(TRAIN_TEST), None, config, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), record_file),
        "save_quant_retrain_model": lambda: amct.save_quant_retrain_model(str(TRAIN_TEST), None, "Both",
                                                                          str(tmp_path / "out/m")),
    }
    name = "retrained_weights_file" if call == "save_quant_retrain_model" else "weights_file"
    with pytest.raises(AmctError, match=f"^{name} is None: give the path of the file"):
        calls[call]()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_weights_quantize_model_can_be_called_again_after_its_files_failed(tmp_path):
    """A bad output path fails the weight step before anything is written; the same graph then takes the
    call again (it used to say "call it once" and fail at save_model for want of scale_w)."""
    config, record_file = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, str(LENET), str(LENET_W))
    graph = amct.init(config, str(LENET), str(LENET_W), record_file)
    (tmp_path / "taken").mkdir()
    with pytest.raises(AmctError, match="directory"):
        amct.weights_quantize_model(graph, str(tmp_path / "taken"), str(tmp_path / "m.caffemodel"))
    assert not (tmp_path / "m.caffemodel").exists()
    amct.weights_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    assert "scale_w" in (tmp_path / "record.txt").read_text()
    amct.activation_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))


def test_legacy_4d_blobs_of_an_old_caffemodel_are_quantized_as_the_current_ones(tmp_path):
    """Old Caffe wrote every blob 4-D (num, channels, height, width): an InnerProduct weight (1, 1, 500, 800).
    Caffe reshapes them on load; the guide's flow used to refuse them ("does not match the weight shape")."""
    from amct_caffe.io.blobs import array_to_blob
    from amct_caffe.io.schema import caffe_pb

    model = caffe_pb().NetParameter.FromString(LENET_W.read_bytes())
    for layer in model.layer:
        if layer.type == "InnerProduct":
            arrays = [io.blobs.blob_to_array(b, layer.name) for b in layer.blobs]
            del layer.blobs[:]
            for a in arrays:
                array_to_blob(a.reshape((1,) * (4 - a.ndim) + a.shape), layer.blobs.add())
    assert list(model.layer[-2].blobs[0].shape.dim) == [1, 1, 10, 500]
    legacy = tmp_path / "legacy.caffemodel"
    legacy.write_bytes(model.SerializeToString())
    records = []
    for name, weights in (("current", LENET_W), ("legacy", legacy)):
        (tmp_path / name).mkdir()
        config, record_file = str(tmp_path / name / "c.json"), str(tmp_path / name / "r.txt")
        amct.create_quant_config(config, str(LENET), str(weights))
        graph = amct.init(config, str(LENET), str(weights), record_file)
        amct.weights_quantize_model(graph, str(tmp_path / name / "m.prototxt"), str(tmp_path / name / "m.caffemodel"))
        records.append((tmp_path / name / "r.txt").read_text())
    assert records[0] == records[1]


def test_convert_model_takes_the_empty_record_of_a_config_quantizing_nothing(tmp_path, caplog):
    """A config with every layer disabled: calibrate's record is empty and save_model writes the float model
    with a warning; convert_model on that record writes the same files (it refused the record)."""
    config, record_file = tmp_path / "c.json", str(tmp_path / "r.txt")
    amct.create_quant_config(str(config), str(LENET), str(LENET_W))
    content = json.loads(config.read_text())
    for entry in content.values():
        if isinstance(entry, dict):
            entry["quant_enable"] = False
    config.write_text(json.dumps(content))
    graph = amct.init(str(config), str(LENET), str(LENET_W), record_file)
    amct.weights_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    amct.activation_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    saved = amct.save_model(graph, "Both", str(tmp_path / "saved/lenet"))
    caplog.set_level("WARNING", logger="amct_caffe")
    converted = amct.convert_model(str(LENET), str(LENET_W), record_file, str(tmp_path / "converted/lenet"))
    assert "no layer is quantized" in caplog.text
    for kind, path in saved.items():
        assert Path(converted[kind]).read_bytes() == Path(path).read_bytes(), kind


def test_weights_quantize_model_writes_its_model_and_the_record_together(tmp_path):
    """A record file that cannot be written (a directory of that name): the modified model is not left
    behind either (it was written first and stayed)."""
    config, record_dir = str(tmp_path / "config.json"), tmp_path / "rec"
    record_dir.mkdir()
    amct.create_quant_config(config, str(LENET), str(LENET_W))
    graph = amct.init(config, str(LENET), str(LENET_W), str(record_dir / "record.txt"))
    (record_dir / "record.txt").unlink()
    (record_dir / "record.txt").mkdir()
    (tmp_path / "mod").mkdir()
    with pytest.raises(AmctError, match="record.txt"):
        amct.weights_quantize_model(graph, str(tmp_path / "mod/m.prototxt"), str(tmp_path / "mod/m.caffemodel"))
    assert list((tmp_path / "mod").iterdir()) == []
