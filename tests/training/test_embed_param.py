"""Embed, Parameter, DummyData and Filter against official Caffe: forward data, every blob's diff and the
learned blobs' gradients (runtime/layers/embed_param.py, runtime/layers/filter.py)."""

from __future__ import annotations

import numpy as np
import pytest

from amct_caffe.errors import GraphError
from amct_caffe.runtime import TRAIN, Net
from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, input_layer, run_in_caffe
from tests.training.test_backward_elementwise import L


def IP(name, bottom, n):  # noqa: N802
    """An InnerProduct whose top is a loss of weight 1: the gradients reach the layers below it (without a loss,
    Caffe back-propagates nothing; force_backward would ask Caffe for an Embed input's gradient, which it refuses)."""
    return L("InnerProduct", name, bottom, name, f"inner_product_param {{ num_output: {n} axis: -1 }} loss_weight: 1")


RNG = np.random.default_rng(21)
# name -> (prototxt body, inputs)
CASES = {
    # repeated indices: their rows' gradients add up in order; a second Embed without bias, read twice
    "embed": (input_layer("idx", 4, 3) + input_layer("x", 4, 3, 5)
              + L("Embed", "emb", "idx", "emb", "embed_param { num_output: 5 input_dim: 7 }")
              + L("Embed", "emb2", "idx", "emb2", "embed_param { num_output: 5 input_dim: 7 bias_term: false }")
              + L("Eltwise", "s", "emb emb2 x", "s") + IP("ip", "s", 4) + IP("ip2", "emb2", 3),
              {"idx": RNG.integers(0, 7, (4, 3)).astype(np.float32),
               "x": RNG.standard_normal((4, 3, 5)).astype(np.float32)}),
    # the learned blob as a top, read by two layers (Caffe's Split sums their gradients into it)
    "parameter": (input_layer("x", 3, 4)
                  + L("Parameter", "p", "", "p", "parameter_param { shape { dim: 3 dim: 4 } }")
                  + L("Eltwise", "s", "p x", "s", "eltwise_param { operation: PROD }") + IP("ip", "s", 2)
                  + IP("ip2", "p", 3),
                  {"x": RNG.standard_normal((3, 4)).astype(np.float32)}),
    # constant fillers: one per top, one for all, none (zeros); a shape and the deprecated 4-D fields
    "dummy": (input_layer("x", 2, 3)
              + L("DummyData", "d", "", "a b", 'dummy_data_param { shape { dim: 2 dim: 3 } '
                  'data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: -2 } }')
              + L("DummyData", "d2", "", "c", "dummy_data_param { num: 2 channels: 3 height: 1 width: 1 }")
              + L("DummyData", "d3", "", "e f", 'dummy_data_param { shape { dim: 2 dim: 3 } '
                  'data_filler { type: "constant" value: 1.5 } }')
              + L("Reshape", "r", "c", "cr", "reshape_param { shape { dim: 2 dim: 3 } }")
              + L("Eltwise", "s", "x a b cr e f", "s") + IP("ip", "s", 4),
              {"x": RNG.standard_normal((2, 3)).astype(np.float32)}),
    # the selector keeps items 0, 2 and 4 (any nonzero value); the gradient reaches the kept items of 'a' only
    "filter": (input_layer("x", 5, 3) + input_layer("y", 5, 2, 2) + input_layer("sel", 5, 1)
               + L("InnerProduct", "a", "x", "a", "inner_product_param { num_output: 4 }")
               + L("Filter", "f", "a y sel", "fa fy",
                   "propagate_down: true propagate_down: false propagate_down: false")
               + IP("b", "fa", 2) + IP("c", "fy", 3),
               {"x": RNG.standard_normal((5, 3)).astype(np.float32),
                "y": RNG.standard_normal((5, 2, 2)).astype(np.float32),
                "sel": np.array([[1], [0], [2], [0], [-1]], np.float32)}),
}


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("embed_param")
    cases = [(name, f'name: "{name}"\n' + body, inputs, "TRAIN") for name, (body, inputs) in CASES.items()]
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.real_caffe
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case)


def _net(tmp_path, text):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return Net(str(path), TRAIN)


