"""Prepared forwards write a top into its array of the last forward when nothing else holds it
(runtime/forward.py's _sole_array): the same bytes as fresh memory, and never an array a caller kept.

The net has one of each convolution path that takes the array: a folded chain through the direct kernel
(7x7 / 2 on 3 channels), Winograd (FAST) or the column GEMM (EXACT), the depthwise kernel, a residual
chain (1x1 direct kernel, then the affine + add + ReLU kernel), an Eltwise + ReLU chain, three lone
convolutions (column GEMM, 1x1 GEMM, 1x1 GEMM over the images side by side), a MAX pooling and an
out-of-place ReLU.
"""

import sys

import numpy as np
import pytest

from amct_caffe.runtime import TEST, Net
from amct_caffe.runtime import forward as forward_steps

_BN = ('layer {{ name: "{0}_bn" type: "BatchNorm" bottom: "{0}" top: "{0}" }}\n'
       'layer {{ name: "{0}_scale" type: "Scale" bottom: "{0}" top: "{0}" scale_param {{ bias_term: true }} }}\n')
_FILLER = 'weight_filler { type: "gaussian" std: 0.2 } bias_filler { type: "gaussian" std: 0.1 }'
PROTO = (
    'name: "reuse"\n'
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 64 dim: 64 } } }\n'
    f'layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param {{ num_output: 16 '
    f'kernel_size: 7 stride: 2 pad: 3 {_FILLER} }} }}\n' + _BN.format("conv1") +
    'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
    f'layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param {{ num_output: 16 '
    f'kernel_size: 3 pad: 1 {_FILLER} }} }}\n' + _BN.format("conv2") +
    'layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }\n'
    f'layer {{ name: "dw" type: "Convolution" bottom: "conv2" top: "dw" convolution_param {{ num_output: 16 group: 16 '
    f'kernel_size: 3 pad: 1 {_FILLER} }} }}\n'
    'layer { name: "relu3" type: "ReLU" bottom: "dw" top: "dw" }\n'
    f'layer {{ name: "pw" type: "Convolution" bottom: "dw" top: "pw" convolution_param {{ num_output: 16 '
    f'kernel_size: 1 {_FILLER} }} }}\n' + _BN.format("pw") +
    'layer { name: "sum" type: "Eltwise" bottom: "pw" bottom: "conv1" top: "sum" }\n'
    'layer { name: "relu4" type: "ReLU" bottom: "sum" top: "sum" }\n'
    'layer { name: "sum2" type: "Eltwise" bottom: "sum" bottom: "conv2" top: "sum2" }\n'
    'layer { name: "relu5" type: "ReLU" bottom: "sum2" top: "sum2" }\n'
    f'layer {{ name: "lone" type: "Convolution" bottom: "sum2" top: "lone" convolution_param {{ num_output: 24 '
    f'kernel_size: 3 stride: 2 {_FILLER} }} }}\n'
    'layer { name: "relu6" type: "ReLU" bottom: "lone" top: "lone_relu" }\n'
    f'layer {{ name: "expand" type: "Convolution" bottom: "sum2" top: "expand" convolution_param {{ num_output: 128 '
    f'kernel_size: 1 {_FILLER} }} }}\n'
    'layer { name: "pool" type: "Pooling" bottom: "expand" top: "pool" '
    'pooling_param { pool: MAX kernel_size: 4 stride: 4 } }\n'
    f'layer {{ name: "squeeze" type: "Convolution" bottom: "pool" top: "squeeze" convolution_param {{ num_output: 160 '
    f'kernel_size: 1 {_FILLER} }} }}\n'
)
LARGE = ["conv1", "conv2", "dw", "pw", "sum", "sum2", "lone", "lone_relu", "expand", "pool", "squeeze"]


@pytest.fixture
def proto(tmp_path):
    p = tmp_path / "reuse.prototxt"
    p.write_text(PROTO)
    return str(p)


def _net(proto, fold):
    net = Net(proto, TEST, fold=fold, seed=3)
    rng = np.random.default_rng(7)
    for name, blobs in net.params.items():  # BatchNorm statistics a deploy model would have
        if name.endswith("_bn"):
            c = blobs[0].data.shape[0]
            blobs[0].data[...] = rng.standard_normal(c).astype(np.float32) * np.float32(0.1)
            blobs[1].data[...] = rng.uniform(0.5, 2.0, c).astype(np.float32)
            blobs[2].data[...] = np.float32(1)
    return net


def _inputs(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 3, 64, 64)).astype(np.float32) for _ in range(count)]


def _address(arr) -> int:
    return arr.__array_interface__["data"][0]


