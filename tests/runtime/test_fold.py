"""In-place BatchNorm / Scale / ReLU chains after a convolution run as one step (runtime/fold.py)."""

import numpy as np
import pytest

from amct_caffe import GraphError
from amct_caffe.runtime import TEST, TRAIN, Net
from amct_caffe.runtime.fold import FoldMode, channel_affine, resolve_mode
from amct_caffe.runtime.layers.batch_norm import BatchNorm
from amct_caffe.runtime.layers.conv import Convolution
from amct_caffe.runtime.layers.scale_bias import Scale

CHAIN = '''
name: "chain"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "conv2" type: "Convolution" bottom: "conv" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "r2" }
'''


def _net(tmp_path, fold, text=CHAIN, phase=TEST):
    p = tmp_path / "chain.prototxt"
    p.write_text(text)
    net = Net(str(p), phase, fold=fold)
    rng = np.random.default_rng(3)
    for name in ("bn", "scale"):
        if name in net.params:
            for blob in net.params[name]:
                blob.data[...] = rng.uniform(0.5, 2.0, blob.shape).astype(np.float32)
    return net


def _x():
    return np.random.default_rng(0).normal(size=(2, 3, 9, 9)).astype(np.float32)


def test_chains_are_found_only_in_place(tmp_path):
    net = _net(tmp_path, "auto")
    assert [(c.first, c.last, c.mode) for c in net._chains.values()] == [(1, 4, FoldMode.FAST)]
    # conv2's ReLU writes another blob: conv2's top is observable, nothing is folded
    assert 5 not in net._chains


def test_exact_fold_gives_the_unfolded_bytes_and_fast_is_close(tmp_path):
    x = _x()
    off = {k: v.copy() for k, v in _net(tmp_path, "off").forward(data=x, blobs=["conv"]).items()}
    exact = _net(tmp_path, "exact").forward(data=x, blobs=["conv"])
    fast = _net(tmp_path, "fast").forward(data=x, blobs=["conv"])
    for k in off:
        np.testing.assert_array_equal(exact[k], off[k])
        np.testing.assert_allclose(fast[k], off[k], rtol=1e-5, atol=1e-5)


def test_a_forward_cut_inside_a_chain_runs_it_unfolded(tmp_path):
    net, ref = _net(tmp_path, "fast"), _net(tmp_path, "off")
    x = _x()
    got = net.forward(data=x, end="bn")["conv"].copy()
    np.testing.assert_array_equal(got, ref.forward(data=x, end="bn")["conv"])
    net.forward(start="scale", end="relu")
    ref.forward(start="scale", end="relu")
    np.testing.assert_array_equal(net.blobs["conv"].data, ref.blobs["conv"].data)


def test_weights_changed_after_construction_are_used(tmp_path):
    net, ref = _net(tmp_path, "fast"), _net(tmp_path, "off")
    x = _x()
    # between forwards too: the folded map is kept from one forward to the next only while its blobs stay
    for change in (lambda n: n.params["scale"][0].data.__imul__(3), lambda n: n.params["conv"][1].data.__isub__(1),
                   lambda n: n.params["bn"][0].data.__iadd__(0.5), lambda n: n.params["bn"][2].data.__imul__(2)):
        for n in (net, ref):
            change(n)
        np.testing.assert_allclose(net.forward(data=x)["r2"], ref.forward(data=x)["r2"], rtol=1e-5, atol=1e-5)


def test_no_fold_where_a_backward_or_quantization_layer_may_look(tmp_path):
    assert _net(tmp_path, "auto", CHAIN + "force_backward: true")._chains == {}
    assert _net(tmp_path, "auto", CHAIN, TRAIN)._chains == {}  # batch statistics: no fixed affine map
    assert resolve_mode("auto", ["Convolution", "Quant", "ReLU"]) is FoldMode.EXACT
    assert resolve_mode("auto", ["Convolution", "ReLU"]) is FoldMode.FAST
    with pytest.raises(GraphError, match="fold must be"):
        _net(tmp_path, "sometimes")


