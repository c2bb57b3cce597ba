"""AMCT layers (IFMR, SearchN, Quant, DeQuant, AntiQuant) against per-element loop references."""

import logging
import math

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import ConfigError, GraphError, WeightsError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.quant import IfmrObserver, IfmrParams, QuantizationError, pack_deq_scale
from amct_caffe.io.record import RecordError, activation_entry, layer_entry, read_record
from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.layers import quant_ops as amct
from amct_caffe.runtime.registry import known_types, layer_class

RNG = np.random.default_rng(7)
LOGGER = "amct_caffe.runtime.layers.calibration"


# ------------------------------------------------------------------ helpers
def make_layer(text, n_bottoms=1, n_tops=1):
    lp = text_format.Parse(text, caffe_pb().LayerParameter())
    lp.bottom.extend(f"b{i}" for i in range(n_bottoms))
    lp.top.extend(f"t{i}" for i in range(n_tops))
    cls = layer_class(lp.type, lp.name)
    cls.check_arity(lp)
    return cls(lp, TEST)


def run(layer, x):
    before = x.copy()
    shapes = layer.reshape([x.shape])
    tops = layer.forward([x])
    np.testing.assert_array_equal(x, before)
    for t, s in zip(tops, shapes, strict=True):
        assert t.shape == tuple(s) and t.dtype == np.float32
    return tops


def rha(v):
    """Round half away from zero, scalar."""
    return math.copysign(math.floor(abs(v) + 0.5), v)


def build_net(text, weights=None):
    net_param = text_format.Parse(text, caffe_pb().NetParameter())
    return Net(net_param, TEST, weights=weights)


def test_types_and_reference_functions():
    for t in ("IFMR", "SearchN", "Quant", "DeQuant", "AntiQuant"):
        assert t in known_types()
    for t in ("Quant", "DeQuant", "AntiQuant"):
        assert callable(getattr(amct, t))


# ------------------------------------------------------------------ Quant / AntiQuant
def quant_ref(x, scale_field, offset, bits, integer):
    s = np.float32(1.0 / np.float32(scale_field))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = np.empty(x.shape, np.float32)
    for idx in np.ndindex(*x.shape):
        q = min(max(rha(float(np.float32(x[idx]) / s)) + offset, lo), hi)
        out[idx] = (q - offset) if integer else np.float32(q - offset) * s
    return out


@pytest.mark.parametrize("scale,offset,bits_line,bits", [
    (4.0, 0, "", 8), (4.0, -3, "num_bits_d: 8", 8), (40.0, 100, "num_bits_d: 12", 12), (7.3, -128, "", 8)])
def test_quant_fake(scale, offset, bits_line, bits):
    layer = make_layer(f'name: "q" type: "Quant" quant_param {{ scale: {scale} offset: {offset} '
                       f'with_offset: true object_layer: "conv" {bits_line} }}')
    x = (RNG.standard_normal((2, 3, 4, 5)) * 40).astype(np.float32)
    x[0, 0, 0, :4] = [0.125, -0.125, 0.375, -0.625]  # exact halves for scale_d = 0.25
    x[1, 2, 3, 4] = 1e6  # clamps
    (y,) = run(layer, x)
    np.testing.assert_array_equal(y, quant_ref(x, scale, offset, bits, integer=False))
    assert not layer.integer


def test_quant_bad_parameters():
    for scale in ("0", "-2", "inf", "nan"):
        with pytest.raises(QuantizationError, match=r"layer 'q' \(Quant\).*scale"):
            make_layer(f'name: "q" type: "Quant" quant_param {{ scale: {scale} object_layer: "c" }}')
    with pytest.raises(QuantizationError, match="layer 'q'.*scale"):  # scale unset
        make_layer('name: "q" type: "Quant" quant_param { offset: 0 }')
    with pytest.raises(QuantizationError, match="layer 'q'.*offset 200"):
        make_layer('name: "q" type: "Quant" quant_param { scale: 2 offset: 200 with_offset: true }')
    with pytest.raises(ConfigError, match="layer 'q'.*num_bits_d"):
        make_layer('name: "q" type: "Quant" quant_param { scale: 2 num_bits_d: 4 }')