@pytest.mark.parametrize("fold", ["auto", "exact", "off"])
def test_rewritten_tops_hold_the_bytes_of_a_fresh_forward(proto, fold):
    net = _net(proto, fold)
    fresh_net = _net(proto, fold)
    for x in _inputs(4):
        net.forward(data=x)
        fresh = _net(proto, fold)  # a new net's first forward: the full path, fresh memory
        fresh.forward(data=x)
        for name, blob in fresh.blobs.items():
            assert net.blobs[name].data.tobytes() == blob.data.tobytes(), (fold, name)
    del fresh_net


def test_tops_no_one_holds_keep_their_memory_and_held_ones_are_left_alone(proto):
    net = _net(proto, "auto")
    xs = _inputs(4, seed=1)
    net.forward(data=xs[0])
    net.forward(data=xs[1])  # from here on the prepared steps run
    addresses = {name: _address(net.blobs[name].data) for name in LARGE}
    net.forward(data=xs[2])
    assert {name: _address(net.blobs[name].data) for name in LARGE} == addresses
    held = {name: net.blobs[name].data for name in ("conv1", "sum", "lone")}  # a caller keeps these
    kept = {name: arr.copy() for name, arr in held.items()}
    view = net.blobs["pw"].data[1]  # and a view of this one
    view_kept = view.copy()
    net.forward(data=xs[3])
    for name, arr in held.items():
        assert arr.tobytes() == kept[name].tobytes(), name
        assert _address(net.blobs[name].data) != _address(arr), name
    assert view.tobytes() == view_kept.tobytes()
    reference = _net(proto, "auto")
    reference.forward(data=xs[3])
    for name in LARGE:
        assert net.blobs[name].data.tobytes() == reference.blobs[name].data.tobytes(), name


def test_kernels_refuse_an_array_that_does_not_fit():
    kernels = pytest.importorskip("amct_caffe._kernels")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 3, 5, 7)).astype(np.float32) for _ in range(2))
    want = np.maximum(a + b, np.float32(0))
    into = np.full_like(a, np.nan)
    out = kernels.add_relu(a, b, 1, into)
    assert out is into and out.tobytes() == want.tobytes()
    for other in (np.empty((2, 3, 5, 6), np.float32), np.empty(a.shape, np.float64),
                  np.empty((2, 3, 7, 5), np.float32).transpose(0, 1, 3, 2), a):  # shape, dtype, layout, an input
        before = other.copy()
        out = kernels.add_relu(a, b, 1, other)
        assert out is not other and out.tobytes() == want.tobytes()
        if other is not a:
            assert other.tobytes() == before.tobytes()
    assert a.tobytes() != want.tobytes()  # the input was not written
    readonly = np.empty_like(a)
    readonly.flags.writeable = False
    assert kernels.add_relu(a, b, 1, readonly) is not readonly


def test_a_top_made_read_only_gets_a_fresh_array(proto):
    """A user may mark a blob's array read-only (without keeping it): the next forward writes a fresh one."""
    net = _net(proto, "auto")
    xs = _inputs(3, seed=2)
    net.forward(data=xs[0])
    net.forward(data=xs[1])
    for name in LARGE:
        net.blobs[name].data.flags.writeable = False
    net.forward(data=xs[2])
    reference = _net(proto, "auto")
    reference.forward(data=xs[2])
    for name in LARGE:
        assert net.blobs[name].data.tobytes() == reference.blobs[name].data.tobytes(), name


def test_the_sole_reference_count_ignores_a_tracer_reading_locals():
    """A debugger's trace function that reads each frame's locals keeps a reference more to every local (CPython
    < 3.13); measured under it, the baseline would let an array a user holds pass for one only the blob holds."""
    def tracer(frame, event, arg):
        frame.f_locals  # noqa: B018 - what a debugger does on every event
        return tracer

    sys.settrace(tracer)
    try:
        measured = forward_steps._sole_refcount()  # noqa: SLF001
    finally:
        sys.settrace(None)
    assert measured == forward_steps._SOLE_REFS == forward_steps._count_one_holder()  # noqa: SLF001


def test_the_first_forward_writes_folded_chains_into_the_arrays_the_net_was_built_with(proto):
    # Net construction sizes every blob; the first forward's folded chains (conv + BatchNorm + Scale + ReLU,
    # the residual Eltwise + ReLU) write into those arrays instead of allocating a second set.
    net = _net(proto, "auto")
    chain_tops = ["conv1", "conv2", "dw", "pw", "sum", "sum2"]
    built = {name: _address(net.blobs[name].data) for name in chain_tops}
    x = _inputs(1, seed=2)[0]
    net.forward(data=x)
    assert {name: _address(net.blobs[name].data) for name in chain_tops} == built
    reference = _net(proto, "auto")
    reference.forward(data=x)
    for name in LARGE:
        assert net.blobs[name].data.tobytes() == reference.blobs[name].data.tobytes(), name
