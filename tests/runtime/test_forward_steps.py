"""The prepared forward (runtime/forward.py) computes what the full per-layer path computes, forward after forward.

The reference is a freshly built net's first forward (which always runs the full path) and NumPy.
"""

import numpy as np
import pytest

from amct_caffe.runtime import TEST, Net

PROTO = '''
name: "steps"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "relu1" }
layer { name: "dw" type: "Convolution" bottom: "relu1" top: "dw"
        convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu2" type: "ReLU" bottom: "dw" top: "dw" }
layer { name: "pw" type: "Convolution" bottom: "dw" top: "pw"
        convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu3" type: "ReLU" bottom: "pw" top: "relu3" }
layer { name: "flat" type: "Flatten" bottom: "relu3" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
'''


@pytest.fixture
def proto(tmp_path):
    p = tmp_path / "steps.prototxt"
    p.write_text(PROTO)
    return str(p)


def _inputs(shape, count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def _blobs(net):
    return {k: b.data.copy() for k, b in net.blobs.items()}


def _fresh(proto, weights, x):
    """A new net's first forward on ``x``: the full path."""
    net = Net(proto, TEST)
    for name, arrays in weights.items():
        for blob, arr in zip(net.params[name], arrays, strict=True):
            blob.data[...] = arr
    net.forward(data=x)
    return _blobs(net)


def _weights(net):
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}


def test_repeated_forwards_match_the_full_path_on_every_blob(proto):
    net = Net(proto, TEST)
    weights = _weights(net)
    for x in _inputs((2, 3, 9, 9), 4):
        net.forward(data=x)
        got, want = _blobs(net), _fresh(proto, weights, x)
        assert list(got) == list(want)
        for name in want:
            assert got[name].tobytes() == want[name].tobytes(), name
    # the out-of-place ReLUs against NumPy
    np.testing.assert_array_equal(net.blobs["relu1"].data, np.maximum(net.blobs["conv1"].data, 0))
    np.testing.assert_array_equal(net.blobs["relu3"].data, np.maximum(net.blobs["pw"].data, 0))


def test_arrays_held_from_an_earlier_forward_are_not_rewritten(proto):
    net = Net(proto, TEST)
    xs = _inputs((2, 3, 9, 9), 4, seed=1)
    net.forward(data=xs[0])
    net.forward(data=xs[1])  # from here on the prepared steps run
    held = net.blobs["relu1"].data  # the caller keeps this forward's ReLU top
    kept = held.copy()
    out = net.forward(data=xs[2])
    assert held.tobytes() == kept.tobytes()
    assert net.blobs["relu1"].data is not held
    np.testing.assert_array_equal(out["prob"], _fresh(proto, _weights(net), xs[2])["prob"])
    # a view of a top (Flatten's of relu3) keeps its memory too
    flat_base = net.blobs["flat"].data
    before = flat_base.copy()
    net.forward(data=xs[3])
    assert flat_base.tobytes() == before.tobytes()


def test_input_shape_change_weight_change_and_partial_forward(proto):
    net = Net(proto, TEST)
    x, y = _inputs((2, 3, 9, 9), 2, seed=2)
    net.forward(data=x)
    net.forward(data=x)
    z = _inputs((3, 3, 9, 9), 1, seed=3)[0]  # a new input shape: the net reshapes and re-prepares
    out = net.forward(data=z)
    assert out["prob"].shape == (3, 5)
    np.testing.assert_array_equal(net.blobs["relu3"].data, _fresh(proto, _weights(net), z)["relu3"])
    net.forward(data=x)
    # weights changed in place between forwards are used by the next one
    net.params["conv1"][0].data[...] *= np.float32(-1)
    net.params["pw"][1].data[...] = np.float32(0.25)
    net.forward(data=y)
    want = _fresh(proto, _weights(net), y)
    for name in want:
        assert net.blobs[name].data.tobytes() == want[name].tobytes(), name
    # forward(start=, end=) still runs the named layers only
    net.blobs["relu1"].data[...] = np.float32(1)
    net.forward(start="dw", end="relu3")
    assert np.all(net.blobs["relu1"].data == 1)
    dw = net.layer_dict["dw"]
    ref = _fresh(proto, _weights(net), y)
    assert not np.array_equal(net.blobs["relu3"].data, ref["relu3"])  # it saw the ones, not conv1's ReLU
    assert dw.blobs[0].data.shape == (8, 1, 3, 3)