def test_antiquant_identity():
    layer = make_layer('name: "aq" type: "AntiQuant" quant_param { scale: 3 offset: -128 with_offset: true }')
    x = RNG.standard_normal((2, 3, 2)).astype(np.float32)
    (y,) = run(layer, x)
    np.testing.assert_array_equal(y, x)


QUANT_NET = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 4 dim: 4 } } }
layer { name: "q" type: "Quant" bottom: "data" top: "data_quant"
        quant_param { scale: 20 offset: -10 with_offset: true object_layer: "conv" } }
layer { name: "conv" type: "Convolution" bottom: "data_quant" top: "conv_out"
        convolution_param { num_output: 3 kernel_size: 2 pad: 1 } }
'''


def conv_ref(x, w, b, pad=1):
    """Direct correlation in float64, stride 1."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    out = np.zeros((n, o, h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1))
    for idx in np.ndindex(*out.shape):
        i, oc, y, xx = idx
        out[idx] = float((w[oc].astype(np.float64) * xp[i, :, y:y + kh, xx:xx + kw]).sum()) + float(b[oc])
    return out


def test_quant_integer_mode_in_net():
    w = RNG.integers(-128, 128, (3, 2, 2, 2)).astype(np.int8)
    b = RNG.integers(-5000, 5000, 3).astype(np.int32)
    net = build_net(QUANT_NET, weights={"conv": [w, b]})
    assert net.layer_dict["q"].integer and net.layer_dict["conv"].integer_params
    x = (RNG.standard_normal((2, 2, 4, 4)) * 3).astype(np.float32)
    net.forward(data=x)
    xq = net.blobs["data_quant"].data
    np.testing.assert_array_equal(xq, quant_ref(x, 20.0, -10, 8, integer=True))
    assert xq.min() >= -118 and xq.max() <= 137  # q - offset_d for q in [-128, 127]
    np.testing.assert_array_equal(net.blobs["conv_out"].data, conv_ref(xq, w, b))


def test_quant_fake_mode_in_net_with_float_weights():
    w = RNG.standard_normal((3, 2, 2, 2)).astype(np.float32)
    net = build_net(QUANT_NET, weights={"conv": [w, np.zeros(3, np.float32)]})
    assert not net.layer_dict["q"].integer
    x = (RNG.standard_normal((2, 2, 4, 4)) * 3).astype(np.float32)
    net.forward(data=x)
    np.testing.assert_array_equal(net.blobs["data_quant"].data, quant_ref(x, 20.0, -10, 8, integer=False))


def test_quant_fake_mode_rewrites_its_top_in_place_on_later_forwards():
    w = RNG.standard_normal((3, 2, 2, 2)).astype(np.float32)
    net = build_net(QUANT_NET, weights={"conv": [w, np.zeros(3, np.float32)]})
    xs = [(RNG.standard_normal((2, 2, 4, 4)) * 3).astype(np.float32) for _ in range(3)]
    net.forward(data=xs[0])
    net.forward(data=xs[1])  # the prepared steps from here on
    address = net.blobs["data_quant"].data.__array_interface__["data"][0]
    net.forward(data=xs[2])
    assert net.blobs["data_quant"].data.__array_interface__["data"][0] == address
    np.testing.assert_array_equal(net.blobs["data_quant"].data, quant_ref(xs[2], 20.0, -10, 8, integer=False))


# ------------------------------------------------------------------ DeQuant
def dequant_layer(blobs, channel_wise=True):
    flag = str(channel_wise).lower()
    layer = make_layer(f'name: "dq" type: "DeQuant" dequant_param {{ channel_wise: {flag} '
                       'object_layer: "conv" layer_type: "Convolution" }')
    layer.blobs = [Blob(data=np.asarray(b)) for b in blobs]
    return layer


def shift_ref(x, deq, n):
    out = np.empty(x.shape, np.float32)
    for idx in np.ndindex(*x.shape):
        c = idx[1] if deq.size > 1 else 0
        d, p = np.float32(deq[c]), np.float32(2.0 ** n[c if n.size > 1 else 0])
        t = rha(float(np.float32(x[idx]) / d))
        t = rha(float(np.float32(t) / p))
        t = min(max(t, -32768), 32767)
        out[idx] = np.float32(t) * d * p
    return out


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 3)])
def test_dequant_fake_identity_and_shift(shape):
    c = shape[1]
    deq = np.array([0.0013, 0.02, 0.5], np.float32)[:c]
    acc = RNG.integers(-2**22, 2**22, shape).astype(np.float64)
    noise = RNG.uniform(-1e-4, 1e-4, shape)
    x = (acc * deq.reshape((1, c) + (1,) * (len(shape) - 2)) + noise).astype(np.float32)
    (y,) = run(dequant_layer([deq, np.zeros(c, np.float32), np.zeros(c, np.float32)]), x)
    np.testing.assert_array_equal(y, x)
    n = np.array([3, 1, 16], np.float32)[:c]
    (y,) = run(dequant_layer([deq, n, np.zeros(c, np.float32)]), x)
    np.testing.assert_array_equal(y, shift_ref(x, deq, n))
    # per-tensor blobs broadcast over channels
    one, n1 = deq[:1], np.array([7], np.float32)
    (y,) = run(dequant_layer([one, n1, np.zeros(1, np.float32)], channel_wise=False), x)
    np.testing.assert_array_equal(y, shift_ref(x, one, n1))


def test_dequant_blob_errors():
    x = np.ones((1, 3, 2, 2), np.float32)
    deq, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    for bad in ([0, 2, 3], [1, 17, 2], [1.5, 2, 2], [-1, 2, 2]):
        with pytest.raises(WeightsError, match=r"layer 'dq' \(DeQuant\).*shift_bit.*mixed"):
            run(dequant_layer([deq, np.array(bad, np.float32), zero]), x)
    with pytest.raises(WeightsError, match="layer 'dq'.*deq_scale has 2 values"):
        run(dequant_layer([np.ones(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32)]), x)
    with pytest.raises(WeightsError, match="layer 'dq'.*uint64"):
        run(dequant_layer([np.ones(3, np.float32)]), x)
    with pytest.raises(WeightsError, match="layer 'dq'.*offset_w must be 0"):
        run(dequant_layer([pack_deq_scale(np.ones(3), 0.1, np.array([0, 1, 0]))]), x)


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 3)])
def test_dequant_deploy(shape):
    scale_w, scale_d = np.array([0.011, 0.2, 0.0007], np.float32), 0.031
    acc = RNG.integers(-2**20, 2**20, shape).astype(np.float32)
    (y,) = run(dequant_layer([pack_deq_scale(scale_w, scale_d)]), acc)
    ref = np.empty(shape, np.float32)
    for idx in np.ndindex(*shape):
        ref[idx] = acc[idx] * (scale_w[idx[1]] * np.float32(scale_d))
    np.testing.assert_array_equal(y, ref)
    (y,) = run(dequant_layer([pack_deq_scale(scale_w[:1], scale_d)], channel_wise=False), acc)
    np.testing.assert_array_equal(y, acc * (scale_w[0] * np.float32(scale_d)))


def test_dequant_param_shapes():
    cw, pt = dequant_layer([]), dequant_layer([], channel_wise=False)
    assert cw.param_shapes([(2, 5, 3, 3)]) == [(5,)] * 3
    assert pt.param_shapes([(2, 5, 3, 3)]) == [(1,)] * 3
    packed = pack_deq_scale(np.ones(5), 0.1)
    assert pt.param_shapes_for_weights([(2, 5, 3, 3)], [packed]) == [(5,)]
    assert cw.param_shapes_for_weights([(2, 5)], [packed[:1]]) == [(1,)]
    three = [np.ones(5, np.float32), np.zeros(1, np.float32), np.zeros(5, np.float32)]
    assert cw.param_shapes_for_weights([(2, 5, 3, 3)], three) == [(5,), (1,), (5,)]


DEQUANT_NET = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
layer { name: "dq" type: "DeQuant" bottom: "data" top: "out" dequant_param { channel_wise: true } }
'''


