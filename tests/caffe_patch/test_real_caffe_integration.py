"""caffe_patch in official Caffe: install.py on the source, build, then our C++ layers against the executor.

Opt-in (AMCT_REAL_CAFFE, see tests/conftest.py). The patched build is cached (patched_caffe.py), so
only the first run pays the Caffe build. Checked:

(a) the calibration models of LeNet and open_nsfw made by our API write, in real Caffe, the
    record the embedded executor writes (scale_d within 1e-6 relative, the rest equal);
(b) the fake-quant models give the executor's outputs within 1e-5, and each Quant / DeQuant /
    AntiQuant layer maps Caffe's own input to Caffe's output exactly as the executor's layer does;
(c) the user guide's custom.proto (ReLU6, ROIPooling) parses in both;
(d) SearchN writes the executor's shift_bit and DeQuant's shift emulation matches bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import io
from amct_caffe.io.record import read_record
from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime.layers import quant_ops as amct_layers
from tests.caffe_patch.patched_caffe import (GUIDE_CUSTOM_PROTO, REPO, patched_caffe, pristine_source,
                                            run_install)
from tests.api.flow import calibration_model
from tests.golden import MODELS, SHARED

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow]

_LOG = logging.getLogger(__name__)
SCALE_RTOL = 1e-6
OUTPUT_TOL = 1e-5
# The guide's patch files (the recurrent calibration and quant layers), in the order install.py applies them.
PATCHES = ("lstm_calibration_layer.cpp.patch", "lstm_calibration_layer.hpp.patch", "lstm_quant_layer.cpp.patch",
           "lstm_quant_layer.hpp.patch")


# ------------------------------------------------------------------ running pycaffe
@pytest.fixture(scope="module")
def pycaffe():
    return patched_caffe()


def run_caffe(pycaffe_path: Path, code: str, *args, verbose: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` (argv = args) in a Python that imports the patched pycaffe; fail on error."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe_path), str(REPO)]),
               GLOG_minloglevel="0" if verbose else "2", GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=1800, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


CAFFE_CALIBRATE = """
import sys, numpy as np, caffe
proto, weights, *batches = sys.argv[1:]
caffe.set_mode_cpu()
net = caffe.Net(proto, weights, caffe.TEST)
name = net.inputs[0]
for path in batches:
    x = np.load(path)
    net.blobs[name].reshape(*x.shape)
    net.blobs[name].data[...] = x
    net.forward()