@pytest.mark.parametrize("fold", ["auto", "off"])
def test_a_partial_forward_at_another_shape_between_prepared_ones(proto, fold):
    """Full forward (the steps are prepared), a partial one at another batch, a full one through the prepared
    steps, then the partial one again: the layers it runs are reshaped again, as Caffe's forward reshapes every
    layer it runs (the layers' memo of their last shapes went stale, and the net refused the forward)."""
    net = Net(proto, TEST, fold=fold)
    two, one = _inputs((2, 3, 9, 9), 1, seed=4)[0], _inputs((1, 3, 9, 9), 1, seed=5)[0]
    want = _fresh(proto, _weights(net), one)
    for x, end in ((two, None), (one, "relu1"), (two, None), (one, "relu1"), (one, None)):
        out = net.forward(data=x, end=end)
        assert next(iter(out.values())).shape[0] == len(x)
    for name in want:
        assert net.blobs[name].data.tobytes() == want[name].tobytes(), name


def test_share_with_and_copy_from_reach_the_prepared_steps(proto, tmp_path):
    a, b = Net(proto, TEST), Net(proto, TEST, seed=5)
    x = _inputs((2, 3, 9, 9), 1, seed=4)[0]
    b.forward(data=x)
    b.forward(data=x)
    b.share_with(a)  # b's blobs now hold a's arrays
    b.forward(data=x)
    a.forward(data=x)
    assert b.blobs["prob"].data.tobytes() == a.blobs["prob"].data.tobytes()
    path = tmp_path / "a.caffemodel"
    a.params["fc"][0].data[...] *= np.float32(2)
    a.save(str(path))
    c = Net(proto, TEST, seed=6)
    c.forward(data=x)
    c.forward(data=x)
    c.copy_from(str(path))
    c.forward(data=x)
    a.forward(data=x)
    assert c.blobs["prob"].data.tobytes() == a.blobs["prob"].data.tobytes()


TRAINED = '''
name: "diffs"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "shape" type: "Reshape" bottom: "conv" top: "r" reshape_param { shape { dim: 0 dim: 4 dim: -1 } } }
layer { name: "flat" type: "Flatten" bottom: "r" top: "f" }
layer { name: "cat" type: "Concat" bottom: "f" top: "c" }
layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "fc" type: "InnerProduct" bottom: "c" top: "fc"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
'''


def test_forward_backward_rounds_match_the_full_path(tmp_path, monkeypatch):
    """Forward / backward rounds (the diffs Caffe's Reshape and one-bottom Concat re-tie on every forward,
    after the Flatten's backward tied its bottom to its top; an in-place ReLU on the Concat's top): every
    blob's data and diff as with the full path each time."""
    from amct_caffe.runtime import forward

    p = tmp_path / "diffs.prototxt"
    p.write_text(TRAINED)
    rng = np.random.default_rng(7)
    rounds = [(rng.standard_normal((2, 3, 6, 6)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32))
              for _ in range(3)]

    def run():
        net = Net(str(p), TEST)
        for x, dy in rounds:
            net.forward(data=x)
            net.backward(fc=dy)
        return {k: (b.data.copy(), b.diff.copy()) for k, b in net.blobs.items()}, \
            {k: [b.diff.copy() for b in v] for k, v in net.params.items()}

    got = run()
    monkeypatch.setattr(forward, "prepare", lambda net, produced: [lambda: forward.run(net, 0, len(net.layers))])
    want = run()
    for name, (data, diff) in want[0].items():
        assert got[0][name][0].tobytes() == data.tobytes(), name
        assert got[0][name][1].tobytes() == diff.tobytes(), name
    for name, diffs in want[1].items():
        for a, b in zip(got[1][name], diffs, strict=True):
            assert a.tobytes() == b.tobytes(), name