@pytest.mark.parametrize("bias", [None, np.array([0.5, -1.0, 2.0], np.float32)])
def test_channel_affine_is_batchnorm_then_scale(bias):
    class _Blob:
        def __init__(self, a):
            self.data = np.asarray(a, np.float32)

    class _Layer:
        def __init__(self, type_, blobs, eps=1e-5):
            self.type, self.blobs, self.eps = type_, [_Blob(b) for b in blobs], eps

    rng = np.random.default_rng(1)
    mean, var, gamma, beta = (rng.normal(size=3), rng.uniform(0.1, 2, 3), rng.normal(size=3), rng.normal(size=3))
    bn = _Layer("BatchNorm", [mean * 2, var * 2, [2.0]])
    sc = _Layer("Scale", [gamma, beta])
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 1, 1)).astype(np.float32)
    want = Scale(BatchNorm(Convolution(x, w, bias), mean * 2, var * 2, [2.0]), gamma, beta)
    a, b = channel_affine([bn, sc], bias, 3)
    got = Convolution(x, w) * a.reshape(3, 1, 1) + b.reshape(3, 1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_relu_in_place_after_an_eltwise_is_folded(tmp_path):
    text = CHAIN + '''layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "r2" top: "sum" }
layer { name: "sum_relu" type: "ReLU" bottom: "sum" top: "sum" }
'''
    net, ref = _net(tmp_path, "exact", text), _net(tmp_path, "off", text)
    assert net._chains[7].last == 8
    x = _x()
    np.testing.assert_array_equal(net.forward(data=x)["sum"], ref.forward(data=x)["sum"])


RESIDUAL = CHAIN + '''layer { name: "conv3" type: "Convolution" bottom: "conv" top: "conv3"
        convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn3" type: "BatchNorm" bottom: "conv3" top: "conv3" }
layer { name: "scale3" type: "Scale" bottom: "conv3" top: "conv3" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "conv" bottom: "conv3" top: "sum" }
layer { name: "sum_relu" type: "ReLU" bottom: "sum" top: "sum" }
'''


def test_a_residual_sum_runs_with_the_fast_chain_before_it(tmp_path, monkeypatch):
    from amct_caffe.runtime import fold

    x = _x()
    net = _net(tmp_path, "fast", RESIDUAL)
    assert [(c.first, c.last, c.residual, c.other) for c in net._chains.values() if c.residual] == [(7, 11, 10, 0)]
    got = {k: v.copy() for k, v in net.forward(data=x, blobs=["conv3", "sum"]).items()}
    monkeypatch.setattr(fold, "_residual_tail", lambda *a: None)  # the same chain, the Eltwise on its own
    want = _net(tmp_path, "fast", RESIDUAL).forward(data=x, blobs=["conv3", "sum"])
    for k in ("conv3", "sum"):
        np.testing.assert_array_equal(got[k].view(np.uint32), want[k].view(np.uint32))
    assert not any(c.residual for c in _net(tmp_path, "exact", RESIDUAL)._chains.values())


SQUASHED = '''
name: "squashed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 16 dim: 34 dim: 54 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "y"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.08 }
                            bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "scale" type: "Scale" bottom: "y" top: "y" scale_param { bias_term: true } }
layer { name: "tanh" type: "TanH" bottom: "y" top: "y" }
'''


TANH_IN_PLACE = 'layer { name: "tanh" type: "TanH" bottom: "y" top: "y" }'
READERS = {
    "in place": TANH_IN_PLACE,
    "a TanH into a new blob": 'layer { name: "tanh" type: "TanH" bottom: "y" top: "t" }',
    "a Sigmoid after a pooling": 'layer { name: "p" type: "Pooling" bottom: "y" top: "p" pooling_param { '
                                 'pool: MAX kernel_size: 2 stride: 2 } }\n'
                                 'layer { name: "s" type: "Sigmoid" bottom: "p" top: "s" }',
    "a Softmax": 'layer { name: "sm" type: "Softmax" bottom: "y" top: "sm" }',
}


@pytest.mark.parametrize("level", [2, 1])
@pytest.mark.parametrize("reader", list(READERS))
def test_a_chain_whose_result_is_squashed_runs_exact(tmp_path, level, reader, simd_limit):
    """A 3x3 chain whose values a TanH / Sigmoid / Softmax squashes: FAST's differences, small against the chain's
    own scale (raw pixels: |y| up to ~800), would be large against the squashed output ([-1, 1]); the chain runs
    EXACT and every blob has the unfolded bytes."""
    simd_limit(level)
    x = np.floor(np.random.default_rng(0).uniform(0, 256, (4, 16, 34, 54))).astype(np.float32)
    text = SQUASHED.replace(TANH_IN_PLACE, READERS[reader])
    fast = _net(tmp_path, "fast", text)
    assert [c.mode for c in fast._chains.values()] == [FoldMode.EXACT]
    got = {k: v.copy() for k, v in fast.forward(data=x, blobs=list(fast.blobs)).items()}
    want = _net(tmp_path, "off", text).forward(data=x, blobs=list(fast.blobs))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_chain_whose_result_is_mixed_by_a_convolution_first_stays_fast(tmp_path):
    """A Softmax / ELU after the next convolution, or a TanH on a PriorBox reading the chain (its shape only),
    leave the chain FAST."""
    text = SQUASHED.replace(TANH_IN_PLACE, 'layer { name: "p" type: "Pooling" bottom: "y" top: "p" pooling_param { '
                            'pool: AVE kernel_size: 2 stride: 2 } }\nlayer { name: "c" type: "Convolution" bottom: "p" '
                            'top: "c" convolution_param { num_output: 2 kernel_size: 1 } }\nlayer { name: "pb" '
                            'type: "PriorBox" bottom: "y" bottom: "data" top: "pb" prior_box_param { min_size: 4 } }\n'
                            'layer { name: "s" type: "Softmax" bottom: "c" top: "s" }\n'
                            'layer { name: "e" type: "ELU" bottom: "c" top: "e" }\n'
                            'layer { name: "t" type: "TanH" bottom: "pb" top: "t" }')
    assert [c.mode for c in _net(tmp_path, "fast", text)._chains.values()] == [FoldMode.FAST]


def test_calibration_nets_fold_with_the_fast_kernels_unless_ifmr_is_exact():
    assert resolve_mode("auto", ["Convolution", "IFMR", "ReLU"]) is FoldMode.CALIBRATION
    assert resolve_mode("auto", ["Convolution", "SearchN", "BNUpdate"]) is FoldMode.CALIBRATION
    assert resolve_mode("auto", ["Convolution", "IFMR", "ReLU"], ifmr="exact") is FoldMode.EXACT
    assert resolve_mode("auto", ["IFMR", "Quant"]) is FoldMode.EXACT  # a fake-quant layer rounds what it reads
    assert resolve_mode("calibration", ["Convolution"]) is FoldMode.CALIBRATION
    # the recurrent layers the tool writes: calibration forms observe, quantized forms round
    assert resolve_mode("auto", ["Convolution", "LSTMCalibration"]) is FoldMode.CALIBRATION
    assert resolve_mode("auto", ["Convolution", "LSTMCalibration"], ifmr="exact") is FoldMode.EXACT
    assert resolve_mode("auto", ["Convolution", "GRUQuant"]) is FoldMode.EXACT
    assert resolve_mode("auto", ["Convolution", "LSTM"]) is FoldMode.FAST


# A calibration net's float part after BN fusion: a 3x3 convolution and ReLU (Winograd), a 1x1 one with no
# in-place layer after it (the pointwise kernel, a chain of its own), and a wide 3x3 one on a small map,
# whose transformed weights would be larger than its output (kept on the GEMM).
CALIBRATION_FLOAT = '''
name: "calibration_float"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 8 dim: 24 dim: 24 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.2 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "point" type: "Convolution" bottom: "conv" top: "point"
        convolution_param { num_output: 24 kernel_size: 1 weight_filler { type: "gaussian" std: 0.2 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "pool" type: "Pooling" bottom: "point" top: "pool" pooling_param { pool: MAX kernel_size: 4 stride: 4 } }
layer { name: "wide" type: "Convolution" bottom: "pool" top: "wide"
        convolution_param { num_output: 64 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu_wide" type: "ReLU" bottom: "wide" top: "wide" }
'''


def test_calibration_mode_runs_every_convolution_fast_within_float_noise(tmp_path):
    x = np.random.default_rng(4).normal(size=(2, 8, 24, 24)).astype(np.float32)
    net, ref = _net(tmp_path, "calibration", CALIBRATION_FLOAT), _net(tmp_path, "off", CALIBRATION_FLOAT)
    chains = {net._layer_names[i]: (c.last - c.first, c.mode) for i, c in net._chains.items()}
    assert chains == {"conv": (1, FoldMode.CALIBRATION), "point": (0, FoldMode.CALIBRATION),
                      "wide": (1, FoldMode.CALIBRATION)}
    # FAST leaves a convolution + ReLU chain and a lone convolution with Caffe's arithmetic
    fast = _net(tmp_path, "fast", CALIBRATION_FLOAT)
    assert {fast._layer_names[i] for i in fast._chains} == {"conv", "wide"}
    for _ in range(2):  # the first forward and the prepared steps of the next
        got = {k: v.copy() for k, v in net.forward(data=x, blobs=["conv", "point"]).items()}
        want = ref.forward(data=x, blobs=["conv", "point"])
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5 * np.abs(v).max())
        assert not np.array_equal(got["conv"], want["conv"])  # Winograd ran
        np.testing.assert_array_equal(fast.forward(data=x)["wide"], want["wide"])
    # Winograd kept its transformed weights for the first layer only: 36 * 16 * 8 floats against its
    # 2 * 16 * 24 * 24 outputs; the wide layer's 36 * 64 * 24 are more than its 2 * 64 * 6 * 6
    caches = {net._layer_names[i]: c.weights._u is not None for i, c in net._chains.items()}
    assert caches == {"conv": True, "point": False, "wide": False}