"""

CAFFE_FORWARD = """
import json, sys, numpy as np, caffe
proto, weights, xfile, out = sys.argv[1:5]
caffe.set_mode_cpu()
net = caffe.Net(proto, weights, caffe.TEST)
x = np.load(xfile)
name = net.inputs[0]
net.blobs[name].reshape(*x.shape)
net.reshape()
net.blobs[name].data[...] = x
net.forward()
names = list(net.blobs.keys())
np.savez(out, *[net.blobs[k].data for k in names])
print(json.dumps({"blobs": names, "outputs": list(net.outputs)}))
"""


def caffe_forward(pycaffe_path, proto, weights, x, tmp: Path) -> tuple[dict, list[str]]:
    np.save(tmp / "x.npy", x)
    res = run_caffe(pycaffe_path, CAFFE_FORWARD, proto, weights, tmp / "x.npy", tmp / "blobs.npz")
    meta = json.loads(res.stdout.strip().splitlines()[-1])
    z = np.load(tmp / "blobs.npz")
    return {name: z[f"arr_{i}"] for i, name in enumerate(meta["blobs"])}, meta["outputs"]


# ------------------------------------------------------------------ the two models
def _lenet_batches():
    z = np.load(SHARED / "data/mnist_5k.npz")
    x = z["images"][:, None].astype(np.float32) * np.float32(0.00390625)
    return [x[0:32], x[32:64]], x[1000:1100]


def _nsfw_batches():
    from PIL import Image
    files = sorted((SHARED / "data/imagenet_samples").glob("*.JPEG"))[:6]
    mean = np.array([104, 117, 123], np.float32)[:, None, None]
    imgs = [(np.asarray(Image.open(f).convert("RGB").resize((224, 224)), np.float32)[:, :, ::-1]
             .transpose(2, 0, 1) - mean) for f in files]
    x = np.stack(imgs).astype(np.float32)
    return [x[0:2], x[2:4]], x[4:6]


CASES = {
    "lenet": (MODELS / "lenet_mnist/lenet.prototxt", MODELS / "lenet_mnist/lenet_iter_10000.caffemodel",
              _lenet_batches),
    "open_nsfw": (MODELS / "open_nsfw/deploy.prototxt", MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel",
                  _nsfw_batches),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def calibrated(request, pycaffe, tmp_path_factory):
    """Calibrate one model in the executor and, from the same starting record, in real Caffe."""
    name = request.param
    proto, weights, batches_of = CASES[name]
    tmp = tmp_path_factory.mktemp(name)
    batches, held_out = batches_of()
    graph, _, _ = calibration_model(tmp, proto, weights, len(batches), name="calibration")
    record, cal_proto, cal_weights = (tmp / "record.txt", tmp / "calibration.prototxt",
                                      tmp / "calibration.caffemodel")
    # Real Caffe: the same model writing its own copy of the (weights-only) record.
    caffe_record = tmp / "record_caffe.txt"
    shutil.copy(record, caffe_record)
    caffe_proto = tmp / "calibration_caffe.prototxt"
    text = cal_proto.read_text()
    assert f'record_file_path: "{record}"' in text
    caffe_proto.write_text(text.replace(f'"{record}"', f'"{caffe_record}"'))
    paths = []
    for i, x in enumerate(batches):
        paths.append(tmp / f"batch{i}.npy")
        np.save(paths[-1], x)
    log = run_caffe(pycaffe, CAFFE_CALIBRATE, caffe_proto, cal_weights, *paths, verbose=True).stderr
    # The embedded executor.
    net = Net(str(cal_proto), str(cal_weights), TEST, ifmr="exact")
    for x in batches:
        net.forward(**{net.inputs[0]: x})
    fake = amct.save_model(graph, "Both", str(tmp / f"out/{name}"))
    return dict(name=name, tmp=tmp, graph=graph, record=record, caffe_record=caffe_record, log=log,
                held_out=held_out, fake=fake,
                fake_proto=tmp / f"out/{name}_fake_quant_model.prototxt",
                fake_weights=tmp / f"out/{name}_fake_quant_weights.caffemodel")


def _records(path):
    rec = read_record(path)
    out = {}
    for key, v in rec.layers.items():
        out[key] = dict(scale_w=list(v.scale_w), offset_w=list(v.offset_w), shift_bit=list(v.shift_bit),
                              acts={a.index: (a.scale_d, a.offset_d, a.num_bits_d, a.channels, a.height,
                                              a.width) for a in v.record_d})
    return out


# ------------------------------------------------------------------ (a)
def test_calibration_record_equals_the_executors(calibrated):
    ours, caffe = _records(calibrated["record"]), _records(calibrated["caffe_record"])
    assert ours.keys() == caffe.keys()
    worst = 0.0
    for layer, e in ours.items():
        c = caffe[layer]
        assert c["scale_w"] == e["scale_w"] and c["offset_w"] == e["offset_w"], layer
        assert c["acts"].keys() == e["acts"].keys() and e["acts"], layer
        for index, (scale, *rest) in e["acts"].items():
            c_scale, *c_rest = c["acts"][index]
            assert c_rest == rest, (layer, index)
            worst = max(worst, abs(c_scale - scale) / scale)
    assert worst <= SCALE_RTOL, worst
    _LOG.info("%s: %d layers, worst scale_d relative difference %.3g", calibrated["name"], len(ours), worst)


def test_calibration_logs_like_the_executor(calibrated):
    """Caffe's log says what the executor's does: each batch, then the factors and the layers they are for."""
    log = calibrated["log"]
    ifmr = [lp.name for lp in io.read_prototxt(calibrated["tmp"] / "calibration.prototxt").layer
            if lp.type == "IFMR"]
    for name in ifmr:
        assert f"IFMR '{name}': batch 1/2 recorded" in log and f"IFMR '{name}': batch 2/2 recorded" in log
        assert re.search(rf"IFMR '{re.escape(name)}': scale_d=\S+ offset_d=-?\d+ written for \['", log), name


# ------------------------------------------------------------------ (b)
# End to end the fake-quant models agree within OUTPUT_TOL only where no activation sits on a
# rounding boundary: Caffe's float layers (OpenBLAS) and the executor's differ by ~1e-7 relative,
# and in ResNet-50 (open_nsfw) that noise moves about one code in 10^6 across a Quant rounding
# boundary; each such flip is a full quantization step that the next layers spread (about 0.1% of
# the codes differ by the last block, prob by ~1e-3). So open_nsfw is checked end to end for the
# class and a loose bound, and, like LeNet, layer by layer at OUTPUT_TOL (the next test). Where the
# executor's GEMMs can round like Caffe's (AVX-512 OpenBLAS kernels on both sides) the float layers
# agree bit for bit and test_real_caffe_exact_gemm.py holds open_nsfw end to end at OUTPUT_TOL.
END_TO_END_TOL = {"lenet": OUTPUT_TOL, "open_nsfw": 1e-2}


def test_fake_quant_model_outputs_equal_the_executors(calibrated, pycaffe):
    x = calibrated["held_out"]
    blobs, outputs = caffe_forward(pycaffe, calibrated["fake_proto"], calibrated["fake_weights"], x,
                                   calibrated["tmp"])
    ours = Net(str(calibrated["fake_proto"]), str(calibrated["fake_weights"]), TEST).forward(data=x)
    assert sorted(outputs) == sorted(ours)
    for name in outputs:
        diff = float(np.abs(blobs[name] - ours[name]).max())
        _LOG.info("%s: output %s, max |caffe - executor| = %.3g", calibrated["name"], name, diff)
        assert diff <= END_TO_END_TOL[calibrated["name"]] * max(1.0, float(np.abs(ours[name]).max())), (name, diff)
        np.testing.assert_array_equal(blobs[name].argmax(axis=1), ours[name].argmax(axis=1))


CAFFE_LAYER_BY_LAYER = """
import json, sys, numpy as np, caffe
from amct_caffe.runtime import Net, TEST
proto, weights, xfile = sys.argv[1:4]
x = np.load(xfile)
caffe.set_mode_cpu()
ref = caffe.Net(proto, weights, caffe.TEST)
name = ref.inputs[0]
ref.blobs[name].reshape(*x.shape)
ref.reshape()
ref.blobs[name].data[...] = x
ours = Net(proto, weights, TEST)
ours.forward(**{name: x})
layers = ours.layer_dict
rows = []
for i, lname in enumerate(ref._layer_names):
    bottoms = [ref._blobs[j].data.copy() for j in ref._bottom_ids(i)]
    ref._forward(i, i)
    layer = layers.get(lname)
    if layer is None or layer.type == "Input":   # Caffe's own Split layers; inputs
        continue
    got = layer.forward(bottoms)
    tops = [ref._blobs[j].data for j in ref._top_ids(i)]
    err = max(float(np.abs(g - t).max()) / max(1.0, float(np.abs(t).max())) for g, t in zip(got, tops))
    rows.append([lname, layer.type, err])
