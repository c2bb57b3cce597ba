"""The retrain (QAT) layers of caffe_patch in real Caffe against amct_caffe.quant.ulq / arq.

Opt-in (AMCT_REAL_CAFFE, see tests/conftest.py); the patched build is patched_caffe.py's cache. One
pycaffe subprocess runs every Caffe scenario below and saves the numbers; the tests compare them
with the Python functions:

- RetrainDataQuant: forward y and backward dx, dclip_max, dclip_min (in and out of place, 8 and
  12 bits, fixed_min) equal ulq_forward / ulq_backward (kernel backend) exactly; the NumPy
  reference's float64 sums are summed in another order, so its clip gradients agree within one
  float32 ulp. ClipCheck restores like UlqQuantizer step by step; ifmr_init starts from IFMR's
  grid; the TEST phase writes scale_d / offset_d into the record.
- RetrainWeightQuant: the fake-quantized weight the following Convolution / InnerProduct /
  Deconvolution uses equals arq_retrain_forward exactly; the float weight's gradient is the
  object layer's (arq_retrain_backward); x's gradient passes through.
- An SGD solver step moves clip_max, clip_min and the float weight by their gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from amct_caffe.quant import (UlqQuantizer, arq_retrain_backward, arq_retrain_forward, ifmr_search,
                              ulq_backward, ulq_forward, ulq_scale_offset)
from amct_caffe.quant.ifmr import IfmrParams
from amct_caffe.io.record import activation_entry, layer_entry, parse_record_text, read_record
from tests.caffe_patch.patched_caffe import REPO, patched_caffe

pytestmark = [pytest.mark.real_caffe, pytest.mark.slow]

F32 = np.float32


# ------------------------------------------------------------------ nets
def _input(*shapes) -> str:
    tops = "".join(f' top: "{n}"' for n in ("x", "t")[:len(shapes)])
    dims = "".join(" shape {" + "".join(f" dim: {d}" for d in s) + " }" for s in shapes)
    return f'layer {{ name: "data" type: "Input"{tops} input_param {{{dims} }} }}\n'


def ulq_net(param: str, shape, in_place: bool) -> str:
    top = "x" if in_place else "y"
    return ("force_backward: true\n" + _input(shape) +
            f'layer {{ name: "dq" type: "RetrainDataQuant" bottom: "x" top: "{top}" '
            f"retrain_data_quant_param {{ {param} }} }}\n")


def arq_net(layer_type: str, wshape, xshape, object_layer: str, channel_wise: bool) -> str:
    hw = f"h: {wshape[2]} w: {wshape[3]}" if len(wshape) == 4 else ""
    return ("force_backward: true\n" + _input(xshape) +
            'layer { name: "wq" type: "RetrainWeightQuant" bottom: "x" top: "xq" '
            'param { name: "obj_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 } '
            f'retrain_weight_quant_param {{ cout: {wshape[0]} cin: {wshape[1]} {hw} '
            f'layer_type: "{layer_type}" channel_wise: {str(channel_wise).lower()} }} }}\n'
            f'layer {{ name: "obj" bottom: "xq" top: "y" param {{ name: "obj_w" }} {object_layer} }}\n')


ULQ_CASES = {  # name: (retrain_data_quant_param, x shape, in place, num_bits, fixed_min, x scale, x shift)
    "int8": ("clip_max: 2.5 clip_min: -1.25", (2, 3, 4, 5), False, 8, False, 1.5, 0.0),
    "int8_in_place": ("clip_max: 1.75 clip_min: -2.0", (4, 2, 3, 3), True, 8, False, 1.5, 0.0),
    "int12_fixed_min": ("clip_max: 3.0 clip_min: -0.5 fixed_min: true num_bits: 12", (2, 4, 6), False,
                        12, True, 2.0, 1.0),
}

ARQ_CASES = {  # name: (layer_type, weight shape, x shape, object layer, channel_wise)
    "conv_channel_wise": ("Convolution", (4, 3, 3, 3), (2, 3, 6, 6),
                          'type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 bias_term: false }',
                          True),
    "inner_product": ("InnerProduct", (5, 12), (3, 12), 'type: "InnerProduct" inner_product_param '
                      '{ num_output: 5 bias_term: false }', False),
    "deconv_channel_wise": ("Deconvolution", (3, 4, 2, 2), (2, 3, 3, 3),
                            'type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 2 '
                            'bias_term: false }', True),
}

CLIP_STEPS = [None, (-1.5, -1.0), (-0.5, -1.0), (2.0, 0.25), (1.0, -0.75), (0.5, 0.5)]

SOLVER_NET = (_input((2, 3, 6, 6), (2, 4, 4, 4)) +
              'layer { name: "dq" type: "RetrainDataQuant" bottom: "x" top: "xq" '
              "retrain_data_quant_param { clip_max: 1.5 clip_min: -1.0 } }\n"
              'layer { name: "wq" type: "RetrainWeightQuant" bottom: "xq" top: "xq" '
              'param { name: "conv_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 } '
              'retrain_weight_quant_param { cout: 4 cin: 3 h: 3 w: 3 layer_type: "Convolution" } }\n'
              'layer { name: "conv" type: "Convolution" bottom: "xq" top: "y" param { name: "conv_w" } '
              "convolution_param { num_output: 4 kernel_size: 3 bias_term: false } }\n"
              'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }\n')
SOLVER = ('net: "{net}"\nbase_lr: 0.002\nlr_policy: "fixed"\nmomentum: 0\nweight_decay: 0\nmax_iter: 10\n'
          "display: 0\nsnapshot: 0\nsolver_mode: CPU\n")


# ------------------------------------------------------------------ the Caffe side
CAFFE_SCRIPT = r"""
import json, sys, numpy as np, caffe
caffe.set_mode_cpu()
work = sys.argv[1]
spec = json.load(open(work + "/spec.json"))
load = lambda name: np.load(f"{work}/{name}.npy")
out = {}

