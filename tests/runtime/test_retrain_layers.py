"""RetrainDataQuant and RetrainWeightQuant in the executor against amct_caffe.quant's ULQ / ARQ functions.

No Caffe needed: the nets are test_real_caffe_retrain.py's (where the C++ layers were checked against
the same functions); tests/caffe_patch/test_retrain_layers_vs_executor.py compares with Caffe directly.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import GraphError
from amct_caffe.io.record import Record, read_record
from amct_caffe.io.schema import caffe_pb
from amct_caffe.quant import (UlqQuantizer, arq_retrain_forward, ifmr_search, ulq_backward, ulq_forward,
                              ulq_scale_offset)
from amct_caffe.quant.ifmr import IfmrParams
from amct_caffe.runtime import TEST, TRAIN, Net, SGDSolver
from tests.caffe_patch.test_real_caffe_retrain import (ARQ_CASES, CLIP_STEPS, SOLVER, SOLVER_NET, ULQ_CASES,
                                                       _clip_values, _ulq_x, arq_net, ulq_net)

F32 = np.float32
RNG = np.random.default_rng(11)


def build(text: str, phase: int = TRAIN, **kwargs) -> Net:
    return Net(text_format.Parse(text, caffe_pb().NetParameter()), phase, **kwargs)


def clips(net: Net, layer: str = "dq") -> list:
    return [net.params[layer][0].data[0], net.params[layer][1].data[0]]


# ------------------------------------------------------------------ RetrainDataQuant
@pytest.mark.parametrize("name", ULQ_CASES)
def test_ulq_forward_and_backward_equal_the_quant_functions(name):
    param, shape, in_place, bits, fixed_min, scale, shift = ULQ_CASES[name]
    cmax, cmin = _clip_values(param)
    x = _ulq_x(shape, bits, cmax, 0.0 if fixed_min else cmin, scale, shift, 3)
    g = RNG.standard_normal(shape).astype(F32)
    net = build(ulq_net(param, shape, in_place))
    top = "x" if in_place else "y"
    net.forward(x=x)
    quantizer = UlqQuantizer(cmax, cmin, bits, fixed_min)
    np.testing.assert_array_equal(net.blobs[top].data, quantizer.forward(x))
    np.testing.assert_array_equal(clips(net), [quantizer.clip_max, quantizer.clip_min])
    net.blobs[top].diff[...] = g
    net.backward()
    dx, dmax, dmin = quantizer.backward(x, g)
    np.testing.assert_array_equal(net.blobs["x"].diff, dx)  # in place: from the x kept by the forward
    assert net.params["dq"][0].diff.dtype == F32
    np.testing.assert_array_equal([net.params["dq"][0].diff[0], net.params["dq"][1].diff[0]], [F32(dmax), F32(dmin)])
    assert dmax != 0 and (dmin == 0) == fixed_min
    # a second backward adds (Caffe's accumulation until the solver clears the diffs); in place,
    # the first one overwrote the top diff with x's, as in Caffe
    net.blobs[top].diff[...] = g
    net.backward()
    assert net.params["dq"][0].diff[0] == F32(dmax) + F32(dmax)


def test_ulq_numpy_reference_backend_agrees():
    x = _ulq_x((2, 3, 4, 5), 8, 2.5, -1.25, 1.5, 0.0, 0)
    g = RNG.standard_normal(x.shape).astype(F32)
    net = build(ulq_net("clip_max: 2.5 clip_min: -1.25", x.shape, False))
    net.forward(x=x)
    net.blobs["y"].diff[...] = g
    net.backward()
    y, _, _ = ulq_forward(x, 2.5, -1.25, 8, backend="reference")
    dx, dmax, _ = ulq_backward(x, g, 2.5, -1.25, 8, backend="reference")
    np.testing.assert_array_equal(net.blobs["y"].data, y)
    np.testing.assert_array_equal(net.blobs["x"].diff, dx)
    got = net.params["dq"][0].diff[0]  # float64 sums in another order: within one float32 ulp
    assert got == F32(dmax) or np.nextafter(got, F32(dmax)) == F32(dmax)


def test_no_clip_gradient_where_lr_mult_is_0():
    # (force_backward would switch every param gradient on, as in Caffe: y is a loss instead)
    text = ulq_net("clip_max: 2.0 clip_min: -1.0", (2, 8), False).replace("force_backward: true\n", "").replace(
        "retrain_data_quant_param", "param { lr_mult: 0 } param { lr_mult: 1 } loss_weight: 1 retrain_data_quant_param")
    net = build(text)
    net.forward(x=RNG.standard_normal((2, 8)).astype(F32) * 3)
    net.backward()
    assert net.params["dq"][0].diff[0] == 0 and net.params["dq"][1].diff[0] != 0
    assert not net.blobs["x"].diff.any()  # the Input needs no gradient: none computed


def test_clip_check_sequence_restores_like_the_ulq_quantizer():
    net = build(ulq_net("clip_max: 1.5 clip_min: -1.0", (3, 50), False))
    x = (RNG.standard_normal((3, 50)) * 1.2).astype(F32)
    quantizer = UlqQuantizer(1.5, -1.0, 8)
    seen = []
    for step in CLIP_STEPS:
        if step is not None:
            net.params["dq"][0].data[0], net.params["dq"][1].data[0] = step
            quantizer.clip_max, quantizer.clip_min = F32(step[0]), F32(step[1])
        net.forward(x=x)
        np.testing.assert_array_equal(net.blobs["y"].data, quantizer.forward(x), err_msg=str(step))
        seen.append(tuple(clips(net)))
    # both restored, clip_max restored, clip_min restored, accepted, then restored to the accepted ones
    assert seen[1:] == [(1.5, -1.0), (1.5, -1.0), (2.0, -1.0), (1.0, -0.75), (1.0, -0.75)]


def test_ifmr_init_on_the_first_batch_only():
    x0 = (RNG.standard_normal((4, 3, 8, 8)) + 0.3).astype(F32)
    x1 = (RNG.standard_normal((4, 3, 8, 8)) * 2 + 0.3).astype(F32)
    r = ifmr_search(x0, IfmrParams(num_bits=8))
    cmax, cmin = F32(r.scale) * F32(127 - r.offset), F32(r.scale) * F32(-128 - r.offset)
    net = build(ulq_net("ifmr_init: true num_bits: 8", x0.shape, False))
    net.forward(x=x0)
    np.testing.assert_array_equal(clips(net), [cmax, cmin])
    np.testing.assert_array_equal(net.blobs["y"].data, ulq_forward(x0, cmax, cmin, 8)[0])
    net.forward(x=x1)  # no second initialisation
    np.testing.assert_array_equal(clips(net), [cmax, cmin])
    # clips that are not the param's (a snapshot's trained values) are kept
    net = build(ulq_net("ifmr_init: true", x0.shape, False))
    net.params["dq"][0].data[0] = 2.0
    net.forward(x=x0)
    assert clips(net) == [2.0, 0.0]
    # fixed_min: IFMR's clip_max, clip_min held at 0
    net = build(ulq_net("ifmr_init: true fixed_min: true clip_min: -1", x0.shape, False))
    net.forward(x=x0)
    assert clips(net) == [cmax, 0.0]


def test_test_phase_writes_the_record_when_the_grid_changes(tmp_path, monkeypatch):
    path = tmp_path / "record.txt"
    text = ulq_net(f'clip_max: 1.5 clip_min: -1.0 object_layer: "conv9" record_file_path: "{path}"', (3, 50), False)
    x = RNG.standard_normal((3, 50)).astype(F32)
    train = build(text, TRAIN)
    train.forward(x=x)
    assert not path.exists()  # the TRAIN phase writes nothing
    net = build(text, TEST)
    writes = []
    sink = net.record_sink(str(path))
    original = sink.write
    monkeypatch.setattr(sink, "write", lambda: (writes.append(1), original())[1])
    for cmax in (1.5, 1.5, 4.0):
        net.params["dq"][0].data[0] = cmax
        net.forward(x=x)
        act = read_record(path).layer("conv9").activation(0)
        scale, offset = ulq_scale_offset(cmax, -1.0, 8)
        assert (act.scale_d, act.offset_d, act.num_bits_d) == (F32(scale), offset, 8)
        assert (act.channels, act.height, act.width) == (50, 1, 1)
    assert len(writes) == 2  # the unchanged second forward rewrites nothing
    # an in-memory record (the embedded flows) is filled instead of the file
    record = Record()
    other = tmp_path / "other.txt"
    build(text.replace(str(path), str(other)), TEST, records={str(other): record}).forward(x=x)
    assert not other.exists() and record.layer("conv9").activation(0).offset_d == ulq_scale_offset(1.5, -1.0, 8)[1]


def test_retrain_data_quant_refuses_what_the_cpp_layer_refuses(caplog):
    with pytest.raises(GraphError, match=r"num_bits must be an integer in \[8, 16\], got 4"):
        build(ulq_net("num_bits: 4", (2, 3), False))
    with pytest.raises(GraphError, match="object_layer"):
        build(ulq_net('record_file_path: "r.txt"', (2, 3), False))
    with caplog.at_level(logging.WARNING):
        build(ulq_net("with_offset: false", (2, 3), False))
    assert "with_offset is ignored" in caplog.text


# ------------------------------------------------------------------ RetrainWeightQuant
def _arq_inputs(name: str):
    _, wshape, xshape, _, _ = ARQ_CASES[name]
    w = (RNG.standard_normal(wshape) * 0.2).astype(F32)
    w.reshape(-1)[0], w.reshape(-1)[-1] = 0.37, -0.41
    return w, RNG.standard_normal(xshape).astype(F32)


@pytest.mark.parametrize("name", ARQ_CASES)
def test_arq_retrain_hands_the_fake_weight_to_the_object_layer(name):
    layer_type, wshape, _, obj, channel_wise = ARQ_CASES[name]
    w, x = _arq_inputs(name)
    net = build(arq_net(layer_type, wshape, x.shape, obj, channel_wise))
    assert net.params["obj"][0] is net.params["wq"][0]  # one Blob: Caffe's ShareData by param name
    net.params["obj"][0].data[...] = w
    net.forward(x=x)
    fake = arq_retrain_forward(w, layer_type, channel_wise, 8).fake
    np.testing.assert_array_equal(net.params["wq"][1].data, w)  # the float weight starts from the object's
    np.testing.assert_array_equal(net.params["obj"][0].data, fake)
    np.testing.assert_array_equal(net.blobs["xq"].data, x)
    plain = build('force_backward: true\nlayer { name: "data" type: "Input" top: "xq" input_param { shape {'
                  + "".join(f" dim: {d}" for d in x.shape) + ' } } }\nlayer { name: "obj" bottom: "xq" top: "y" '
                  + obj + " }\n", weights={"obj": [fake]})
    np.testing.assert_array_equal(net.blobs["y"].data, plain.forward(xq=x)["y"])  # it ran on the fake weight
    g = RNG.standard_normal(net.blobs["y"].shape).astype(F32)
    net.blobs["y"].diff[...] = g
    net.backward()
    plain.blobs["y"].diff[...] = g
    plain.backward()
    np.testing.assert_array_equal(net.params["obj"][0].diff, plain.params["obj"][0].diff)
    np.testing.assert_array_equal(net.params["wq"][1].diff, net.params["obj"][0].diff)  # straight through
    np.testing.assert_array_equal(net.blobs["x"].diff, plain.blobs["xq"].diff)  # x's gradient passes
    # a second pass accumulates in the shared blob; the float weight's diff is its copy, not a sum
    net.backward()
    np.testing.assert_array_equal(net.params["wq"][1].diff, net.params["obj"][0].diff)
    np.testing.assert_array_equal(net.params["wq"][1].diff, plain.params["obj"][0].diff * 2)


def test_arq_retrain_from_a_float_caffemodel_and_from_a_snapshot():
    layer_type, wshape, _, obj, cw = ARQ_CASES["conv_channel_wise"]
    w, x = _arq_inputs("conv_channel_wise")
    text = arq_net(layer_type, wshape, x.shape, obj, cw)
    # the float model has no RetrainWeightQuant: the Convolution's weight fills the shared blob
    net = build(text, weights={"obj": [w]})
    net.forward(x=x)
    np.testing.assert_array_equal(net.params["wq"][1].data, w)
    np.testing.assert_array_equal(net.params["obj"][0].data, arq_retrain_forward(w, layer_type, cw).fake)
    # a snapshot: the trained float weight (blob 1) is kept and re-quantized
    trained = (w * 1.1).astype(F32)
    fake = arq_retrain_forward(w, layer_type, cw).fake
    net = build(text, weights={"wq": [fake, trained], "obj": [fake]})
    net.forward(x=x)
    np.testing.assert_array_equal(net.params["wq"][1].data, trained)
    np.testing.assert_array_equal(net.params["obj"][0].data, arq_retrain_forward(trained, layer_type, cw).fake)


@pytest.mark.parametrize("param, message", [
    ('layer_type: "Pooling"', "ARQ supports layer types"),
    ('layer_type: "InnerProduct" channel_wise: true', "channel_wise=false"),
    ('layer_type: "Convolution" with_offset: true', "with_offset must be false"),
    ('layer_type: "Convolution" num_bits: 9', r"num_bits must be an integer in \[2, 8\]"),
    ('layer_type: "Convolution" cout: 0', "must be positive"),
])
def test_retrain_weight_quant_refuses_what_the_cpp_layer_refuses(param, message):
    text = ('layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }\n'
            'layer { name: "wq" type: "RetrainWeightQuant" bottom: "x" top: "x" '
            f"retrain_weight_quant_param {{ {param} }} }}\n")
    with pytest.raises(GraphError, match=message):
        build(text)


# ------------------------------------------------------------------ training
def test_sgd_steps_move_the_clips_and_the_float_weight(tmp_path):
    (tmp_path / "net.prototxt").write_text(SOLVER_NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER.format(net=tmp_path / "net.prototxt"))
    solver = SGDSolver(str(tmp_path / "solver.prototxt"))
    net = solver.net
    w = (RNG.standard_normal((4, 3, 3, 3)) * 0.3).astype(F32)
    x = (RNG.standard_normal((2, 3, 6, 6)) * 1.3).astype(F32)
    net.params["conv"][0].data[...] = w
    net.blobs["x"].data[...] = x
    net.blobs["t"].data[...] = RNG.standard_normal((2, 4, 4, 4)).astype(F32)
    names = [("dq", 0), ("dq", 1), ("wq", 1)]
    net.forward()  # the first forward takes the float weight from the Convolution's
    losses = []
    for i in range(3):
        before = [net.params[n][j].data.copy() for n, j in names]
        solver.step(1)
        losses.append(net.loss)
        for (n, j), b in zip(names, before, strict=True):
            update = net.params[n][j].diff  # SGD without momentum: the update is base_lr * gradient
            assert np.count_nonzero(update), f"step {i}: no gradient for {n}[{j}]"
            np.testing.assert_array_equal(net.params[n][j].data, b - update)
        if i == 0:
            np.testing.assert_array_equal(before[2], w)
        # the clip gradients are ULQ's, on the gradient the Convolution sent back into xq
        cmax, cmin = F32(before[0][0]), F32(before[1][0])
        _, dmax, dmin = ulq_backward(x, net.blobs["xq"].diff, cmax, cmin, 8)
        np.testing.assert_array_equal([net.params["dq"][0].diff[0], net.params["dq"][1].diff[0]],
                                      [F32(0.002) * F32(dmax), F32(0.002) * F32(dmin)])
    net.forward()
    np.testing.assert_array_equal(net.params["conv"][0].data,
                                  arq_retrain_forward(net.params["wq"][1].data, "Convolution", True).fake)
    assert losses[-1] < losses[0]