def test_calibration_mode_gives_every_forward_the_same_bytes(tmp_path):
    """The first forward (full path) and the prepared later ones take the same kernels: FAST's where Caffe's
    arithmetic would run a column GEMM, Caffe's one-call path on small inputs."""
    for shape, fast in (((2, 8, 24, 24), True), ((1, 3, 16, 16), False)):
        dims = " ".join(f"dim: {d}" for d in shape)
        text = CALIBRATION_FLOAT.replace("dim: 2 dim: 8 dim: 24 dim: 24", dims)
        net, ref = _net(tmp_path, "calibration", text), _net(tmp_path, "off", text)
        x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        first, *later = [{k: v.copy() for k, v in net.forward(data=x, blobs=["conv", "point"]).items()}
                         for _ in range(3)]
        want = ref.forward(data=x, blobs=["conv", "point"])
        assert np.array_equal(first["conv"], want["conv"]) is not fast, shape  # Winograd or Caffe's arithmetic
        for out in later:
            for k, v in first.items():
                np.testing.assert_array_equal(out[k], v, err_msg=f"{shape} {k}")


def test_a_calibration_layer_lets_go_of_winograd_weights_it_no_longer_uses(tmp_path):
    net = _net(tmp_path, "calibration", CALIBRATION_FLOAT)
    conv = next(c for i, c in net._chains.items() if net._layer_names[i] == "conv")
    net.forward(data=np.ones((2, 8, 24, 24), np.float32))
    assert conv.weights._u is not None
    net.blobs["data"].reshape(1, 8, 2, 2)  # 36 * 16 * 8 transformed weights against 1 * 16 * 2 * 2 outputs
    net.forward(data=np.ones((1, 8, 2, 2), np.float32))
    assert conv.weights._u is None