for name, c in spec["ulq"].items():
    net = caffe.Net(c["proto"], caffe.TRAIN)
    top = c["top"]
    net.blobs["x"].data[...] = load(name + "_x")
    net.forward()
    out[name + "_y"] = net.blobs[top].data.copy()
    out[name + "_clip"] = np.array([net.params["dq"][0].data[0], net.params["dq"][1].data[0]])
    net.blobs[top].diff[...] = load(name + "_g")
    net.backward()
    out[name + "_dx"] = net.blobs["x"].diff.copy()
    out[name + "_dclip"] = np.array([net.params["dq"][0].diff[0], net.params["dq"][1].diff[0]])

c = spec["clip_check"]
net = caffe.Net(c["proto"], caffe.TRAIN)
net.blobs["x"].data[...] = load("clip_x")
for i, step in enumerate(c["steps"]):
    if step is not None:
        net.params["dq"][0].data[0], net.params["dq"][1].data[0] = step
    net.forward()
    out[f"clip{i}_y"] = net.blobs["y"].data.copy()
    out[f"clip{i}_clip"] = np.array([net.params["dq"][0].data[0], net.params["dq"][1].data[0]])

c = spec["ifmr_init"]
net = caffe.Net(c["proto"], caffe.TRAIN)
for i in range(2):
    net.blobs["x"].data[...] = load(f"ifmr_x{i}")
    net.forward()
    out[f"ifmr{i}_y"] = net.blobs["y"].data.copy()
    out[f"ifmr{i}_clip"] = np.array([net.params["dq"][0].data[0], net.params["dq"][1].data[0]])

c = spec["record"]
net = caffe.Net(c["proto"], caffe.TEST)
net.blobs["x"].data[...] = load("clip_x")
net.forward()
out["record0"] = np.frombuffer(open(c["path"], "rb").read(), np.uint8)
net.params["dq"][0].data[0] = 4.0
net.forward()
out["record1"] = np.frombuffer(open(c["path"], "rb").read(), np.uint8)

