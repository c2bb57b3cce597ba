"""Backward checks that need no Caffe: Dropout's TRAIN mask (Caffe's RNG cannot be matched),
and the layers this Caffe build lacks (ShuffleChannel, Reorg, Reverse, Axpy, Clip, Swish),
checked as adjoints (data movement: <f(x), dy> = <x, f^T(dy)>) or by finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.errors import GraphError
from amct_caffe.runtime import TRAIN, Net

from tests.training.gradcheck import input_layer as _input

_F32 = np.float32


def _net(tmp_path, text, phase=TRAIN):
    path = tmp_path / "net.prototxt"
    path.write_text("force_backward: true\n" + text)
    return Net(str(path), phase)




def _run(net, inputs, rng):
    """Forward, then backward with random top diffs; returns (outputs, top diffs, input diffs)."""
    outs = {k: np.array(v) for k, v in net.forward(**inputs).items()}
    dys = {k: rng.standard_normal(v.shape).astype(_F32) for k, v in outs.items()}
    grads = net.backward(**dys)
    return outs, dys, {k: np.array(grads[k]) for k in inputs}


@pytest.mark.parametrize("in_place", [False, True])
def test_dropout_train_gradient_is_masked_and_scaled(tmp_path, in_place):
    top = "x" if in_place else "y"
    net = _net(tmp_path, _input("x", 4, 300) + f'layer {{ name: "d" type: "Dropout" bottom: "x" top: "{top}" '
               'dropout_param { dropout_ratio: 0.3 } }\n')
    rng = np.random.default_rng(0)
    scale = _F32(1.0 / (1.0 - float(_F32(0.3))))
    masks = []
    for _ in range(2):  # a fresh mask per forward; the backward uses the latest one
        x = rng.standard_normal((4, 300)).astype(_F32) + _F32(10)  # no zeros: the mask shows in y
        outs, dys, grads = _run(net, {"x": x}, rng)
        mask = outs[top] != 0
        np.testing.assert_array_equal(outs[top], np.where(mask, x * scale, _F32(0)))
        np.testing.assert_array_equal(grads["x"], np.where(mask, dys[top] * scale, _F32(0)))
        assert 0.6 < mask.mean() < 0.8
        masks.append(mask)
    assert not np.array_equal(masks[0], masks[1])


ADJOINT_CASES = {
    "shuffle": ((2, 6, 3, 2), 'type: "ShuffleChannel" shuffle_channel_param { group: 3 }'),
    "reorg": ((2, 8, 4, 6), 'type: "Reorg" reorg_param { stride: 2 }'),
    "reorg_reverse": ((2, 8, 2, 3), 'type: "Reorg" reorg_param { stride: 2 reverse: true }'),
    "reverse": ((2, 3, 4, 5), 'type: "Reverse" reverse_param { axis: 1 axis: -1 }'),
    "permute": ((2, 3, 4, 5), 'type: "Permute" permute_param { order: 0 order: 3 order: 1 }'),
}


@pytest.mark.parametrize("case", sorted(ADJOINT_CASES))
def test_data_movement_backward_is_the_adjoint(tmp_path, case):
    shape, params = ADJOINT_CASES[case]
    net = _net(tmp_path, _input("x", *shape) + f'layer {{ name: "l" {params} bottom: "x" top: "y" }}\n')
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(_F32)
    outs, dys, grads = _run(net, {"x": x}, rng)
    assert np.sort(grads["x"], axis=None).tolist() == np.sort(dys["y"], axis=None).tolist()  # a permutation
    assert float(np.vdot(outs["y"].astype(np.float64), dys["y"])) == pytest.approx(
        float(np.vdot(x.astype(np.float64), grads["x"])), rel=1e-9)


def _finite_difference(net, inputs, name, dy_name, dy, eps):
    """Central differences of sum(dy * top) w.r.t. input ``name``, in float64."""
    base = inputs[name].astype(np.float64)
    grad = np.zeros_like(base)
    for i in np.ndindex(base.shape):
        vals = []
        for sign in (1, -1):
            x = base.copy()
            x[i] += sign * eps
            out = net.forward(**{**inputs, name: x.astype(_F32)})[dy_name]
            vals.append(float(np.sum(out.astype(np.float64) * dy)))
        grad[i] = (vals[0] - vals[1]) / (2 * eps)
    return grad


def test_axpy_backward(tmp_path):
    net = _net(tmp_path, _input("a", 2, 3, 1, 1) + _input("x", 2, 3, 4, 2) + _input("y", 2, 3, 4, 2) +
               'layer { name: "ax" type: "Axpy" bottom: "a" bottom: "x" bottom: "y" top: "f" }\n')
    rng = np.random.default_rng(2)
    inputs = {k: rng.standard_normal(s).astype(_F32) for k, s in (("a", (2, 3, 1, 1)), ("x", (2, 3, 4, 2)),
                                                                  ("y", (2, 3, 4, 2)))}
    _, dys, grads = _run(net, inputs, rng)
    dy = dys["f"]
    np.testing.assert_allclose(grads["a"], (dy * inputs["x"]).sum(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["x"], dy * inputs["a"], rtol=1e-6)
    np.testing.assert_array_equal(grads["y"], dy)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("layer", ['type: "Swish" swish_param { beta: 1.5 }',
                                   'type: "Clip" clip_param { min: -0.5 max: 0.8 }'])
def test_clip_swish_backward_matches_finite_differences(tmp_path, layer, in_place):
    top = "x" if in_place else "y"
    net = _net(tmp_path, _input("x", 3, 7) + f'layer {{ name: "l" {layer} bottom: "x" top: "{top}" }}\n')
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, 2, (3, 7)).astype(_F32)
    x[np.abs(x + 0.5) < 0.05] = 0.3  # keep off Clip's kinks, where the difference quotient is not a derivative
    x[np.abs(x - 0.8) < 0.05] = 0.3
    _, dys, grads = _run(net, {"x": x}, rng)
    if in_place and "Clip" in layer:
        # BVLC's clip_layer reads bottom_data, which in place is the clipped top: always within
        # the bounds, so the whole top diff passes through; reproduced as Caffe computes it
        np.testing.assert_array_equal(grads["x"], dys[top])
        return
    want = _finite_difference(net, {"x": x}, "x", top, dys[top].astype(np.float64), 1e-2)
    np.testing.assert_allclose(grads["x"], want, rtol=2e-3, atol=2e-3)


def test_batch_reindex_refuses_a_gradient_into_the_index(tmp_path):
    net = _net(tmp_path, _input("x", 3, 2) + _input("idx", 4) +
               'layer { name: "br" type: "BatchReindex" bottom: "x" bottom: "idx" top: "y" }\n')
    net.forward(x=np.ones((3, 2), _F32), idx=np.array([0, 2, 2, 1], _F32))
    with pytest.raises(GraphError, match="index"):
        net.backward(y=np.ones((4, 2), _F32))


@pytest.mark.parametrize("params, shape", [
    ("interp_param { height: 7 width: 9 }", (2, 3, 4, 5)),
    ("interp_param { zoom_factor: 3 }", (1, 2, 3, 4)),
    ("interp_param { shrink_factor: 2 pad_beg: -1 pad_end: -1 }", (1, 2, 9, 7)),
    ("interp_param { height: 4 width: 5 }", (1, 2, 4, 5)),  # same size: the identity
])
def test_interp_backward_is_the_adjoint_of_its_forward(tmp_path, params, shape):
    """Interp (PSPNet/DeepLab fork, not in this Caffe build) is linear in x: its backward must be
    the transpose, <Interp(x), dy> = <x, Interp^T(dy)>, and zero on the cells the pads crop."""
    net = _net(tmp_path, _input("x", *shape) + f'layer {{ name: "l" type: "Interp" bottom: "x" top: "y" {params} }}\n')
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(_F32)
    outs, dys, grads = _run(net, {"x": x}, rng)
    assert float(np.vdot(outs["y"].astype(np.float64), dys["y"])) == pytest.approx(
        float(np.vdot(x.astype(np.float64), grads["x"])), rel=1e-5, abs=1e-5)
    # the transpose column by column: the gradient of sum(y) is the sum of each input cell's weights
    e = np.zeros(shape, _F32)
    e[0, 0, shape[2] // 2, shape[3] // 2] = 1
    y_e = net.forward(x=e)["y"]
    ones = net.backward(y=np.ones_like(y_e))["x"]
    assert float(ones[0, 0, shape[2] // 2, shape[3] // 2]) == pytest.approx(float(y_e.sum()), rel=1e-5)
    if "pad_beg: -1" in params:
        assert not ones[:, :, 0].any() and not ones[:, :, :, -1].any()


def test_backward_one_layer_at_a_time_adds_the_readers_of_a_blob_read_twice(tmp_path):
    """pycaffe scripts step backward over net._layer_names; Caffe lists its Split layers there, ours are not
    layers, so stepping gave the producer a zero top diff (the data diff and c1's weight diff came out 0).
    A blob's split now runs with its producer: stepping gives one backward()'s gradients."""
    from amct_caffe.runtime import TRAIN, Net  # noqa: PLC0415

    path = tmp_path / "split.prototxt"
    path.write_text(
        'force_backward: true\n'
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'
        'layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'
        + "".join(f'layer {{ name: "{n}" type: "Convolution" bottom: "{b}" top: "{n}" convolution_param {{ '
                  f'num_output: 2 kernel_size: 1 weight_filler {{ type: "gaussian" std: 1 }} }} }}\n'
                  for n, b in (("c1", "data"), ("a", "c1"), ("b", "c1")))
        + 'layer { name: "la" type: "EuclideanLoss" bottom: "a" bottom: "t" top: "la" }\n'
          'layer { name: "lb" type: "EuclideanLoss" bottom: "b" bottom: "t" top: "lb" }\n')
    results = []
    for stepped in (False, True):
        net = Net(str(path), TRAIN, seed=2)
        net.blobs["data"].data[...] = np.arange(18, dtype=np.float32).reshape(1, 2, 3, 3) / 10
        net.forward()
        if stepped:
            for name in reversed(list(net._layer_names)):
                net.backward(start=name, end=name)
        else:
            net.backward()
        results.append((net.blobs["data"].diff.copy(), net.params["c1"][0].diff.copy()))
    (whole_x, whole_w), (step_x, step_w) = results
    assert np.abs(whole_x).max() > 0
    np.testing.assert_array_equal(step_x, whole_x)
    np.testing.assert_array_equal(step_w, whole_w)


def test_backward_from_a_layer_whose_top_is_read_twice_starts_from_the_diff_given(tmp_path):
    """The DeepDream idiom: net.blobs[X].diff[...] = g; net.backward(start=X). Caffe starts at X, below the Split
    of X's top, so g is what X back-propagates (not the sum of its readers' diffs, zero or stale)."""
    from amct_caffe.runtime import TRAIN, Net  # noqa: PLC0415

    def net_with_readers(readers):
        path = tmp_path / f"r{len(readers)}.prototxt"
        path.write_text(
            'force_backward: true\n'
            'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'
            'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 2 '
            'kernel_size: 1 } }\n'
            + "".join(f'layer {{ name: "{r}" type: "ReLU" bottom: "c1" top: "{r}" }}\n' for r in readers))
        net = Net(str(path), TRAIN)
        net.params["c1"][0].data[...] = np.arange(4, dtype=np.float32).reshape(2, 2, 1, 1) - 1.5
        net.blobs["data"].data[...] = np.linspace(-1, 1, 18, dtype=np.float32).reshape(1, 2, 3, 3)
        net.forward()
        net.blobs["c1"].diff[...] = np.linspace(1, 2, 18, dtype=np.float32).reshape(1, 2, 3, 3)
        net.backward(start="c1")
        return net.blobs["data"].diff.copy()

    twice, once = net_with_readers(["a", "b"]), net_with_readers(["a"])
    assert np.abs(once).max() > 0
    np.testing.assert_array_equal(twice, once)


def test_blobs_keep_diffs_of_their_own_through_an_eltwise_sum(tmp_path):
    """Eltwise SUM passes its top diff to both bottoms; handed on as one array, the three blobs shared their diff
    memory, so writing c2's diff (then backward(start='c2')) rewrote c1's and the sum's too. Caffe copies."""
    from amct_caffe.runtime import TRAIN, Net  # noqa: PLC0415

    path = tmp_path / "sum.prototxt"
    path.write_text(
        'force_backward: true\n'
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }\n'
        'layer { name: "c1" type: "Power" bottom: "data" top: "c1" power_param { scale: 2 } }\n'
        'layer { name: "c2" type: "Power" bottom: "data" top: "c2" power_param { scale: 3 } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "c1" bottom: "c2" top: "sum" }\n')
    net = Net(str(path), TRAIN)
    net.forward(data=np.ones((1, 1, 2, 2), np.float32))
    net.backward(sum=np.ones((1, 1, 2, 2), np.float32))
    net.blobs["c2"].diff[...] = 7
    np.testing.assert_array_equal(net.blobs["c1"].diff, 1)
    np.testing.assert_array_equal(net.blobs["sum"].diff, 1)
    net.backward(start="c2")
    np.testing.assert_array_equal(net.blobs["data"].diff, 21 + 2)  # c2's 3 * 7, and c1's 2 * 1 from its split