def test_an_out_of_place_batchnorm_and_its_in_place_layers_fold_in_fast(tmp_path):
    """MobileNet-v2's pattern: conv -> BatchNorm writing 'bn' -> Scale / ReLU in place on 'bn'. In FAST the three
    are one chain (a copy, one affine pass); the convolution's own top stays observable and unchanged."""
    text = CHAIN.replace('name: "bn" type: "BatchNorm" bottom: "conv" top: "conv"',
                         'name: "bn" type: "BatchNorm" bottom: "conv" top: "bn"')
    text = text.replace('bottom: "conv" top: "conv" scale_param', 'bottom: "bn" top: "bn" scale_param')
    text = text.replace('type: "ReLU" bottom: "conv" top: "conv"', 'type: "ReLU" bottom: "bn" top: "bn"')
    text = text.replace('type: "Convolution" bottom: "conv"', 'type: "Convolution" bottom: "bn"')
    x = _x()
    fast_net = _net(tmp_path, "auto", text)
    assert [(c.first, c.last, c.head.type) for c in fast_net._chains.values()] == [(2, 4, "BatchNorm")]
    assert not _net(tmp_path, "exact", text)._chains or all(c.head.type != "BatchNorm"
                                                            for c in _net(tmp_path, "exact", text)._chains.values())
    off = _net(tmp_path, "off", text)
    want = {k: v.copy() for k, v in off.forward(data=x, blobs=["conv", "bn"]).items()}
    for _ in range(2):  # the first forward, then the prepared steps
        got = fast_net.forward(data=x, blobs=["conv", "bn"])
        np.testing.assert_array_equal(got["conv"], want["conv"])
        np.testing.assert_allclose(got["bn"], want["bn"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["r2"], want["r2"], rtol=1e-5, atol=1e-5)
        assert (got["bn"] >= 0).all()


def test_a_batchnorm_head_takes_its_mean_first_where_it_dwarfs_the_spread(tmp_path):
    """A BatchNorm on a raw feature of 250 +- 0.02: folded into one shift, the mean cancelled x * a and left
    8.8e-4 of float32 rounding, over the 1e-4 budget; subtracted first (Caffe's first step) it leaves none."""
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 } } }\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }\n'
            'layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "bn" top: "ip" inner_product_param { num_output: 2 '
            'weight_filler { type: "gaussian" std: 1 } } }\n')
    rng = np.random.default_rng(1)
    x = (250 + 0.02 * rng.standard_normal((4, 3))).astype(np.float32)
    got = {}
    for fold in ("auto", "off"):
        net = _net(tmp_path, fold, text)
        net.params["bn"][0].data[...] = 250
        net.params["bn"][1].data[...] = 4e-4
        net.params["bn"][2].data[...] = 1
        got[fold] = {k: v.copy() for k, v in net.forward(data=x, blobs=["bn"]).items()}
    assert len(_net(tmp_path, "auto", text)._chains) == 1
    for k in ("bn", "ip"):
        np.testing.assert_allclose(got["auto"][k], got["off"][k], rtol=0, atol=1e-5 * np.abs(got["off"][k]).max())


