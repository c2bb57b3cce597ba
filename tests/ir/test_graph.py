"""SSA import of in-place layers, the checker, and uninplace_model."""

import numpy as np
import pytest

from amct_caffe import GraphError, io, uninplace_model
from amct_caffe.io.graph_io import graph_from_net, graph_to_net
from amct_caffe.ir import Graph, Node, ssa_rename
from tests.golden import MODELS

NSFW = MODELS / "open_nsfw/deploy.prototxt"
NSFW_W = MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel"
needs_shared = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models not beside the repository")


def test_ssa_rename_in_place_chain():
    layers = [("data", [], ["data"]), ("conv", ["data"], ["conv"]), ("bn", ["conv"], ["conv"]),
              ("scale", ["conv"], ["conv"]), ("relu", ["conv"], ["conv"]), ("fc", ["conv"], ["fc"])]
    renamed = ssa_rename(layers)
    # the last writer keeps the name (pycaffe's blobs["conv"] is the value after relu)
    assert renamed == [([], ["data"]), (["data"], ["conv_conv"]), (["conv_conv"], ["bn"]), (["bn"], ["scale"]),
                       (["scale"], ["conv"]), (["conv"], ["fc"])]


def test_ssa_rename_keeps_the_names_of_the_network_inputs():
    """An in-place layer on an input: the input keeps its name (models are fed by it), the value
    written over it takes a fresh one."""
    layers = [("data", [], ["data"]), ("scale", ["data"], ["data"]), ("relu", ["data"], ["data"]),
              ("fc", ["data"], ["fc"])]
    assert ssa_rename(layers, inputs=["data"]) == [([], ["data"]), (["data"], ["scale"]), (["scale"], ["relu"]),
                                                    (["relu"], ["fc"])]


def test_models_written_from_a_graph_keep_an_input_written_in_place(tmp_path):
    """Caffe's and our uninplaced, calibration and saved models are fed under the source's input name,
    and compute what the source computes."""
    from amct_caffe.api.outputs import write_graph
    from amct_caffe.api.workflow import calibrate
    from amct_caffe.runtime import TEST, Net
    from tests.passes.helpers import model

    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "norm" type: "Scale" bottom: "data" top: "data" scale_param { bias_term: true } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
"""
    graph, _ = model(text)
    files = str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel")
    write_graph(graph, *files, in_place=True)
    assert io.read_prototxt(files[0]).layer[1].top == ["data"]  # written in place again, as the source
    x = np.random.default_rng(0).random((2, 3, 6, 6)).astype(np.float32)
    want = np.array(Net(*files, TEST).forward(data=x)["conv"])
    uninplace_model(files[0], str(tmp_path / "u.prototxt"))
    u = io.read_prototxt(tmp_path / "u.prototxt")
    assert list(u.layer[0].top) == ["data"] and list(u.layer[1].bottom) == ["data"] and list(u.layer[1].top) != ["data"]
    np.testing.assert_array_equal(np.array(Net(str(tmp_path / "u.prototxt"), files[1], TEST).forward(data=x)["conv"]),
                                  want)
    paths = calibrate(*files, [{"data": x}], str(tmp_path / "q" / "m"), 1, progress=False)
    for kind in ("fake_quant", "deploy"):
        net = Net(paths[f"{kind}_model"], paths[f"{kind}_weights"], TEST)
        assert net.inputs == ["data"], kind
        got = np.array(net.forward(data=x)["conv"])
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99, kind


def test_ssa_rename_avoids_existing_blob_names():
    # layer "a" writes x first, but a blob named "a" exists: the early version becomes "x_a"
    layers = [("a", [], ["x"]), ("relu", ["x"], ["x"]), ("b", ["x"], ["a"])]
    (_, t0), (b1, t1), (b2, t2) = ssa_rename(layers)
    assert t0 == ["x_a"] and b1 == ["x_a"] and t1 == ["x"] and b2 == ["x"] and t2 == ["a"]


def test_checker_rejects_broken_graphs():
    with pytest.raises(GraphError, match="SSA"):
        Graph("g", [Node("a", "Input", [], ["x"]), Node("b", "ReLU", ["x"], ["x"])]).check()
    with pytest.raises(GraphError, match="reads blob 'y'"):
        Graph("g", [Node("a", "Input", [], ["x"]), Node("b", "ReLU", ["y"], ["z"])]).check()
    with pytest.raises(GraphError, match="two layers are named 'a'"):
        Graph("g", [Node("a", "Input", [], ["x"]), Node("a", "ReLU", ["x"], ["z"])]).check()


@needs_shared
def test_graph_round_trip_keeps_layers_and_weights():
    net, weights = io.load_model(NSFW, NSFW_W)
    graph = graph_from_net(net, weights)
    assert len(graph.nodes) == len(net.layer)
    back, back_weights = graph_to_net(graph)
    for a, b in zip(net.layer, back.layer, strict=False):
        assert (a.name, a.type) == (b.name, b.type)
        assert a.convolution_param == b.convolution_param and a.batch_norm_param == b.batch_norm_param
    for name, arrays in weights.items():
        for x, y in zip(arrays, back_weights[name], strict=False):
            assert np.array_equal(x, y)
    assert graph.outputs == ["prob"] and graph.inputs == ["data"]


def _net(text):
    from google.protobuf import text_format

    from amct_caffe.io.schema import caffe_pb
    return text_format.Parse(text, caffe_pb().NetParameter())


def test_in_place_layers_are_written_in_place_again_only_where_caffe_allows():
    """conv -> bn -> relu in place is restored; a value another layer reads too keeps its SSA name."""
    net = _net("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }
        layer { name: "bn" type: "BatchNorm" bottom: "ip" top: "ip" }
        layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
        layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2" }
        layer { name: "relu2" type: "ReLU" bottom: "ip2" top: "ip2" }""")
    src = graph_from_net(net)
    pre_relu2 = src.nodes[5].bottoms[0]
    spy = Node("spy", "IFMR", [pre_relu2], [], [], None)  # an observer of the value before relu2
    graph = Graph(src.name, src.nodes[:5] + [spy] + src.nodes[5:])
    ssa, _ = graph_to_net(graph)
    again, _ = graph_to_net(graph, in_place=True)
    assert [(list(lp.bottom), list(lp.top)) for lp in ssa.layer][1:4] == [
        (["data"], ["ip_ip"]), (["ip_ip"], ["bn"]), (["bn"], ["ip"])]
    assert [(list(lp.bottom), list(lp.top)) for lp in again.layer] == [
        ([], ["data"]), (["data"], ["ip"]), (["ip"], ["ip"]), (["ip"], ["ip"]), (["ip"], [pre_relu2]),
        ([pre_relu2], []), ([pre_relu2], ["ip2"])]
    # read back, the in-place model is the same SSA graph
    assert [(n.bottoms, n.tops) for n in graph_from_net(again).nodes] == [(n.bottoms, n.tops) for n in graph.nodes]


