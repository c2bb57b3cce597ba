"""Small convolutions in one C++ call (conv_plan.ConvPlan.native / .unbiased, and runtime/forward.py's runs of
them with the MAX pooling between): the bytes of the NumPy path, with and without bias and activation.

The references are conv.Convolution (whose GEMMs are np.matmul) followed by NumPy's ReLU or activation.PReLU,
and a freshly built net's first forward (the full per-layer path, no prepared steps).
"""

import numpy as np
import pytest

from amct_caffe.errors import GraphError
from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime.layers import caffe_gemm, conv_plan
from amct_caffe.runtime.layers.activation import PReLU
from amct_caffe.runtime.layers.conv import Convolution


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _case(seed):
    """x, weight, bias or None, stride, pad of a random small convolution (1x1 for every third seed)."""
    rng = np.random.default_rng(seed)
    n, c, o = int(rng.integers(1, 3)), int(rng.integers(2, 9)), int(rng.integers(1, 40))
    h, w = (int(v) for v in rng.integers(3, 14, 2))
    if seed % 3 == 0:
        k, stride, pad = (1, 1), (1, 1), (0, 0)
    else:
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        stride = tuple(int(v) for v in rng.integers(1, 3, 2))
        pad = tuple(int(v) for v in rng.integers(0, 2, 2))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x[x < -1.5] = 0
    weight = rng.standard_normal((o, c) + k).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32) if seed % 2 else None
    return x, weight, bias, stride, pad


def _reference(x, weight, bias, stride, pad, act, slope):
    y = Convolution(x, weight, bias, stride=stride, pad=pad)
    if act == 1:
        return np.maximum(y, np.float32(0))
    return PReLU(y, slope) if act == 2 else y