print(json.dumps(rows))
"""


def test_every_layer_given_caffes_input_gives_the_executors_output(calibrated, pycaffe):
    """Layer by layer through the fake-quant model: each layer of the executor, fed the bottoms Caffe fed
    its own layer, returns Caffe's tops within OUTPUT_TOL (relative to max(1, |top|)); ours exactly."""
    np.save(calibrated["tmp"] / "x.npy", calibrated["held_out"])
    res = run_caffe(pycaffe, CAFFE_LAYER_BY_LAYER, calibrated["fake_proto"], calibrated["fake_weights"],
                    calibrated["tmp"] / "x.npy")
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert {t for _, t, _ in rows} >= {"Quant", "DeQuant", "Convolution", "InnerProduct"}
    bad = [r for r in rows if r[2] > OUTPUT_TOL or (r[1] in ("Quant", "DeQuant", "AntiQuant") and r[2] != 0)]
    assert not bad, bad
    _LOG.info("%s: %d layers, worst relative difference %.3g", calibrated["name"], len(rows),
              max(r[2] for r in rows))


def test_each_amct_layer_maps_caffes_input_like_the_executor(calibrated, pycaffe):
    """Every Quant/DeQuant/AntiQuant layer, given the input Caffe gave it, returns Caffe's output exactly."""
    x = calibrated["held_out"]
    blobs, _ = caffe_forward(pycaffe, calibrated["fake_proto"], calibrated["fake_weights"], x,
                             calibrated["tmp"])
    weights = io.load_weights(calibrated["fake_weights"])
    checked = 0
    for lp in _observable_layers(calibrated["fake_proto"], ("Quant", "DeQuant", "AntiQuant")):
        bottom, top = blobs[lp.bottom[0]], blobs[lp.top[0]]
        if lp.type == "Quant":
            qp = lp.quant_param
            want = amct_layers.Quant(bottom, qp.scale, qp.offset, qp.num_bits_d or 8)
        elif lp.type == "DeQuant":
            want = amct_layers.DeQuant(bottom, *weights[lp.name])
        else:
            want = amct_layers.AntiQuant(bottom)
        np.testing.assert_array_equal(top, want, err_msg=lp.name)
        checked += 1
    assert checked >= 3