def test_kept_values_are_not_written_over():
    """keep: a value that must be readable after a forward (a compared blob) is not written over; the
    chain before it still is, and takes the kept value's name."""
    net = _net("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }
        layer { name: "bn" type: "BatchNorm" bottom: "ip" top: "ip" }
        layer { name: "scale" type: "Scale" bottom: "ip" top: "ip" }
        layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }""")
    graph = graph_from_net(net)
    after_bn, after_scale = graph.nodes[2].tops[0], graph.nodes[3].tops[0]
    kept, _ = graph_to_net(graph, in_place=True, keep={after_scale})
    assert [(list(lp.bottom), list(lp.top)) for lp in kept.layer][1:] == [
        (["data"], [after_scale]), ([after_scale], [after_scale]), ([after_scale], [after_scale]),
        ([after_scale], ["ip"])]
    # nothing kept: the whole chain is in place, as the source; everything kept: the SSA names
    assert [list(lp.top) for lp in graph_to_net(graph, in_place=True)[0].layer][1:] == [["ip"]] * 4
    every = {t for n in graph.nodes for t in n.tops}
    assert graph_to_net(graph, in_place=True, keep=every)[0] == graph_to_net(graph)[0]
    assert after_bn not in {t for lp in kept.layer for t in lp.top}


@needs_shared
def test_uninplace_model_removes_in_place_layers_and_keeps_test_layers(tmp_path):
    out = tmp_path / "nsfw_uninplaced.prototxt"
    uninplace_model(str(NSFW), str(out))
    net = io.read_prototxt(out)
    tops = [t for lp in net.layer for t in lp.top]
    assert len(tops) == len(set(tops))
    assert all(set(lp.top).isdisjoint(lp.bottom) for lp in net.layer)
    assert len(net.layer) == len(io.load_prototxt(NSFW).layer)

    train_test = tmp_path / "lenet_uninplaced.prototxt"
    uninplace_model(str(MODELS / "lenet_mnist/lenet_train_test.prototxt"), str(train_test))
    names = [lp.name for lp in io.read_prototxt(train_test).layer]
    assert names.count("mnist") == 1 and "accuracy" in names


@needs_shared
def test_uninplaced_model_computes_the_same(tmp_path):
    from amct_caffe.runtime import TEST, Net

    out = tmp_path / "u.prototxt"
    uninplace_model(str(NSFW), str(out))
    x = np.random.default_rng(0).normal(0, 50, (1, 3, 224, 224)).astype(np.float32)
    # exact fold: the in-place BatchNorm/Scale/ReLU chains in Caffe's arithmetic (the uninplaced model
    # has no in-place chain to fold; the float default folds BatchNorm/Scale into one affine map)
    a = Net(str(NSFW), str(NSFW_W), TEST, fold="exact").forward(data=x)["prob"]
    b = Net(str(out), str(NSFW_W), TEST).forward(data=x)["prob"]
    assert np.array_equal(a, b)


@pytest.mark.parametrize("sharing", [
    'layer { name: "fl" type: "Flatten" bottom: "v" top: "f" }',
    'layer { name: "sp" type: "Split" bottom: "v" top: "f" top: "g" }\n'
    'layer { name: "ip3" type: "InnerProduct" bottom: "g" top: "out3" inner_product_param { num_output: 2 } }',
])
def test_values_sharing_memory_are_not_written_over(sharing):
    """Caffe makes a Flatten's or a Split's tops one memory with the bottom (ShareData), and the Net rebinds the
    group after an in-place write into one of them: written over, ``v`` (kept) and the Split's other top would
    read the ReLU's values. A net keeping only some values leaves those tops out of its in-place writes."""
    from google.protobuf import text_format

    from amct_caffe.io.schema import caffe_pb
    from amct_caffe.runtime import TEST, Net

    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'
            'layer { name: "c1" type: "Convolution" bottom: "data" top: "v" '
            'convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }\n'
            + sharing + '\nlayer { name: "relu" type: "ReLU" bottom: "f" top: "f" }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "f" top: "out" inner_product_param { num_output: 3 } }\n'
            'layer { name: "ip2" type: "InnerProduct" bottom: "v" top: "out2" inner_product_param { num_output: 3 } }')
    net_param = text_format.Parse(text, caffe_pb().NetParameter())
    weights = {n: [b.data.copy() for b in blobs] for n, blobs in Net(net_param, TEST, seed=3).params.items()}
    graph = graph_from_net(net_param, weights)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    every = Net.from_graph(graph, TEST)
    kept = ["v", *graph.outputs]
    lean = Net.from_graph(graph, TEST, observed=kept)
    every.forward(data=x)
    lean.forward(data=x)
    assert (every.blobs["v"].data < 0).any()  # the ReLU's input, not its output
    for name in kept:
        np.testing.assert_array_equal(lean.blobs[name].data, every.blobs[name].data, err_msg=name)