def test_embed_refuses_what_is_not_an_index_and_a_gradient_for_its_input(tmp_path):
    net = _net(tmp_path, input_layer("idx", 2, 2) + L("Embed", "emb", "idx", "emb",
                                                      "embed_param { num_output: 3 input_dim: 4 }"))
    out = net.forward(idx=np.array([[0, 3], [3, 1]], np.float32))["emb"]
    weight, bias = (b.data for b in net.params["emb"])
    np.testing.assert_array_equal(out, weight[[[0, 3], [3, 1]]] + bias)
    for bad in (np.array([[0, 4], [1, 1]]), np.array([[0, -1], [1, 1]]), np.array([[0, 1.5], [1, 1]])):
        with pytest.raises(GraphError, match=r"layer 'emb' \(Embed\): input value .* is not an index in \[0, 4\)"):
            net.forward(idx=bad.astype(np.float32))
    forced = _net(tmp_path, "force_backward: true\n" + input_layer("idx", 2, 2)
                  + L("Embed", "emb", "idx", "emb", "embed_param { num_output: 3 input_dim: 4 }"))
    forced.forward(idx=np.zeros((2, 2), np.float32))
    with pytest.raises(GraphError, match=r"layer 'emb' \(Embed\): no gradient reaches its input indices"):
        forced.backward(emb=np.ones((2, 2, 3), np.float32))