def _observable_layers(proto: Path, types: tuple[str, ...]):
    """Layers of ``types`` whose input and output Caffe's final blobs still hold (no later in-place write)."""
    net = io.read_prototxt(proto)
    last_writer = {}
    for i, lp in enumerate(net.layer):
        for t in lp.top:
            last_writer[t] = i
    return [lp for i, lp in enumerate(net.layer) if lp.type in types
            and all(last_writer.get(b, -1) <= i for b in [*lp.bottom, *lp.top])]


# ------------------------------------------------------------------ (c)
def test_guide_custom_proto_parses_in_caffe_and_in_the_executor(pycaffe, tmp_path):
    merged = pycaffe.parent / "src/caffe/proto/caffe.proto"
    model = tmp_path / "custom.prototxt"
    model.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "relu6" type: "ReLU6" bottom: "data" top: "relu6"
        relu6_param { negative_slope: 0.5 }
        roi_pooling_param { pooled_h: 7 pooled_w: 5 spatial_scale: 0.0625 } }
""")
    x = np.linspace(-4, 8, 18, dtype=np.float32).reshape(1, 2, 3, 3)
    code = """
import sys, numpy as np, caffe
from caffe.proto import caffe_pb2
from google.protobuf import text_format
net_param = text_format.Parse(open(sys.argv[1]).read(), caffe_pb2.NetParameter())
lp = net_param.layer[1]
roi = lp.roi_pooling_param
assert (lp.relu6_param.negative_slope, roi.pooled_h, roi.pooled_w) == (0.5, 7, 5)
assert caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["relu6_param"].number == 2060
net = caffe.Net(sys.argv[1], caffe.TEST)          # the C++ parser accepts both fields too
net.blobs["data"].data[...] = np.load(sys.argv[2])
y = net.forward()["relu6"]
print(repr(y.ravel().tolist()))
"""
    np.save(tmp_path / "x.npy", x)
    res = run_caffe(pycaffe, code, model, tmp_path / "x.npy")
    y = np.array(eval(res.stdout.strip().splitlines()[-1]), np.float32)  # noqa: S307 (our own output)
    np.testing.assert_array_equal(y, np.where(x < 0, 0.5 * x, np.minimum(x, 6)).ravel())
    executor = f"""
import amct_caffe
from amct_caffe import io
amct_caffe.set_caffe_proto({str(merged)!r})
lp = io.read_prototxt({str(model)!r}).layer[1]
roi = lp.roi_pooling_param
assert (lp.relu6_param.negative_slope, roi.pooled_h, roi.spatial_scale) == (0.5, 7, 0.0625)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", executor], capture_output=True, text=True, cwd=REPO,
                         check=False, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ------------------------------------------------------------------ (d)
def _with_search_n(proto: Path, record: Path, layers: dict[str, str], out: Path) -> None:
    """``proto`` plus a SearchN layer (2 batches, ``record``) on the float output of each of ``layers``."""
    net = io.read_prototxt(proto)
    by_name = {lp.name: lp for lp in net.layer}
    for name, ltype in layers.items():
        lp = net.layer.add()
        lp.name, lp.type = f"{name}_search_n", "SearchN"
        lp.bottom.append(by_name[name].top[0])
        p = lp.search_n_param
        p.batch_num, p.record_file_path = 2, str(record)
        p.layer_name.append(name)
        p.layer_type.append(ltype)
    io.write_prototxt(net, out)