@needs_shared
def test_a_net_keeping_some_values_lets_the_others_go_during_the_forward():
    """from_graph(observed=...) frees each value no one reads after the forward once its last reader has run
    (runtime/release.py): the kept values hold the bytes of a net keeping every value, forward after forward,
    the others a memory-less stand-in; a forward over a range that would read a freed value is refused."""
    from amct_caffe.runtime import TEST, Net
    from amct_caffe.runtime.release import is_stand_in

    net_param, weights = io.load_model(str(NSFW), str(NSFW_W))
    graph = graph_from_net(net_param, weights)
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((2, 3, 224, 224)).astype(np.float32) * 50 for _ in range(2)]
    values = [t for node in graph.nodes for t in node.tops if node.type != "Input"]
    kept = set(values[5::7]) | set(graph.outputs)
    every = Net.from_graph(graph, TEST, fold="exact")
    lean = Net.from_graph(graph, TEST, observed=kept)

    def held(net):  # MiB of memory the blobs hold (views of one array counted once)
        owners = {id(b.data.base if b.data.base is not None else b.data): b.data.nbytes
                  for b in net.blobs.values() if not is_stand_in(b.data)}
        return sum(owners.values()) / 2**20

    for x in xs:  # the second forward runs the prepared steps
        every.forward(data=x)
        lean.forward(data=x)
        for name in kept:
            np.testing.assert_array_equal(lean.blobs[name].data, every.blobs[name].data, err_msg=name)
        freed = [n for n, b in lean.blobs.items() if is_stand_in(b.data)]
        assert len(freed) > 40 and not set(freed) & kept
        assert held(lean) < 0.6 * held(every)
    stage = next(n for n in lean._layer_names if n.startswith("conv_stage1"))  # noqa: SLF001
    with pytest.raises(GraphError, match=r"reads '.+', which this net does not keep after a forward"):
        lean.forward(start=stage)
    # pycaffe's other ways to reach a value: each refused, naming it, instead of zeros or wrong gradients
    with pytest.raises(GraphError, match=rf"forward\(blobs=...\) asks for \['{freed[0]}'\], which this net does not"):
        lean.forward(blobs=[freed[0]], data=xs[0])
    with pytest.raises(GraphError, match=rf"forward\(\) was given data for \['{freed[0]}'\]"):
        lean.forward(**{"data": xs[0], freed[0]: np.zeros(lean.blobs[freed[0]].shape, np.float32)})
    with pytest.raises(GraphError, match=r"backward\(\) would read \[.+\], which this net does not keep"):
        lean.backward()