def test_dequant_net_without_weights_is_identity():
    net = build_net(DEQUANT_NET)
    assert [b.data.tolist() for b in net.params["dq"]] == [[1.0] * 3, [0.0] * 3, [0.0] * 3]
    x = RNG.standard_normal((2, 3, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(net.forward(data=x)["out"], x)


def test_deploy_net_end_to_end():
    text = QUANT_NET + '''layer { name: "dq" type: "DeQuant" bottom: "conv_out" top: "out"
                                  dequant_param { channel_wise: true object_layer: "conv" } }'''
    w = RNG.integers(-128, 128, (3, 2, 2, 2)).astype(np.int8)
    b = RNG.integers(-5000, 5000, 3).astype(np.int32)
    scale_w = np.array([0.01, 0.003, 0.02], np.float32)
    try:
        net = build_net(text, weights={"conv": [w, b], "dq": [pack_deq_scale(scale_w, 0.05)]})
    except WeightsError as e:
        pytest.skip(f"the Net does not yet ask DeQuant.param_shapes_for_weights: {e}")
    x = (RNG.standard_normal((2, 2, 4, 4)) * 3).astype(np.float32)
    out = net.forward(data=x)["out"]
    acc = conv_ref(quant_ref(x, 20.0, -10, 8, integer=True), w, b).astype(np.float32)
    deq = (scale_w * np.float32(0.05)).astype(np.float32)
    np.testing.assert_array_equal(out, acc * deq.reshape(1, 3, 1, 1))


# ------------------------------------------------------------------ IFMR
IFMR_NET = '''
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 5 }} }} }}
layer {{ name: "ifmr" type: "IFMR" bottom: "data"
        ifmr_param {{ batch_num: 2 with_offset: true search_range_start: 0.7 search_range_end: 1.3
                     search_step: 0.01 max_percentile: 0.999999 min_percentile: 0.999999
                     object_layer: "conv" record_file_path: "{path}" }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 2 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
'''



@pytest.mark.parametrize("mode", ["stream", "exact"])
def test_ifmr_layer_observer_follows_the_nets_setting(tmp_path, mode):
    """Net(ifmr=) picks the observer; with more values than the streaming observer's exact limit the
    two searches still agree here (a smooth distribution), and a bad name is refused."""
    from amct_caffe.quant import IfmrStreamObserver
    from amct_caffe.runtime.layers.calibration import IfmrLayer
    rec = tmp_path / "record.txt"
    proto = tmp_path / "calib.prototxt"
    proto.write_text(IFMR_NET.format(path=rec).replace("dim: 2 dim: 3 dim: 4 dim: 5", "dim: 2 dim: 3 dim: 80 dim: 250"))
    net = Net(str(proto), TEST, ifmr=mode)
    layer = next(layer for layer in net.layers if isinstance(layer, IfmrLayer))
    assert type(layer._observer) is (IfmrObserver if mode == "exact" else IfmrStreamObserver)
    xs = [(RNG.standard_normal((2, 3, 80, 250)) * 2 + 0.5).astype(np.float32) for _ in range(2)]
    for x in xs:
        net.forward(data=x)
    obs = IfmrObserver(IfmrParams(8, True, 0.999999, 0.999999, 0.7, 1.3, 0.01))
    for x in xs:
        obs.update(x)
    want = obs.compute_qparams()
    act = activation_entry(layer_entry(read_record(rec), "conv"), 0)
    assert act.scale_d == np.float32(want.scale) and act.offset_d == want.offset
    with pytest.raises(GraphError, match="ifmr must be one of"):
        Net(str(proto), TEST, ifmr="histogram")

def test_ifmr_end_to_end(tmp_path, caplog):
    rec = tmp_path / "record.txt"
    rec.write_text('record { key: "conv" value { scale_w: 0.1 scale_w: 0.2 offset_w: 0 offset_w: 0 } }\n'
                   'record { key: "other" value { scale_w: 1 } }\n')
    original = rec.read_text()
    proto = tmp_path / "calib.prototxt"
    proto.write_text(IFMR_NET.format(path=rec))
    net = Net(str(proto), TEST)
    xs = [(RNG.standard_normal((2, 3, 4, 5)) * 2 + 0.5).astype(np.float32) for _ in range(3)]
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        net.forward(data=xs[0])
        assert rec.read_text() == original  # before batch_num: nothing written
        net.forward(data=xs[1])
        after = rec.read_text()
        net.forward(data=xs[2])
        net.forward(data=xs[2])
    assert rec.read_text() == after  # forwards after batch_num do nothing
    messages = [r.getMessage() for r in caplog.records]
    assert "IFMR 'ifmr': batch 1/2 recorded" in messages and "IFMR 'ifmr': batch 2/2 recorded" in messages
    assert any(m.startswith("IFMR 'ifmr': scale_d=") and "['conv']" in m for m in messages)
    assert sum("already calibrated" in m for m in messages) == 1

    obs = IfmrObserver(IfmrParams(8, True, 0.999999, 0.999999, 0.7, 1.3, 0.01))
    obs.update(xs[0])
    obs.update(xs[1])
    want = obs.compute_qparams()
    record = read_record(rec)
    conv = layer_entry(record, "conv")
    assert list(conv.scale_w) == pytest.approx([0.1, 0.2])  # the read-modify-write keeps what was there
    assert layer_entry(record, "other") is not None
    act = activation_entry(conv, 0)
    assert act.scale_d == np.float32(want.scale) and act.offset_d == want.offset and act.offset_d != 0
    assert (act.num_bits_d, act.channels, act.height, act.width) == (8, 3, 4, 5)


def ifmr_layer(path, extra="", batch_num=1, max_percentile=0.999999):
    return make_layer(f'name: "ifmr" type: "IFMR" ifmr_param {{ batch_num: {batch_num} '
                      f'search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 '
                      f'max_percentile: {max_percentile} '
                      f'min_percentile: 0.999999 record_file_path: "{path}" {extra} }}', n_tops=0)


def test_ifmr_2d_bottom_several_objects_symmetric(tmp_path):
    rec = tmp_path / "r.txt"  # absent: created
    layer = ifmr_layer(rec, 'with_offset: false num_bits: 10 object_layer: "fc" object_layer: "eltw" '
                            'index: 0 index: 1')
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    assert run(layer, x) == []
    want = IfmrObserver(IfmrParams(10, False, 0.999999, 0.999999, 0.7, 1.3, 0.01))
    want.update(x)
    want = want.compute_qparams()
    record = read_record(rec)
    for name, index in (("fc", 0), ("eltw", 1)):
        act = activation_entry(layer_entry(record, name), index)
        assert act.scale_d == np.float32(want.scale) and act.offset_d == 0
        assert (act.num_bits_d, act.channels, act.height, act.width) == (10, 6, 1, 1)


def test_ifmr_errors(tmp_path):
    rec = tmp_path / "r.txt"
    layer = ifmr_layer(rec, 'with_offset: true object_layer: "conv"')
    with pytest.raises(QuantizationError,
                       match=r"layer 'ifmr' \(IFMR\).*IfmrQuantWithOffset scale is illegal"):
        run(layer, np.full((1, 2, 2, 2), 1e10, np.float32))
    layer = ifmr_layer(rec, 'with_offset: false object_layer: "conv"')
    x = np.ones((1, 2, 2, 2), np.float32)
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(QuantizationError, match="layer 'ifmr'.*IfmrQuantWithoutOffset scale is illegal"):
        run(layer, x)
    assert not rec.exists()
    with pytest.raises(ConfigError, match="layer 'ifmr'.*max_percentile"):
        ifmr_layer(rec, 'object_layer: "c"', max_percentile=0.3)
    with pytest.raises(GraphError, match="layer 'ifmr'.*record_file_path"):
        ifmr_layer("", 'object_layer: "c"')
    with pytest.raises(GraphError, match="layer 'ifmr'.*batch_num"):
        ifmr_layer(rec, 'object_layer: "c"', batch_num=0)
    with pytest.raises(GraphError, match="layer 'ifmr'.*index"):
        ifmr_layer(rec, 'object_layer: "a" object_layer: "b" index: 1')


# ------------------------------------------------------------------ SearchN
def search_ref(batches, deq):
    """Best shift per deq entry; one deq pools every value of the batches."""
    best = []
    for c in range(deq.size):
        vals = np.concatenate([(x[:, c] if deq.size > 1 else x).ravel() for x in batches])
        s32 = [min(max(int(rha(float(v) / float(deq[c]))), -2**31), 2**31 - 1) for v in vals]
        errs = [sum(((min(max(v >> n, -32768), 32767) << n) - v) ** 2 for v in s32) for n in range(1, 17)]
        best.append(1 + errs.index(min(errs)))
    return best


RECORD = ('record {{ key: "{name}" value {{ {scale_w} '
          'record_d {{ scale_d: 0.05 offset_d: -128 index: 0 }} }} }}\n')


def search_layer(path, names, types=(), batch_num=2):
    fields = " ".join(f'layer_name: "{n}"' for n in names) + " ".join(f' layer_type: "{t}"' for t in types)
    return make_layer(f'name: "sn" type: "SearchN" search_n_param {{ batch_num: {batch_num} {fields} '
                      f'record_file_path: "{path}" }}', n_tops=0)


def channel_data(deq, shape, spans):
    acc = np.stack([RNG.integers(-2**s, 2**s, (shape[0],) + shape[2:]) for s in spans], axis=1)
    return (acc * deq.reshape((1, -1) + (1,) * (len(shape) - 2))).astype(np.float32)


def test_search_n_per_channel_and_shared_layers(tmp_path):
    rec = tmp_path / "r.txt"
    sw = "scale_w: 0.01 scale_w: 0.02 scale_w: 0.005"
    rec.write_text(RECORD.format(name="conv1", scale_w=sw) + RECORD.format(name="conv1b", scale_w=sw))
    original = rec.read_text()
    deq = (np.array([0.01, 0.02, 0.005], np.float32) * np.float32(0.05)).astype(np.float32)
    layer = search_layer(rec, ["conv1", "conv1b"], ["Convolution", "Convolution"])
    batches = [channel_data(deq, (2, 3, 4, 4), (10, 20, 26)) for _ in range(2)]
    run(layer, batches[0])
    assert rec.read_text() == original
    run(layer, batches[1])
    want = search_ref(batches, deq)
    assert len(set(want)) > 1
    record = read_record(rec)
    for name in ("conv1", "conv1b"):
        entry = layer_entry(record, name)
        assert list(entry.shift_bit) == want
        assert list(entry.scale_w) == pytest.approx([0.01, 0.02, 0.005])
        assert activation_entry(entry, 0).scale_d == np.float32(0.05)
    after = rec.read_text()
    run(layer, batches[0])
    assert rec.read_text() == after


def test_search_n_inner_product_and_global_conv(tmp_path):
    rec = tmp_path / "r.txt"
    rec.write_text(RECORD.format(name="fc", scale_w="scale_w: 0.004")
                   + RECORD.format(name="gconv", scale_w="scale_w: 0.01 scale_w: 0.03 scale_w: 0.02"))
    fc_deq = np.array([np.float32(0.004) * np.float32(0.05)], np.float32)
    batches = [(RNG.integers(-2**24, 2**24, (4, 5)) * fc_deq[0]).astype(np.float32)]
    run(search_layer(rec, ["fc"], ["InnerProduct"], batch_num=1), batches[0])
    assert list(layer_entry(read_record(rec), "fc").shift_bit) == search_ref(batches, fc_deq)

    deq = (np.array([0.01, 0.03, 0.02], np.float32) * np.float32(0.05)).astype(np.float32)
    batches = [channel_data(deq, (2, 3, 1, 1), (18, 22, 25))]
    run(search_layer(rec, ["gconv"], ["Convolution"], batch_num=1), batches[0])
    entry = layer_entry(read_record(rec), "gconv")
    n = search_ref(batches, deq.max(keepdims=True))[0]
    assert list(entry.shift_bit) == [n] * 3
    assert list(entry.scale_w) == [np.float32(deq.max() / np.float32(0.05))] * 3


def test_search_n_errors(tmp_path):
    rec = tmp_path / "r.txt"
    x = np.ones((1, 3, 2, 2), np.float32)
    with pytest.raises(RecordError, match="Cannot find scale_d of layer 'conv1' in record file"):
        run(search_layer(rec, ["conv1"], batch_num=1), x)  # no record file yet
    rec.write_text('record { key: "conv1" value { scale_w: 0.1 scale_w: 0.2 scale_w: 0.3 } }\n')
    with pytest.raises(RecordError, match="Cannot find scale_d of layer 'conv1' in record file"):
        run(search_layer(rec, ["conv1"], batch_num=1), x)
    rec.write_text(RECORD.format(name="fc", scale_w="scale_w: 0.1 scale_w: 0.2 scale_w: 0.3"))
    with pytest.raises(RecordError, match="InnerProduct 'fc' must have one scale_w"):
        run(search_layer(rec, ["fc"], ["InnerProduct"], batch_num=1), x)
    rec.write_text(RECORD.format(name="a", scale_w="scale_w: 0.1")
                   + RECORD.format(name="b", scale_w="scale_w: 0.2"))
    with pytest.raises(RecordError, match="differ"):
        run(search_layer(rec, ["a", "b"], batch_num=1), x)
    with pytest.raises(GraphError, match="layer 'sn'.*layer_type"):
        search_layer(rec, ["a", "b"], ["Convolution"])


def test_ifmr_layers_of_one_net_write_their_record_once(tmp_path, monkeypatch):
    """Printing the record is slow in Python: the layers finishing in one forward share one write."""
    from amct_caffe.runtime import record_sink

    record = tmp_path / "record.txt"
    ifmr = ('layer {{ name: "{name}" type: "IFMR" bottom: "{bottom}" ifmr_param {{ batch_num: 2 '
            'search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 max_percentile: 0.999999 '
            'min_percentile: 0.999999 object_layer: "{target}" record_file_path: "{path}" }} }}\n')
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'
            'layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }\n'
            + ifmr.format(name="a_ifmr", bottom="data", target="relu", path=record)
            + ifmr.format(name="b_ifmr", bottom="r", target="sig", path=record)
            + 'layer { name: "sig" type: "Sigmoid" bottom: "r" top: "s" }\n')
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    writes = []
    real_write = record_sink.write_record
    monkeypatch.setattr(record_sink, "write_record", lambda rec, path: (writes.append(path), real_write(rec, path)))
    net = Net(str(proto), TEST)
    rng = np.random.default_rng(0)
    for _ in range(2):
        net.forward(data=rng.normal(size=(2, 3, 4, 4)).astype(np.float32))
    assert len(writes) == 1
    rec = read_record(record)
    assert set(rec.layers) == {"relu", "sig"}