@pytest.mark.parametrize("mean, var, eps", [(3e38, 1.0, 1e-5), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0)])
def test_a_batchnorm_head_with_infinite_terms_gives_the_unfolded_values(tmp_path, mean, var, eps):
    """A mean of inf (3e38 / a factor of 0.5) made the folded shift inf - inf = NaN, and eps 0 with variance 0
    made 0 * inf = NaN, where Caffe and the unfolded layers give +-inf."""
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }\n'
            f'layer {{ name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param {{ eps: {eps} }} }}\n'
            'layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }\n')
    x = np.random.default_rng(2).normal(size=(2, 3, 2, 2)).astype(np.float32)
    got = {}
    for fold in ("auto", "off"):
        net = _net(tmp_path, fold, text)
        net.params["bn"][0].data[...] = mean
        net.params["bn"][1].data[...] = var
        net.params["bn"][2].data[...] = 0.5
        got[fold] = net.forward(data=x)["bn"].copy()
    np.testing.assert_array_equal(np.isnan(got["auto"]), np.isnan(got["off"]))
    np.testing.assert_array_equal(np.isinf(got["auto"]), np.isinf(got["off"]))
    finite = np.isfinite(got["off"])
    np.testing.assert_allclose(got["auto"][finite], got["off"][finite], rtol=1e-5, atol=1e-5)