for name, c in spec["arq"].items():
    net = caffe.Net(c["proto"], caffe.TRAIN)
    net.params["obj"][0].data[...] = load(name + "_w")   # the object layer's weight (shared blob 0)
    net.blobs["x"].data[...] = load(name + "_x")
    net.forward()
    out[name + "_fake"] = net.params["wq"][0].data.copy()
    out[name + "_master"] = net.params["wq"][1].data.copy()
    out[name + "_obj_w"] = net.params["obj"][0].data.copy()
    out[name + "_xq"] = net.blobs["xq"].data.copy()
    out[name + "_y"] = net.blobs["y"].data.copy()
    net.blobs["y"].diff[...] = load(name + "_g")
    net.backward()
    out[name + "_obj_dw"] = net.params["obj"][0].diff.copy()
    out[name + "_dmaster"] = net.params["wq"][1].diff.copy()
    out[name + "_dx"] = net.blobs["x"].diff.copy()
    out[name + "_dxq"] = net.blobs["xq"].diff.copy()

c = spec["solver"]
solver = caffe.SGDSolver(c["solver"])
net = solver.net
net.params["conv"][0].data[...] = load("solver_w")
net.blobs["x"].data[...] = load("solver_x")
net.blobs["t"].data[...] = load("solver_t")
names = [("dq", 0), ("dq", 1), ("wq", 1)]
net.forward()  # the first forward takes the float weight from the conv's
for i in range(2):
    out[f"solver{i}_before"] = [net.params[l][j].data.copy() for l, j in names]
    solver.step(1)
    out[f"solver{i}_after"] = [net.params[l][j].data.copy() for l, j in names]
    out[f"solver{i}_update"] = [net.params[l][j].diff.copy() for l, j in names]
    out[f"solver{i}_fake"] = net.params["wq"][0].data.copy()
    out[f"solver{i}_loss"] = np.float32(net.blobs["loss"].data)
for k in list(out):
    if isinstance(out[k], list):
        for j, a in enumerate(out.pop(k)):
            out[f"{k}{j}"] = a
np.savez(work + "/out.npz", **out)
"""


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ulq_x(shape, num_bits, clip_max, clip_min, scale, shift, seed) -> np.ndarray:
    """Random x plus the values where ULQ's branches switch: the grid edges and rounding halves."""
    x = (_rng(seed).standard_normal(shape) * scale + shift).astype(F32).reshape(-1)
    s, o = ulq_scale_offset(clip_max, clip_min, num_bits)
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    up, low = F32(s) * F32(qmax - o), F32(s) * F32(qmin - o)
    special = [up, np.nextafter(up, F32(np.inf)), low, np.nextafter(low, F32(-np.inf)), F32(0)]
    special += [F32(s) * F32(k + 0.5) for k in range(-3, 3)]
    x[:len(special)] = special
    return x.reshape(shape)