def test_search_n_and_shift_dequant_equal_the_executors(pycaffe, tmp_path):
    (batches, held_out) = _lenet_batches()
    proto, weights, _ = CASES["lenet"]
    config, record = tmp_path / "config.json", tmp_path / "record.txt"
    amct.create_quant_config(str(config), str(proto), str(weights), batch_num=2)
    graph = amct.init(str(config), str(proto), str(weights), str(record))
    cal_proto, cal_weights = tmp_path / "cal.prototxt", tmp_path / "cal.caffemodel"
    amct.weights_quantize_model(graph, str(cal_proto), str(cal_weights))
    amct.activation_quantize_model(graph, str(cal_proto), str(cal_weights))
    net = Net(str(cal_proto), str(cal_weights), TEST, ifmr="exact")
    for x in batches:
        net.forward(data=x)
    layers = {"conv1": "Convolution", "conv2": "Convolution", "ip1": "InnerProduct"}
    records = {}
    for who in ("executor", "caffe"):
        rec = tmp_path / f"record_{who}.txt"
        shutil.copy(record, rec)
        search = tmp_path / f"search_{who}.prototxt"
        _with_search_n(cal_proto, rec, layers, search)
        paths = [tmp_path / f"b{i}.npy" for i in range(2)]
        for p, x in zip(paths, batches, strict=True):
            np.save(p, x)
        if who == "caffe":
            run_caffe(pycaffe, CAFFE_CALIBRATE, search, cal_weights, *paths)
        else:
            n = Net(str(search), str(cal_weights), TEST, ifmr="exact")
            for x in batches:
                n.forward(data=x)
        records[who] = _records(rec)
    for layer in layers:
        assert records["caffe"][layer]["shift_bit"] == records["executor"][layer]["shift_bit"], layer
        assert records["caffe"][layer]["scale_w"] == records["executor"][layer]["scale_w"], layer
        assert records["executor"][layer]["shift_bit"], layer
    # Fake-quant model from the record with shift bits: DeQuant emulates the int16 requantization.
    shutil.copy(tmp_path / "record_executor.txt", record)
    amct.save_model(graph, "Fakequant", str(tmp_path / "out/lenet"))
    fq_proto = tmp_path / "out/lenet_fake_quant_model.prototxt"
    fq_weights = tmp_path / "out/lenet_fake_quant_weights.caffemodel"
    w = io.load_weights(fq_weights)
    assert np.any(w["conv1_dequant"][1] > 0)
    blobs, _ = caffe_forward(pycaffe, fq_proto, fq_weights, held_out, tmp_path)
    checked = 0
    for lp in _observable_layers(fq_proto, ("DeQuant",)):
        want = amct_layers.DeQuant(blobs[lp.bottom[0]], *w[lp.name])
        np.testing.assert_array_equal(blobs[lp.top[0]], want, err_msg=lp.name)
        checked += 1
    assert checked >= 2


# ------------------------------------------------------------------ install.py on a fresh copy
def _snapshot(root: Path) -> dict:
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def test_install_on_a_fresh_copy_then_again_changes_nothing(pycaffe, tmp_path):
    pristine, _ = pristine_source()
    fresh = tmp_path / "caffe"
    shutil.copytree(pristine, fresh, symlinks=True)
    custom = tmp_path / "custom.proto"
    custom.write_text(GUIDE_CUSTOM_PROTO)
    res = run_install(fresh, custom)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("[INFO]") and "caffe.proto:" not in ln
             and not ln.startswith(("[INFO]Added", "[INFO]Moved stale protoc output"))]
    # The sdist's protoc-3 caffe.pb.h / caffe.pb.cc and the CMake build's caffe_pb2.py of the unmerged proto.
    assert res.stdout.count("[INFO]Moved stale protoc output") == 3, res.stdout
    assert lines[:8] == [f"[INFO]Begin to copy source files, header files and quant_lib to '{fresh}'",
                         f"[INFO]Finish copy source files, header files and quant_lib to '{fresh}'",
                         "[INFO]Begin to install patch.",
                         *(f"[INFO]Install patch '{name}' successfully." for name in PATCHES),
                         "[INFO]Finish install patch."]
    assert lines[8:11] == ['[INFO]Merge and replace "caffe.proto" success.',
                           '[INFO]Merge and replace "Makefile" success.',
                           '[INFO]Merge and replace "CMakeLists.txt" success.']
    before = _snapshot(fresh)
    res = run_install(fresh, custom)
    assert res.returncode == 0, res.stderr
    assert _snapshot(fresh) == before
    assert '[INFO]"caffe.proto" already holds the merged definitions; not replaced.' in res.stdout
    for name in PATCHES:
        assert f"[INFO]Patch '{name}' is already installed." in res.stdout
    # The cached, built tree is exactly what install.py makes of a fresh copy.
    built = pycaffe.parent
    for rel, (data, _) in before.items():
        if (pristine / rel).is_file() and (pristine / rel).read_bytes() == data or rel.suffix == ".bak":
            continue
        assert (built / rel).read_bytes() == data, rel