def test_a_layer_after_a_filter_follows_the_rows_kept_through_prepared_forwards(tmp_path):
    """A Filter keeps 2, 3, 2, 3 rows at one input shape: the layer after it reshapes with it at every forward,
    prepared steps or not (a memo of shapes restored after the prepared steps made the third forward fail)."""
    model = tmp_path / "f.prototxt"
    model.write_text(
        'layer { name: "in" type: "Input" top: "x" top: "s" input_param { shape { dim: 4 dim: 3 } '
        'shape { dim: 4 } } }\n'
        'layer { name: "f" type: "Filter" bottom: "x" bottom: "s" top: "kept" }\n'
        'layer { name: "p" type: "Power" bottom: "kept" top: "y" power_param { scale: 2 } }\n')
    net = Net(str(model), TEST)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    for keep in ([1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]):
        y = net.forward(x=x, s=np.array(keep, np.float32))["y"]
        np.testing.assert_array_equal(y, 2 * x[np.array(keep, bool)])


@pytest.mark.parametrize("how", ["partial forward", "reshape"])
def test_prepared_steps_are_dropped_when_blobs_were_reshaped_for_other_shapes(tmp_path, how):
    """Full forwards at batch 3 (the steps are prepared), then a partial forward or Net.reshape() at batch 2, then a
    full forward at batch 3 again: the steps, made for blobs of batch 3, are not run on blobs reshaped since (a
    layer with a loss weight keeps the careful path and refused the forward, as an LSTM did)."""
    model = tmp_path / "l.prototxt"
    model.write_text(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 3 dim: 4 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" loss_weight: 1 '
        'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }\n')
    net = Net(str(model), TEST, seed=2)
    three, two = _inputs((3, 4), 1, seed=6)[0], _inputs((2, 4), 1, seed=7)[0]
    net.forward(x=three)
    net.forward(x=three)
    if how == "partial forward":
        net.forward(x=two, end="ip")
    else:
        net.blobs["x"].reshape(2, 4)
        net.reshape()
    got = net.forward(x=three)["ip"]
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    np.testing.assert_allclose(got, three @ w.T + b, rtol=1e-5)


def test_only_output_arrays_someone_holds_are_kept_for_the_next_forward(proto):
    """keep_memory's list: an output array a script holds keeps its memory; one that only its blob holds is
    left to the kernels, which write into it (holding it there made them allocate a new one, copied back)."""
    from amct_caffe.runtime import forward
    net = Net(proto, TEST)
    x = _inputs((2, 3, 9, 9), 1)[0]
    net.forward(data=x)
    assert forward.held_arrays(net) == {}
    prob = net.blobs["prob"].data
    held = forward.held_arrays(net)
    assert list(held) == ["prob"] and held["prob"] is prob
    net.forward(data=x * 2)
    assert net.blobs["prob"].data is prob


def test_a_held_row_of_an_output_that_is_a_view_follows_each_forward(tmp_path):
    """row = net.blobs['sig'].data[0], the pycaffe idiom: Sigmoid after Flatten gives a view of a same-size base,
    and NumPy points the row at that base, so the output's own reference count said nobody held it; the blob got
    a new array and the row kept the first forward's values."""
    path = tmp_path / "view.prototxt"
    path.write_text(
        'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
        'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 2 '
        'stride: 2 } }\nlayer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" }\n'
        'layer { name: "sig" type: "Sigmoid" bottom: "flat" top: "sig" }\n')
    net = Net(str(path), TEST)
    xs = _inputs((2, 3, 8, 8), 3, seed=4)
    net.forward(data=xs[0])
    row = net.blobs["sig"].data[0]
    for x in xs[1:]:
        net.forward(data=x)
        np.testing.assert_array_equal(row, net.blobs["sig"].data[0])
        assert np.shares_memory(row, net.blobs["sig"].data)