@pytest.mark.skipif(not conv_plan.numpy_sgemm_bound(), reason="numpy's BLAS sgemm could not be bound")
@pytest.mark.parametrize("seed", range(24))
def test_native_small_convolution_gives_the_numpy_bytes(seed):
    x, weight, bias, stride, pad = _case(seed)
    act = seed % 3 if seed % 4 else (seed // 4) % 3
    slope = np.random.default_rng(seed).uniform(-0.5, 0.5, 1 if seed % 5 == 0 else weight.shape[0]).astype(np.float32)
    plan = conv_plan.conv_plan(x.shape, weight.shape, stride, pad, (1, 1), 1)
    kernel = plan.native(act)
    if kernel is None:
        pytest.skip(f"a {plan.kind} plan, or a GEMM not made in one numpy call, on this machine")
    want = _reference(x, weight, bias, stride, pad, act, slope)
    for _ in range(2):  # the kernel's scratch is reused
        got = kernel(x, weight, bias, slope if act == 2 else None)
        np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("seed", range(12))
def test_unbiased_small_convolution_gives_the_numpy_bytes(seed):
    x, weight, _, stride, pad = _case(seed)
    plan = conv_plan.conv_plan(x.shape, weight.shape, stride, pad, (1, 1), 1)
    run = plan.unbiased()
    if run is None:
        pytest.skip(f"a {plan.kind} plan")
    got = run(x, weight.reshape(1, weight.shape[0], -1))
    np.testing.assert_array_equal(_bits(got), _bits(Convolution(x, weight, stride=stride, pad=pad)))


PNET = '''
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 10 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1"
        prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 16 kernel_size: 3 bias_term: false
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
        convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prelu3" type: "PReLU" bottom: "conv3" top: "conv3" prelu_param { channel_shared: true } }
layer { name: "head1" type: "Convolution" bottom: "conv3" top: "head1"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "head2" type: "Convolution" bottom: "conv3" top: "head2"
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "head1" top: "prob" }
'''


@pytest.mark.parametrize("fold", ["auto", "off"])
@pytest.mark.parametrize("shape", [(1, 3, 12, 12), (2, 3, 13, 17)])
def test_prepared_small_net_keeps_the_full_path_bytes_and_earlier_results(tmp_path, fold, shape):
    """Forward after forward (prepared steps, the native ops in one call), every blob is a fresh net's first
    forward's; an intermediate blob's array a caller kept from an earlier forward still holds that forward's
    values, and an output's is the blob's memory, as in pycaffe (it holds the last forward's)."""
    path, net = _pnet(tmp_path, fold=fold)
    rng = np.random.default_rng(1)
    kept, first = [], None
    for _ in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        out = net.forward(data=x)
        _assert_full_path_bytes(path, net, x)
        conv3 = net.blobs["conv3"].data
        kept.append((conv3, conv3.copy()))
        for held, values in kept:
            np.testing.assert_array_equal(_bits(held), _bits(values))
        first = first or out
        for name, value in out.items():
            assert value is first[name] is net.blobs[name].data, name


def _pnet(tmp_path, **kwargs):
    """(the prototxt's path, a Net of PNET) with seeded weights."""
    path = tmp_path / "tiny.prototxt"
    path.write_text(PNET)
    return path, Net(str(path), TEST, **kwargs)


def _fresh_blobs(path, net, x):
    fresh = Net(str(path), TEST, fold="off")
    for name, blobs in net.params.items():
        for blob, src in zip(fresh.params[name], blobs, strict=True):
            blob.data[...] = src.data
    fresh.forward(data=x)
    return {k: b.data for k, b in fresh.blobs.items()}


def _assert_full_path_bytes(path, net, x):
    """Every blob of ``net`` has the bytes of a fresh net's first forward (the full path) on ``x``."""
    for name, want in _fresh_blobs(path, net, x).items():
        np.testing.assert_array_equal(_bits(net.blobs[name].data), _bits(want), err_msg=name)


def test_small_ops_fall_back_to_their_own_steps(tmp_path):
    """Under another GEMM configuration than the ops were made for, and with a learned array the C++ call
    refuses (not C-contiguous), the layers still run, one by one, with the full path's bytes."""
    path, net = _pnet(tmp_path)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    net.forward(data=x)
    net.forward(data=x)  # the prepared steps
    try:
        caffe_gemm.configure()  # the same settings, detected afresh: another configuration object
        x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
        net.forward(data=x)
        _assert_full_path_bytes(path, net, x)
    finally:
        caffe_gemm.configure()
    net = Net(str(path), TEST)
    net.forward(data=x)
    weight = net.params["conv2"][0]
    weight.data = np.asfortranarray(weight.data)  # the same values, refused by the C++ call
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    net.forward(data=x)
    _assert_full_path_bytes(path, net, x)


def test_an_input_of_another_rank_gets_the_layers_own_error(tmp_path):
    """An input array of another rank put in the blob is refused by the one-call step (which checks before it
    runs anything) and reaches the layers' own steps, which name the layer, as the full path would."""
    path, net = _pnet(tmp_path)
    x = np.random.default_rng(4).standard_normal((1, 3, 12, 12)).astype(np.float32)
    net.forward(data=x)
    net.forward(data=x)  # the prepared steps
    net.blobs["data"].data = x[0].copy()
    with pytest.raises(GraphError, match=r"layer 'conv1' \(Convolution\).*bottom of shape \[3, 12, 12\]"):
        net.forward()
    net.blobs["data"].data = x.copy()  # the right rank again: the one-call step runs, with the full path's bytes
    net.forward()
    _assert_full_path_bytes(path, net, x)


@pytest.mark.skipif(not conv_plan.numpy_sgemm_bound(), reason="numpy's BLAS sgemm could not be bound")
def test_run_rewrites_its_tops_only_when_no_one_else_holds_them(tmp_path):
    """The whole net (convolutions, pooling, the Softmax) runs as one SmallRun step, which writes each top into
    its array of the last forward when only the blob holds it, and into fresh memory when a caller kept the
    array or a view of it: those keep their values. An output's array stays the blob's, as in pycaffe: a
    forward's result dict holds the last forward's values. Every blob has the bytes of the full path."""
    path, net = _pnet(tmp_path)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(5)]
    net.forward(data=xs[0])
    net.forward(data=xs[1])  # the prepared steps
    assert len(net._steps) == 1  # noqa: SLF001 - one call for the whole net
    tops = [t for t in net.blobs if t != "data"]
    before = {t: net.blobs[t].data for t in tops}
    ids = {t: id(a) for t, a in before.items()}
    del before
    net.forward(data=xs[2])
    assert {t: id(net.blobs[t].data) for t in tops} == ids  # no one held them: rewritten in place
    kept = net.blobs["conv3"].data
    view = net.blobs["pool1"].data[0, 1:]
    result = net.forward(data=xs[3])
    assert set(result) == {"head2", "prob"}
    snapshot = {"conv3": kept.copy(), "pool1": view.copy(), **{k: v.copy() for k, v in result.items()}}
    net.forward(data=xs[4])
    _assert_full_path_bytes(path, net, xs[4])
    np.testing.assert_array_equal(_bits(kept), _bits(snapshot["conv3"]))
    np.testing.assert_array_equal(_bits(view), _bits(snapshot["pool1"]))
    for k, v in result.items():
        assert net.blobs[k].data is v
        assert not np.array_equal(_bits(v), _bits(snapshot[k])), k  # the next forward's values
    assert net.blobs["conv3"].data is not kept and not np.shares_memory(net.blobs["pool1"].data, view)
    assert id(net.blobs["conv1"].data) == ids["conv1"]  # the others still reused


@pytest.mark.skipif(not conv_plan.numpy_sgemm_bound(), reason="numpy's BLAS sgemm could not be bound")
def test_run_takes_the_arrays_a_user_puts_in_the_blobs(tmp_path):
    """A top array replaced by the user (a new array, then one of another shape) is not written into; the
    step makes its own again, with the full path's bytes."""
    path, net = _pnet(tmp_path)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    net.forward(data=x)
    net.forward(data=x)
    mine = np.zeros_like(net.blobs["conv2"].data)
    net.blobs["conv2"].data = mine
    net.forward(data=x)
    assert not mine.any() and net.blobs["conv2"].data is not mine
    net.blobs["conv2"].data = np.zeros(5, np.float32)
    held = net.blobs["conv2"].data
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    net.forward(data=x)
    assert not held.any()
    _assert_full_path_bytes(path, net, x)
