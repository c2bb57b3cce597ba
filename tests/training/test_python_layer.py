"""Caffe's Python layer (runtime/layers/python_layer.py): the user's module (tests/training/python_layers.py)
run by official Caffe's pycaffe and by the executor, forward data, every blob's diff and the learned blobs'
gradients; its setup, its learned blobs through the caffemodel and the solver, the calibration flows, and
the errors a broken module gets."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import amct_caffe as amct
import amct_caffe.runtime as caffe_runtime
from amct_caffe.errors import GraphError, UnsupportedLayerError
from amct_caffe.io.blobs import array_to_blob
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TEST, TRAIN, Net, SGDSolver
from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, input_layer
from tests.training.test_backward_elementwise import L

MODULE = "tests.training.python_layers"
RNG = np.random.default_rng(5)


def PY(name, bottoms, tops, layer, param_str="", extra=""):  # noqa: N802
    return L("Python", name, bottoms, tops,
             f'python_param {{ module: "{MODULE}" layer: "{layer}" param_str: "{param_str}" }} {extra}')


# a Python data layer, a learned affine map, an in-place square, a selection whose size follows the data,
# and a Python loss; force_backward asks for the input's gradient too
NET = ("force_backward: true\n"
       + PY("ramp", "", "x", "RampData", "n=4 c=3 h=4 w=5") + input_layer("y", 4, 3, 4, 5)
       + L("Eltwise", "s", "x y", "s")
       + PY("aff", "s", "a", "ChannelAffine", "b=0.25")
       + L("Convolution", "conv", "a", "c", "convolution_param { num_output: 2 kernel_size: 3 pad: 1 }")
       + PY("rows", "c", "r count", "PositiveRows")
       + PY("sq", "r", "r", "SquareInPlace")
       + L("InnerProduct", "ip", "r", "ip", "inner_product_param { num_output: 3 }")
       + PY("loss", "ip", "loss", "HalfSquaredNorm", extra="loss_weight: 1"))
INPUTS = {"y": RNG.standard_normal((4, 3, 4, 5)).astype(np.float32)}


# two Python layers sharing a learned blob by name, each keeping it as self.w (read through it in forward)
SHARED_NET = ("force_backward: true\n" + input_layer("x", 2, 3)
              + PY("a", "x", "ya", "KeptScale", "w=5", 'param { name: "w" }')
              + PY("b", "x", "yb", "KeptScale", "w=3", 'param { name: "w" }'))
SHARED_INPUTS = {"x": RNG.standard_normal((2, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    from tests.training.gradcheck import run_in_caffe  # noqa: PLC0415

    workdir = tmp_path_factory.mktemp("python_layer")
    # two forwards: the data layer's state moves on, and the selection may keep other items
    cases = [("python", 'name: "python"\n' + NET, INPUTS, "TRAIN", {"forwards": 2}),
             ("shared", 'name: "shared"\n' + SHARED_NET, SHARED_INPUTS, "TRAIN")]
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.real_caffe
def test_forward_and_gradients_match_caffe(caffe_results):
    workdir, results = caffe_results
    ours = assert_matches_caffe(workdir, results, "python")
    kept = ours["data/r"].shape[0]
    assert 0 < kept < 4, "the selection should keep some items and drop others on this data"
    assert np.any(ours["pdiff/aff/0"]) and np.any(ours["diff/y"])


@pytest.mark.real_caffe
def test_a_blob_shared_by_name_matches_caffe(caffe_results):
    workdir, results = caffe_results
    ours = assert_matches_caffe(workdir, results, "shared")
    np.testing.assert_array_equal(ours["data/ya"], ours["data/yb"])


def _write(tmp_path, body, name="net.prototxt"):
    path = tmp_path / name
    path.write_text('name: "p"\n' + body)
    return str(path)


AFFINE = input_layer("x", 2, 3, 4, 4) + PY("aff", "x", "a", "ChannelAffine", "b=0.5")


def test_forward_runs_the_users_code_with_its_setup_values(tmp_path):
    net = Net(_write(tmp_path, AFFINE), TEST)
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    out = net.forward(x=x)["a"]
    w = (1 + 0.1 * np.arange(3, dtype=np.float32)).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(out, x * w + np.float32(0.5))
    assert [b.data.tolist() for b in net.params["aff"]] == [pytest.approx([1.0, 1.1, 1.2]), [0.5] * 3]
    assert net.params["aff"][0] is net.layer_dict["aff"].weight  # the blob the layer keeps is the Net's
    assert "caffe" not in sys.modules  # the alias lasts as long as the import


def test_learned_blobs_round_trip_through_the_caffemodel(tmp_path):
    model = _write(tmp_path, AFFINE)
    net = Net(model, TEST)
    net.params["aff"][0].data[...] = [2.0, -1.0, 0.5]
    net.save(str(tmp_path / "w.caffemodel"))
    again = Net(model, str(tmp_path / "w.caffemodel"), TEST)
    assert again.params["aff"][0].data.tolist() == [2.0, -1.0, 0.5]
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(again.forward(x=x)["a"], x * np.float32([2, -1, 0.5]).reshape(1, 3, 1, 1)
                                  + np.float32(0.5))


def test_a_caffemodel_without_the_layer_keeps_the_setup_values(tmp_path):
    # Caffe copies only the layers a caffemodel holds: the Python layer keeps what its setup made
    before = _write(tmp_path, input_layer("x", 2, 3, 4, 4)
                    + L("Convolution", "conv", "x", "c", "convolution_param { num_output: 3 kernel_size: 1 }"),
                    "conv.prototxt")
    Net(before, TEST).save(str(tmp_path / "conv.caffemodel"))
    model = _write(tmp_path, input_layer("x", 2, 3, 4, 4)
                   + L("Convolution", "conv", "x", "c", "convolution_param { num_output: 3 kernel_size: 1 }")
                   + PY("aff", "c", "a", "ChannelAffine"))
    net = Net(model, str(tmp_path / "conv.caffemodel"), TEST)
    assert net.params["aff"][0].data.tolist() == pytest.approx([1.0, 1.1, 1.2])


def test_the_solver_trains_a_python_layers_blobs(tmp_path):
    # loss = sum((x * w + b)^2) / 2 / n: one SGD step moves w and b by -lr times their gradients
    model = _write(tmp_path, input_layer("x", 2, 3, 2, 2) + PY("aff", "x", "a", "ChannelAffine")
                   + PY("loss", "a", "loss", "HalfSquaredNorm", extra="loss_weight: 1"))
    (tmp_path / "solver.prototxt").write_text(f'net: "{model}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\n'
                                              'snapshot_after_train: false\n')
    solver = SGDSolver(str(tmp_path / "solver.prototxt"))
    x = RNG.standard_normal((2, 3, 2, 2)).astype(np.float32)
    solver.net.blobs["x"].data[...] = x
    w = 1 + 0.1 * np.arange(3)
    a = x * w.reshape(1, 3, 1, 1)
    grad_w = np.sum(a * x, axis=(0, 2, 3)) / 2
    grad_b = np.sum(a, axis=(0, 2, 3)) / 2
    solver.step(1)
    np.testing.assert_allclose(solver.net.params["aff"][0].data, w - 0.1 * grad_w, rtol=1e-5)
    np.testing.assert_allclose(solver.net.params["aff"][1].data, -0.1 * grad_b, rtol=1e-5, atol=1e-7)


def test_tops_keep_their_shape_from_the_forward_and_the_users_arrays(tmp_path):
    net = Net(_write(tmp_path, input_layer("x", 4, 2) + PY("rows", "x", "r count", "PositiveRows")), TEST)
    x = np.array([[1, 1], [-1, -1], [2, 0], [0, -3]], np.float32)  # sums 2, -2, 2, -3: mean -0.25
    first = net.forward(x=x)
    np.testing.assert_array_equal(first["r"], x[[0, 2]])
    held, kept = first["r"], first["r"].copy()
    second = net.forward(x=-x)
    np.testing.assert_array_equal(second["r"], -x[[1, 3]])
    np.testing.assert_array_equal(held, second["r"])  # an output's array is the blob's, as in pycaffe
    np.testing.assert_array_equal(kept, x[[0, 2]])
    assert second["count"].tolist() == [2.0]


def test_the_calls_are_caffes_and_net_layers_reach_the_users_object(tmp_path):
    # Caffe: setup and reshape at the build, then reshape and forward on every forward (once each)
    model = _write(tmp_path, "force_backward: true\n" + input_layer("x", 2, 3) + PY("count", "x", "y", "Counting"))
    net = Net(model, TRAIN)
    layer = net.layers[list(net._layer_names).index("count")]  # noqa: SLF001 - pycaffe's net.layers order
    assert layer.calls == ["setup", "reshape"]
    x = np.ones((2, 3), np.float32)
    net.forward(x=x)
    net.forward(x=x[:1])  # a new batch size: still one reshape per forward
    net.backward(y=np.ones((1, 3), np.float32))
    assert layer.calls == ["setup", "reshape", "reshape", "forward", "reshape", "forward", "backward"]
    layer.set_offset(2.5)  # a method of the user's class, called on net.layers[i]
    np.testing.assert_array_equal(net.forward(x=x)["y"], x + 2.5)
    layer.offset = -1.0  # an attribute set from the script reaches the user's object
    np.testing.assert_array_equal(net.forward(x=x)["y"], x - 1.0)
    assert "caffe" not in sys.modules


def test_the_layers_blob_objects_are_the_nets(tmp_path):
    # ChannelAffine keeps the weight blob it made in setup and adds the bias in its first reshape
    model = _write(tmp_path, AFFINE)
    net = Net(model, TEST)
    assert [len(b.data) for b in net.params["aff"]] == [3, 3]
    net.params["aff"][0].data[...] = [2.0, -1.0, 0.5]  # in place, as pycaffe users write
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(net.forward(x=x)["a"], x * np.float32([2, -1, 0.5]).reshape(1, 3, 1, 1)
                                  + np.float32(0.5))


def test_a_learned_blob_shared_by_name_is_the_owners_for_the_object_the_layer_keeps(tmp_path):
    share = 'param { name: "shared_w" }'
    model = _write(tmp_path, "force_backward: true\n" + input_layer("x", 2, 3)
                   + PY("a", "x", "ya", "KeptScale", "w=5", share) + PY("b", "x", "yb", "KeptScale", "w=3", share))
    net = Net(model, TRAIN)
    x = np.ones((2, 3), np.float32)
    out = net.forward(x=x)
    np.testing.assert_array_equal(out["yb"], out["ya"])  # b computes with a's blob (5), as Caffe's ShareData gives
    assert net.params["b"][0] is net.params["a"][0]
    net.backward(ya=np.ones((2, 3), np.float32), yb=np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(net.params["a"][0].diff, [4.0, 4.0, 4.0])  # both layers' gradients, added
    kept = net.layer_dict["b"].w
    net.params["a"][0].data[...] = 2.0
    assert kept.data.tolist() == [2.0] * 3


def test_private_attributes_of_the_users_layer_are_reached_through_net_layers(tmp_path):
    net = Net(_write(tmp_path, input_layer("x", 2, 3) + PY("k", "x", "y", "KeptScale")), TEST)
    layer = net.layer_dict["k"]
    net.forward(x=np.ones((2, 3), np.float32))
    assert layer._calls == 1  # noqa: SLF001 - the user's attribute, as a pycaffe script reads it
    layer._calls = 10  # noqa: SLF001
    net.forward(x=np.ones((2, 3), np.float32))
    assert layer.user._calls == 11  # noqa: SLF001


def test_the_caffe_alias_lasts_until_the_last_thread_leaves_it():
    import threading  # noqa: PLC0415

    from amct_caffe.runtime.layers.python_layer import _caffe_is_runtime  # noqa: PLC0415

    inside, leave = threading.Event(), threading.Event()

    def other():
        with _caffe_is_runtime():
            inside.set()
            leave.wait(5)

    thread = threading.Thread(target=other)
    with _caffe_is_runtime():
        thread.start()
        assert inside.wait(5)
    assert sys.modules["caffe"] is caffe_runtime and sys.modules["caffe.io"] is caffe_runtime.io
    leave.set()
    thread.join(5)
    assert "caffe" not in sys.modules and "caffe.io" not in sys.modules


def test_rebinding_a_blobs_data_is_refused_as_pycaffe_refuses_it(tmp_path):
    model = _write(tmp_path, input_layer("x", 2, 3) + PY("bad", "x", "y", "RebindsTop"))
    net = Net(model, TEST)
    with pytest.raises(GraphError, match=r"layer 'bad' \(Python .*RebindsTop\): its forward\(\) raised "
                                         r"AttributeError"):
        net.forward(x=np.ones((2, 3), np.float32))


@pytest.mark.parametrize(("module", "message"), [
    ("needs_dep", "importing module 'needs_dep' failed: ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
    ("needs_netspec", "importing module 'needs_netspec' failed: No module named 'caffe.net_spec'.*; `caffe` is "
                      "amct_caffe.runtime there, which has pycaffe's Layer, Blob, Net, io, proto and solvers but not "
                      "NetSpec"),
])
def test_a_module_whose_imports_fail_says_which_import(tmp_path, monkeypatch, module, message):
    (tmp_path / "needs_dep.py").write_text("import caffe\nimport no_such_dependency_xyz  # noqa: F401\n")
    (tmp_path / "needs_netspec.py").write_text("import caffe.net_spec  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _write(tmp_path, input_layer("x", 2, 3)
                   + L("Python", "py", "x", "y", f'python_param {{ module: "{module}" layer: "X" }}'))
    with pytest.raises(UnsupportedLayerError, match=rf"layer 'py' \(Python\): {message}"):
        Net(model, TEST)
    assert "caffe" not in sys.modules


@pytest.mark.parametrize("method", ["setup", "reshape", "forward", "backward"])
def test_an_exception_in_the_users_code_names_the_layer(tmp_path, method):
    model = _write(tmp_path, "force_backward: true\n" + input_layer("x", 2, 3)
                   + PY("bad", "x", "y", "Failing", method))
    with pytest.raises(GraphError, match=rf"layer 'bad' \(Python {MODULE}.Failing\): its {method}\(\) raised "
                                         rf"ZeroDivisionError: {method} fails on purpose") as info:
        net = Net(model, TRAIN)
        net.forward(x=np.ones((2, 3), np.float32))
        net.backward(y=np.ones((2, 3), np.float32))
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the user's traceback stays reachable


@pytest.mark.parametrize(("param", "message"), [
    ('module: "no_such_module_here" layer: "X"', "cannot import module 'no_such_module_here'.*PYTHONPATH"),
    (f'module: "{MODULE}" layer: "Missing"', f"module '{MODULE}' .* has no class 'Missing'"),
    (f'module: "{MODULE}" layer: "NotALayer"', "class 'NotALayer' of module .* must derive from caffe.Layer"),
    ('layer: "X"', "python_param must give the module and the class"),
])
def test_a_layer_that_cannot_be_loaded_is_refused_with_what_to_do(tmp_path, param, message):
    model = _write(tmp_path, input_layer("x", 2, 3)
                   + L("Python", "py", "x", "y", f"python_param {{ {param} }}"))
    with pytest.raises(UnsupportedLayerError, match=rf"layer 'py' \(Python\): {message}"):
        Net(model, TEST)


def test_the_guide_flow_never_imports_the_module(tmp_path):
    # config generation and the calibration model's files work on the prototxt alone, as before
    model = _write(tmp_path, input_layer("x", 1, 3, 6, 6)
                   + L("Convolution", "conv", "x", "c", "convolution_param { num_output: 2 kernel_size: 3 }")
                   + L("Python", "py", "c", "p", 'python_param { module: "no_such_module_here" layer: "X" }'))
    weights = tmp_path / "w.caffemodel"  # the convolution's blobs, written without building the net
    net = caffe_pb().NetParameter()
    conv = net.layer.add(name="conv", type="Convolution")
    for shape in ((2, 3, 3, 3), (2,)):
        array_to_blob(np.full(shape, 0.5, np.float32), conv.blobs.add())
    weights.write_bytes(net.SerializeToString())
    amct.create_quant_config(str(tmp_path / "config.json"), model, str(weights))
    graph = amct.init(str(tmp_path / "config.json"), model, str(weights), str(tmp_path / "record.txt"))
    amct.weights_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    amct.activation_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    assert "no_such_module_here" not in sys.modules
    assert 'module: "no_such_module_here"' in (tmp_path / "m.prototxt").read_text()


FILL = 'kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 }'


def test_embedded_calibration_quantizes_the_layer_reading_a_python_top(tmp_path):
    from amct_caffe.api.workflow import calibrate  # noqa: PLC0415

    model = _write(tmp_path, input_layer("x", 2, 3, 6, 6)
                   + L("Convolution", "conv1", "x", "c1", f"convolution_param {{ num_output: 4 {FILL} }}")
                   + PY("aff", "c1", "a", "ChannelAffine", "b=0.5")
                   + L("Convolution", "conv2", "a", "c2", f"convolution_param {{ num_output: 2 {FILL} }}"))
    Net(model, TEST).save(str(tmp_path / "w.caffemodel"))
    batches = [{"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(2)]
    calibrate(model, str(tmp_path / "w.caffemodel"), batches, str(tmp_path / "out" / "q"), batch_num=2,
              progress=False)
    record = (tmp_path / "out" / "q_quant_param_record.txt").read_text()
    assert 'key: "conv2"' in record and "scale_d" in record.split('key: "conv2"')[1]
    fake = Net(str(tmp_path / "out" / "q_fake_quant_model.prototxt"),
               str(tmp_path / "out" / "q_fake_quant_weights.caffemodel"), TEST)
    ref = Net(model, str(tmp_path / "w.caffemodel"), TEST)
    x = batches[0]["x"]
    got, want = fake.forward(x=x)["c2"], ref.forward(x=x)["c2"]
    cosine = float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want))
    assert 0.999 < cosine < 1.0


def test_outputs_after_a_python_layer_are_compared_through_the_blobs_before_it_with_a_warning(caplog):
    from amct_caffe.api.compared_outputs import dynamic_shape_blobs, stand_in_outputs  # noqa: PLC0415

    layers = [("x", "Input", [], ["x"]), ("conv1", "Convolution", ["x"], ["c1"]),
              ("py", "Python", ["c1"], ["p"]), ("conv2", "Convolution", ["p"], ["c2"])]
    with caplog.at_level("WARNING", logger="amct_caffe.api.compared_outputs"):
        chosen, replaced = stand_in_outputs(layers, ["c2"])
    assert chosen == ["c1"] and replaced == {"c2": ["c1"]}
    assert dynamic_shape_blobs(layers) == {"p": True, "c2": True}  # through the Python layer alone
    assert "output 'c2' is computed after Python layer 'py'" in caplog.text
    assert "c1 stand(s) for it, so the quantized layers in between count in no output figure" in caplog.text
    caplog.clear()
    head = layers[:2] + [("acc", "Python", ["c1"], ["acc"])]  # a Python head right after the compared blob
    with caplog.at_level("WARNING", logger="amct_caffe.api.compared_outputs"):
        assert stand_in_outputs(head, ["acc"])[0] == ["c1"]
    assert caplog.text == ""  # nothing quantized goes unmeasured: no warning


def test_a_layer_without_setup_is_refused_as_caffe_cannot_run_it(tmp_path, monkeypatch):
    # pycaffe's base setup is Caffe's LayerSetUp, which calls setup again: Caffe fails with a RecursionError
    (tmp_path / "no_setup.py").write_text("import caffe\n\n\nclass NoSetup(caffe.Layer):\n"
                                          "    def reshape(self, bottom, top):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _write(tmp_path, input_layer("x", 2, 3)
                   + L("Python", "py", "x", "y", 'python_param { module: "no_setup" layer: "NoSetup" }'))
    with pytest.raises(GraphError, match=r"its setup\(\) raised NotImplementedError: NoSetup defines no "
                                         r"setup\(bottom, top\); Caffe needs one too"):
        Net(model, TEST)


def test_the_report_compares_blobs_after_a_python_layer_while_their_shapes_agree(tmp_path, caplog):
    from amct_caffe.api.compare import compare_batches  # noqa: PLC0415
    from amct_caffe.api.workflow import calibrate  # noqa: PLC0415

    model = _write(tmp_path, input_layer("x", 4, 2)
                   + L("InnerProduct", "ip1", "x", "h", f"inner_product_param {{ num_output: 4 {IP_FILL} }}")
                   + PY("aff", "h", "a", "ChannelAffine", "b=0.5")
                   + L("InnerProduct", "ip2", "a", "y", f"inner_product_param {{ num_output: 3 {IP_FILL} }}"))
    Net(model, TEST).save(str(tmp_path / "w.caffemodel"))
    batches = [{"x": RNG.standard_normal((4, 2)).astype(np.float32)} for _ in range(2)]
    calibrate(model, str(tmp_path / "w.caffemodel"), batches, str(tmp_path / "q"), batch_num=2, progress=False)
    reports, summary, comparison = compare_batches(model, str(tmp_path / "w.caffemodel"),
                                                   str(tmp_path / "q_fake_quant_model.prototxt"),
                                                   str(tmp_path / "q_fake_quant_weights.caffemodel"), batches)
    by_name = {r.name: r for r in reports}
    assert {"h", "a", "y"} <= set(by_name)  # after the Python layer too: both models gave one shape
    assert 0.99 < by_name["y"].cosine < 1.0
    assert summary["compared_instead"] == {"y": ["h"]}  # the output figure stays on the blob before it
    # a batch where the two models give a blob after it different shapes: that blob is left out, with a warning
    comparison.quant_net.blobs["a"].data = np.zeros((1, 4), np.float32)
    with caplog.at_level("WARNING", logger="amct_caffe.api.compare"):
        comparison._add_sums(4)  # noqa: SLF001 - the per-batch step, on the nets' current blobs
    assert "blob 'a' (after a Python layer) has shape [1, 4] in the quantized model and [4, 4]" in caplog.text
    assert "a" not in {r.name for r in comparison.reports()}


IP_FILL = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 }'


def test_the_report_leaves_out_a_selection_after_a_python_layer(tmp_path, caplog):
    # PositiveRows keeps the items above the mean: as many in both models can still be other items
    from amct_caffe.api.compare import compare_batches  # noqa: PLC0415
    from amct_caffe.api.workflow import calibrate  # noqa: PLC0415

    model = _write(tmp_path, input_layer("x", 4, 2)
                   + L("InnerProduct", "ip1", "x", "h", f"inner_product_param {{ num_output: 4 {IP_FILL} }}")
                   + PY("rows", "h", "r count", "PositiveRows")
                   + L("InnerProduct", "ip2", "r", "y", f"inner_product_param {{ num_output: 3 {IP_FILL} }}"))
    Net(model, TEST).save(str(tmp_path / "w.caffemodel"))
    batches = [{"x": RNG.standard_normal((4, 2)).astype(np.float32)} for _ in range(2)]
    calibrate(model, str(tmp_path / "w.caffemodel"), batches, str(tmp_path / "q"), batch_num=2, progress=False)
    with caplog.at_level("WARNING", logger="amct_caffe.api.compare"):
        reports, summary, _ = compare_batches(model, str(tmp_path / "w.caffemodel"),
                                              str(tmp_path / "q_fake_quant_model.prototxt"),
                                              str(tmp_path / "q_fake_quant_weights.caffemodel"), batches)
    assert {r.name for r in reports} == {"h"}  # r, count, y hold fewer items than the batch's 4 samples
    assert "blob 'r' (after a Python layer)" in caplog.text and "from this batch on it is not compared" in caplog.text
    assert summary["compared_instead"] == {"y": ["h"], "count": ["h"]}