def test_a_parameter_gradient_is_replaced_by_each_backward_as_caffe_shares_it_with_the_top(tmp_path):
    """Caffe's Parameter top and blob share one diff, which the layer reading the top writes: two backwards
    leave one backward's gradient there (an InnerProduct's gradient adds up over them)."""
    net = _net(tmp_path, L("Parameter", "p", "", "p", "parameter_param { shape { dim: 2 dim: 3 } }")
               + IP("ip", "p", 4))
    net.params["p"][0].data[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
    net.params["ip"][0].data[...] = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    net.forward()
    net.backward()
    once, ip_once = np.array(net.params["p"][0].diff), np.array(net.params["ip"][0].diff)
    assert np.abs(once).max() > 0
    net.forward()
    net.backward()
    np.testing.assert_array_equal(net.params["p"][0].diff, once)
    np.testing.assert_array_equal(net.params["ip"][0].diff, 2 * ip_once)


def test_dummy_data_random_fillers_draw_per_layer_and_per_forward(tmp_path):
    text = "".join(L("DummyData", name, "", name, 'dummy_data_param { shape { dim: 2 dim: 3 } '
                     'data_filler { type: "gaussian" std: 1 } }') for name in ("a", "b"))
    first, second = _net(tmp_path, text), _net(tmp_path, text)
    out = {k: np.array(v) for k, v in first.forward().items()}
    assert not np.array_equal(out["a"], out["b"])  # two layers, two streams
    assert not np.array_equal(first.forward()["a"], out["a"])  # refilled at every forward
    np.testing.assert_array_equal(second.forward()["a"], out["a"])  # two nets of one prototxt draw the same


def test_quantization_refuses_a_parameter_layer_the_caffemodel_lacks(tmp_path):
    """A Net starts such a blob at zeros, as Caffe; the quantized models would be written without it, which
    Caffe refuses to load, so the quantization calls refuse the model, naming the layer."""
    import amct_caffe as amct
    from amct_caffe import io
    from amct_caffe.errors import WeightsError

    text = ('name: "m"\n' + input_layer("x", 2, 3)
            + L("Parameter", "p", "", "p", "parameter_param { shape { dim: 2 dim: 3 } }")
            + L("Eltwise", "s", "x p", "s") + IP("ip", "s", 4))
    proto = tmp_path / "m.prototxt"
    proto.write_text(text)
    net = Net(str(proto), TRAIN)
    weights = tmp_path / "m.caffemodel"
    params = {"ip": [b.data for b in net.params["ip"]]}
    message = io.net_to_caffemodel(io.parse_prototxt_text(text, str(proto)), params)
    listed = message.SerializeToString()  # 'p' listed with no blob: Caffe refuses it (Incompatible number of blobs)
    del message.layer[[layer.name for layer in message.layer].index("p")]
    weights.write_bytes(message.SerializeToString())  # 'p' not named at all: Caffe leaves its filler's values
    with pytest.raises(WeightsError, match=r"layer 'p' \(Parameter\): the caffemodel has no weights for this layer"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(proto), str(weights))
    assert not Net(str(proto), str(weights), TRAIN).params["p"][0].data.any()  # the executor: Caffe's zeros
    weights.write_bytes(listed)
    with pytest.raises(WeightsError, match=r"layer 'p' \(Parameter\): the caffemodel has 0 blob\(s\) but the "
                                           r"prototxt needs 1 \(Caffe: Incompatible number of blobs\)"):
        Net(str(proto), str(weights), TRAIN)


def test_filter_keeps_the_selected_items_and_passes_their_gradients_back(tmp_path):
    """Filter (runtime/layers/filter.py) on its own: the kept items in order, zeros for the others' gradients,
    none for the selector."""
    net = _net(tmp_path, input_layer("x", 5, 3) + input_layer("sel", 5, 1)
               + L("InnerProduct", "a", "x", "a", "inner_product_param { num_output: 4 }")
               + L("Filter", "f", "a sel", "fa") + IP("b", "fa", 2))
    net.params["a"][0].data[...] = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    net.params["b"][0].data[...] = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    out = net.forward(x=x, sel=np.array([[1], [0], [2], [0], [-1]], np.float32))
    np.testing.assert_array_equal(net.blobs["fa"].data, net.blobs["a"].data[[0, 2, 4]])
    assert out["b"].shape == (3, 2)
    net.backward()
    da = net.blobs["a"].diff
    assert not da[[1, 3]].any() and da[[0, 2, 4]].any()
    np.testing.assert_array_equal(da[[0, 2, 4]], net.blobs["fa"].diff)
    out = net.forward(x=x, sel=np.array([[0], [0], [3], [0], [0]], np.float32))  # the item count follows the data
    assert out["b"].shape == (1, 2)
    forced = _net(tmp_path, "force_backward: true\n" + input_layer("x", 2, 3) + input_layer("sel", 2, 1)
                  + L("Filter", "f", "x sel", "fx"))
    forced.forward(x=np.ones((2, 3), np.float32), sel=np.ones((2, 1), np.float32))
    with pytest.raises(GraphError, match=r"layer 'f' \(Filter\): no gradient reaches its selector"):
        forced.backward(fx=np.ones((2, 3), np.float32))


def test_a_loss_top_that_changes_shape_keeps_its_weight_as_the_backward_seed(tmp_path):
    """The loss weight lives in the top's diff (Caffe's SetLossWeights); a new batch size changes the top's shape.
    The gradients were zero after that (the diff no longer fitted and was read as zeros); now the seed is the
    weight again, as Caffe's diff memory keeps it when the top shrinks."""
    body = L("InnerProduct", "ip", "x", "ip", "inner_product_param { num_output: 2 } loss_weight: 2")
    grads = []
    for built in (4, 2):
        net = _net(tmp_path, input_layer("x", built, 3) + body)
        net.params["ip"][0].data[...] = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
        net.forward(x=np.arange(6, dtype=np.float32).reshape(2, 3))
        net.backward()
        grads.append(np.array(net.params["ip"][0].diff))
    np.testing.assert_array_equal(grads[0], grads[1])
    assert np.abs(grads[0]).max() > 0


def test_reading_a_loss_diff_after_a_shape_change_keeps_the_seed_and_an_empty_filter_runs(tmp_path):
    """The seed is back as soon as the forward ends, so reading the diff (pycaffe users do) shows the weight and
    the backward uses it; a selector keeping no item gives empty tops, as Caffe's, and a loss of 0."""
    body = L("InnerProduct", "ip", "x", "ip", "inner_product_param { num_output: 2 } loss_weight: 2")
    net = _net(tmp_path, input_layer("x", 4, 3) + body)
    net.params["ip"][0].data[...] = 1
    net.forward(x=np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(net.blobs["ip"].diff, np.full((2, 2), 2, np.float32))
    net.backward()
    np.testing.assert_array_equal(net.params["ip"][0].diff, np.full((2, 3), 4, np.float32))
    empty = _net(tmp_path, input_layer("x", 3, 2) + input_layer("sel", 3, 1) + L("Filter", "f", "x sel", "fx")
                 + L("InnerProduct", "ip", "fx", "ip", "inner_product_param { num_output: 2 } loss_weight: 1"))
    out = empty.forward(x=np.ones((3, 2), np.float32), sel=np.zeros((3, 1), np.float32))
    assert out["ip"].shape == (0, 2) and empty.loss == 0
    empty.backward()
    assert not empty.params["ip"][0].diff.any()