@pytest.fixture(scope="module")
def caffe_run(tmp_path_factory):
    """Runs CAFFE_SCRIPT once; returns (its outputs, the inputs it was given, the work dir)."""
    pycaffe = patched_caffe()
    work = tmp_path_factory.mktemp("retrain")
    inputs: dict[str, np.ndarray] = {}
    spec: dict = {"ulq": {}, "arq": {}}
    for i, (name, (param, shape, in_place, bits, fixed_min, scale, shift)) in enumerate(ULQ_CASES.items()):
        (work / f"{name}.prototxt").write_text(ulq_net(param, shape, in_place))
        cmax, cmin = _clip_values(param)
        inputs[name + "_x"] = _ulq_x(shape, bits, cmax, 0.0 if fixed_min else cmin, scale, shift, i)
        inputs[name + "_g"] = _rng(100 + i).standard_normal(shape).astype(F32)
        spec["ulq"][name] = {"proto": str(work / f"{name}.prototxt"), "top": "x" if in_place else "y"}

    (work / "clip.prototxt").write_text(ulq_net("clip_max: 1.5 clip_min: -1.0", (3, 50), False))
    inputs["clip_x"] = (_rng(7).standard_normal((3, 50)) * 1.2).astype(F32)
    spec["clip_check"] = {"proto": str(work / "clip.prototxt"), "steps": CLIP_STEPS}

    (work / "ifmr.prototxt").write_text(ulq_net("ifmr_init: true num_bits: 8", (4, 3, 8, 8), False))
    for i in range(2):
        inputs[f"ifmr_x{i}"] = (_rng(20 + i).standard_normal((4, 3, 8, 8)) * (1 + i) + 0.3).astype(F32)
    spec["ifmr_init"] = {"proto": str(work / "ifmr.prototxt")}

    record = work / "record.txt"
    (work / "record.prototxt").write_text(ulq_net(
        f'clip_max: 1.5 clip_min: -1.0 object_layer: "conv9" record_file_path: "{record}"', (3, 50), False))
    spec["record"] = {"proto": str(work / "record.prototxt"), "path": str(record)}

    for i, (name, (layer_type, wshape, xshape, obj, cw)) in enumerate(ARQ_CASES.items()):
        (work / f"{name}.prototxt").write_text(arq_net(layer_type, wshape, xshape, obj, cw))
        w = (_rng(30 + i).standard_normal(wshape) * 0.2).astype(F32)
        w.reshape(-1)[0] = 0.37  # one channel whose extreme is positive ...
        w.reshape(-1)[-1] = -0.41  # ... and one whose extreme is negative (127 versus 128 steps)
        inputs[name + "_w"] = w
        inputs[name + "_x"] = _rng(40 + i).standard_normal(xshape).astype(F32)
        spec["arq"][name] = {"proto": str(work / f"{name}.prototxt")}

    (work / "solver_net.prototxt").write_text(SOLVER_NET)
    (work / "solver.prototxt").write_text(SOLVER.format(net=work / "solver_net.prototxt"))
    inputs["solver_w"] = (_rng(50).standard_normal((4, 3, 3, 3)) * 0.3).astype(F32)
    inputs["solver_x"] = (_rng(51).standard_normal((2, 3, 6, 6)) * 1.3).astype(F32)
    inputs["solver_t"] = (_rng(52).standard_normal((2, 4, 4, 4))).astype(F32)
    spec["solver"] = {"solver": str(work / "solver.prototxt")}

    # the arq cases' top diffs need y's shape: fixed here from the nets' arithmetic
    y_shapes = {"conv_channel_wise": (2, 4, 4, 4), "inner_product": (3, 5), "deconv_channel_wise": (2, 4, 4, 4)}
    for i, name in enumerate(ARQ_CASES):
        inputs[name + "_g"] = _rng(60 + i).standard_normal(y_shapes[name]).astype(F32)
    for key, value in inputs.items():
        np.save(work / f"{key}.npy", value)
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pycaffe), str(REPO)]), GLOG_minloglevel="1",
               GLOG_logtostderr="1")
    res = subprocess.run([sys.executable, "-c", CAFFE_SCRIPT, str(work)], env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(work / "out.npz") as z:
        out = {k: z[k] for k in z.files}
    return out, inputs, work, res.stderr


def _clip_values(param: str) -> tuple[float, float]:
    fields = param.split()
    value = {fields[i].rstrip(":"): fields[i + 1] for i in range(0, len(fields) - 1, 2)}
    return float(value.get("clip_max", 3)), float(value.get("clip_min", 0))


def _within_one_ulp(a: float, b: float) -> bool:
    a32, b32 = F32(a), F32(b)
    return a32 == b32 or np.nextafter(a32, b32) == b32


# ------------------------------------------------------------------ RetrainDataQuant
@pytest.mark.parametrize("name", ULQ_CASES)
def test_ulq_forward_and_backward_equal_the_python_path(caffe_run, name):
    out, inputs, _, _ = caffe_run
    param, _, _, bits, fixed_min, _, _ = ULQ_CASES[name]
    cmax, cmin = _clip_values(param)
    quantizer = UlqQuantizer(cmax, cmin, bits, fixed_min)
    x, g = inputs[name + "_x"], inputs[name + "_g"]
    y = quantizer.forward(x)
    dx, dmax, dmin = quantizer.backward(x, g)
    np.testing.assert_array_equal(out[name + "_clip"], [quantizer.clip_max, quantizer.clip_min])
    np.testing.assert_array_equal(out[name + "_y"], y)
    np.testing.assert_array_equal(out[name + "_dx"], dx)
    assert out[name + "_dclip"].dtype == F32
    np.testing.assert_array_equal(out[name + "_dclip"], [F32(dmax), F32(dmin)])
    assert out[name + "_dclip"][0] != 0  # the clip gradients reach the blobs
    if fixed_min:
        assert out[name + "_dclip"][1] == 0 and out[name + "_clip"][1] == 0
    else:
        assert out[name + "_dclip"][1] != 0
    # x reaches past the clip range: some gradients are cut, the others pass
    assert 0 < np.count_nonzero(out[name + "_dx"] == 0) < x.size


@pytest.mark.parametrize("name", ULQ_CASES)
def test_ulq_matches_the_numpy_reference(caffe_run, name):
    """The reference sums the clip gradients in another order: within one float32 ulp."""
    out, inputs, _, _ = caffe_run
    param, _, _, bits, fixed_min, _, _ = ULQ_CASES[name]
    cmax, cmin = _clip_values(param)
    cmin = 0.0 if fixed_min else cmin
    x, g = inputs[name + "_x"], inputs[name + "_g"]
    y, _, _ = ulq_forward(x, cmax, cmin, bits, backend="reference")
    dx, dmax, dmin = ulq_backward(x, g, cmax, cmin, bits, backend="reference")
    np.testing.assert_array_equal(out[name + "_y"], y)
    np.testing.assert_array_equal(out[name + "_dx"], dx)
    assert _within_one_ulp(out[name + "_dclip"][0], dmax)
    if not fixed_min:
        assert _within_one_ulp(out[name + "_dclip"][1], dmin)


def test_clip_check_restores_like_the_ulq_quantizer(caffe_run):
    out, inputs, _, _ = caffe_run
    quantizer = UlqQuantizer(1.5, -1.0, 8)
    x = inputs["clip_x"]
    for i, step in enumerate(CLIP_STEPS):
        if step is not None:
            quantizer.clip_max, quantizer.clip_min = F32(step[0]), F32(step[1])
        y = quantizer.forward(x)
        np.testing.assert_array_equal(out[f"clip{i}_clip"], [quantizer.clip_max, quantizer.clip_min],
                                      err_msg=f"step {i}: {step}")
        np.testing.assert_array_equal(out[f"clip{i}_y"], y, err_msg=f"step {i}: {step}")
    # the steps exercise every rule: both restored, clip_max restored, clip_min restored, accepted
    assert [tuple(out[f"clip{i}_clip"]) for i in range(1, 5)] == [(1.5, -1.0), (1.5, -1.0), (2.0, -1.0),
                                                                  (1.0, -0.75)]


def test_ifmr_init_starts_from_the_ifmr_grid_once(caffe_run):
    out, inputs, _, _ = caffe_run
    r = ifmr_search(inputs["ifmr_x0"], IfmrParams(num_bits=8))
    cmax, cmin = F32(r.scale) * F32(127 - r.offset), F32(r.scale) * F32(-128 - r.offset)
    np.testing.assert_array_equal(out["ifmr0_clip"], [cmax, cmin])
    np.testing.assert_array_equal(out["ifmr0_y"], ulq_forward(inputs["ifmr_x0"], cmax, cmin, 8)[0])
    assert ulq_scale_offset(cmax, cmin, 8)[1] == r.offset
    # the second batch (twice the spread) does not re-initialise
    np.testing.assert_array_equal(out["ifmr1_clip"], out["ifmr0_clip"])
    np.testing.assert_array_equal(out["ifmr1_y"], ulq_forward(inputs["ifmr_x1"], cmax, cmin, 8)[0])


def test_test_phase_writes_scale_d_and_offset_d(caffe_run):
    out, _, work, _ = caffe_run
    for i, (cmax, cmin) in enumerate([(1.5, -1.0), (4.0, -1.0)]):
        record = parse_record_text(out[f"record{i}"].tobytes().decode())
        act = activation_entry(layer_entry(record, "conv9"), 0)
        scale, offset = ulq_scale_offset(cmax, cmin, 8)
        assert (act.scale_d, act.offset_d, act.num_bits_d) == (F32(scale), offset, 8)
        assert (act.channels, act.height, act.width) == (50, 1, 1)
    assert read_record(work / "record.txt") is not None


# ------------------------------------------------------------------ RetrainWeightQuant
@pytest.mark.parametrize("name", ARQ_CASES)
def test_arq_retrain_weights_and_gradients_equal_the_python_path(caffe_run, name):
    out, inputs, _, _ = caffe_run
    layer_type, _, _, _, channel_wise = ARQ_CASES[name]
    w, x = inputs[name + "_w"], inputs[name + "_x"]
    expected = arq_retrain_forward(w, layer_type, channel_wise, 8)
    np.testing.assert_array_equal(out[name + "_master"], w)  # taken from the object layer's weight
    np.testing.assert_array_equal(out[name + "_fake"], expected.fake)
    np.testing.assert_array_equal(out[name + "_obj_w"], expected.fake)  # the blob the object layer uses
    assert not np.array_equal(expected.fake, w)
    np.testing.assert_array_equal(out[name + "_xq"], x)  # x passes through
    if layer_type == "InnerProduct":  # the object layer really ran on the fake-quantized weight
        np.testing.assert_allclose(out[name + "_y"], x @ expected.fake.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[name + "_dmaster"], arq_retrain_backward(out[name + "_obj_dw"]))
    assert np.count_nonzero(out[name + "_dmaster"]) > 0
    np.testing.assert_array_equal(out[name + "_dx"], out[name + "_dxq"])
    assert np.count_nonzero(out[name + "_dx"]) > 0


def test_conv_output_uses_the_fake_quantized_weight(caffe_run):
    out, inputs, _, _ = caffe_run
    fake = arq_retrain_forward(inputs["conv_channel_wise_w"], "Convolution", True, 8).fake
    x = inputs["conv_channel_wise_x"]
    cols = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # [n, c, 4, 4, 3, 3]
    y = np.einsum("nchwij,kcij->nkhw", cols.astype(np.float64), fake.astype(np.float64))
    np.testing.assert_allclose(out["conv_channel_wise_y"], y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ training
def test_solver_steps_move_the_clip_values_and_the_float_weight(caffe_run):
    out, inputs, _, _ = caffe_run
    for i in range(2):
        before = [out[f"solver{i}_before{j}"] for j in range(3)]
        after = [out[f"solver{i}_after{j}"] for j in range(3)]
        update = [out[f"solver{i}_update{j}"] for j in range(3)]
        for j, what in enumerate(["clip_max", "clip_min", "float weight"]):
            assert np.count_nonzero(update[j]) > 0, f"step {i}: no gradient for {what}"
            # SGD without momentum: data -= lr * grad, the update left in the diff
            np.testing.assert_array_equal(after[j], before[j] - update[j], err_msg=f"step {i}: {what}")
        assert after[0][0] != before[0][0]
    # the next forward re-quantizes the trained float weight
    np.testing.assert_array_equal(out["solver1_fake"],
                                  arq_retrain_forward(out["solver0_after2"], "Convolution", True, 8).fake)
    assert out["solver0_before2"].tobytes() == inputs["solver_w"].tobytes()
    assert out["solver1_loss"] < out["solver0_loss"]
