"""The Net behaves like pycaffe's for what inference scripts use."""

import logging

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe import GraphError
from amct_caffe.errors import WeightsError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TEST, Net, known_types, layer_class, register
from amct_caffe.runtime.layer import Layer
from tests.golden import MODELS

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
needs_shared = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models not beside the repository")

TINY = '''
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 }
                            bias_filler { type: "constant" value: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "b_relu" type: "ReLU" bottom: "data" top: "b" }
'''


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY)
    return p


def test_structure_matches_pycaffe(tiny):
    net = Net(str(tiny), TEST)
    assert list(net.blobs) == ["data", "conv", "b"]
    assert net.inputs == ["data"]
    assert net.outputs == ["b", "conv"]  # Caffe lists leftover blobs sorted by name
    assert list(net.params) == ["conv"]
    assert [b.data.shape for b in net.params["conv"]] == [(4, 3, 3, 3), (4,)]
    assert np.all(net.params["conv"][1].data == 0.5)
    assert net.blobs["conv"].shape == (2, 4, 3, 3)
    assert net.blobs["data"].num == 2 and net.blobs["data"].channels == 3
    assert net.layer_dict["relu"].type == "ReLU"
    assert net.top_names["relu"] == ["conv"] and net.bottom_names["conv"] == ["data"]


def test_constructor_forms(tiny):
    a = Net(str(tiny), TEST)
    b = Net(str(tiny), phase=TEST)
    assert list(a.blobs) == list(b.blobs)


def test_forward_kwargs_in_place_and_start_end(tiny):
    net = Net(str(tiny), TEST)
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)
    out = net.forward(data=x)
    w, bias = net.params["conv"][0].data, net.params["conv"][1].data
    # independent reference: direct correlation loops
    ref = np.zeros((2, 4, 3, 3), np.float64)
    for i in range(3):
        for j in range(3):
            ref[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i:i + 3, j:j + 3], w) + bias
    np.testing.assert_allclose(out["conv"], np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["b"], np.maximum(x, 0))
    # in-place: 'conv' holds the value after relu; forward(end=conv) gives the pre-relu value
    pre = net.forward(end="conv")["conv"]
    np.testing.assert_allclose(pre, ref, rtol=1e-5, atol=1e-5)
    post = net.forward(start="relu", end="relu")["conv"]
    np.testing.assert_allclose(post, np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(GraphError, match="no layer named 'nope'"):
        net.forward(end="nope")


def test_reshape_like_pycaffe(tiny):
    net = Net(str(tiny), TEST)
    net.blobs["data"].reshape(1, 3, 8, 7)
    net.reshape()
    assert net.blobs["conv"].shape == (1, 4, 6, 5)
    net.blobs["data"].data[...] = 1.0
    out = net.forward()
    assert out["conv"].shape == (1, 4, 6, 5)
    # a new input shape given to forward() reshapes too
    assert net.forward(data=np.ones((3, 3, 4, 4), np.float32))["conv"].shape == (3, 4, 2, 2)


def test_user_edits_to_params_are_seen(tiny):
    net = Net(str(tiny), TEST)
    net.params["conv"][0].data[...] = 0
    net.params["conv"][1].data[...] = -1
    out = net.forward(data=np.ones((2, 3, 5, 5), np.float32))
    assert np.all(out["conv"] == 0)


@needs_shared
def test_save_and_copy_from_round_trip(tmp_path):
    net = Net(str(LENET), str(LENET_W), TEST)
    path = tmp_path / "again.caffemodel"
    net.save(str(path))
    fresh = Net(str(LENET), TEST)
    fresh.copy_from(str(path))
    for name, blobs in net.params.items():
        for a, b in zip(blobs, fresh.params[name], strict=False):
            assert np.array_equal(a.data, b.data)
    x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(net.forward(data=x)["prob"], fresh.forward(data=x)["prob"])


def test_undefined_bottom_is_reported(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text(TINY.replace('bottom: "data" top: "b"', 'bottom: "nothing" top: "b"'))
    with pytest.raises(GraphError, match="'b_relu' reads blob 'nothing'"):
        Net(str(p), TEST)


def test_arity_is_checked(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text(TINY.replace('bottom: "data" top: "b"', 'bottom: "data" bottom: "conv" top: "b"'))
    with pytest.raises(GraphError, match="'b_relu' .* takes 1 bottom"):
        Net(str(p), TEST)


def test_registry_is_complete_and_strict():
    types = known_types()
    for t in types:
        cls = layer_class(t)
        assert issubclass(cls, Layer) and t in cls.type_names
        assert cls.forward is not Layer.forward or t == "Input", f"{t} has no forward"
    with pytest.raises(RuntimeError, match="registered twice"):
        register("ReLU")(type("Again", (Layer,), {}))


SHARED_W = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" }
        inner_product_param { num_output: 3 bias_term: false } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" }
        inner_product_param { num_output: 3 bias_term: false } }
'''


def test_shared_param_takes_the_last_caffemodel_copy():
    """Caffe copies each layer's caffemodel blobs into the layer's blob, which after ShareData is
    the owner's memory: the later layer's copy is what both layers use."""
    net_param = text_format.Parse(SHARED_W, caffe_pb().NetParameter())
    wa, wb = np.full((3, 3), 1.0, np.float32), np.arange(9, dtype=np.float32).reshape(3, 3)
    net = Net(net_param, TEST, weights={"a": [wa], "b": [wb]})
    assert net.params["a"][0] is net.params["b"][0]
    np.testing.assert_array_equal(net.params["a"][0].data, wb)
    # a layer whose blobs are all shared from an earlier owner needs no weights of its own, as Caffe loads it
    only_owner = Net(net_param, TEST, weights={"a": [wa]})
    assert only_owner.params["b"][0] is only_owner.params["a"][0]
    np.testing.assert_array_equal(only_owner.params["b"][0].data, wa)
    # the owner missing from the caffemodel starts from its filler, and the sharer's copy lands in that memory
    only_sharer = Net(net_param, TEST, weights={"b": [wb]})
    assert only_sharer.params["a"][0] is only_sharer.params["b"][0]
    np.testing.assert_array_equal(only_sharer.params["a"][0].data, wb)


def test_a_layer_the_caffemodel_does_not_name_starts_from_its_fillers(tmp_path, caplog):
    """Fine-tuning: Caffe copies the layers the caffemodel names and leaves a renamed or new layer as its
    fillers made it (pycaffe's Net(prototxt, weights, phase)); a warning names it. A caffemodel naming no
    layer of the net is another model's: refused."""
    net_param = text_format.Parse(SHARED_W.replace('param { name: "w" }', ""), caffe_pb().NetParameter())
    wa = np.full((3, 3), 1.0, np.float32)
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    net = Net(net_param, TEST, weights={"a": [wa]})
    np.testing.assert_array_equal(net.params["a"][0].data, wa)
    assert net.params["b"][0].data.shape == (3, 3)
    assert "layer 'b' (InnerProduct): the caffemodel has no weights for this layer; its blobs come from its " \
           "fillers" in caplog.text
    with pytest.raises(WeightsError, match="layer 'a'.*no weights for this layer .*nor for any other layer"):
        Net(net_param, TEST, weights={"other": [wa]})


def test_bad_calls_get_the_librarys_errors(tmp_path):
    from amct_caffe import AmctError

    weights = tmp_path / "lenet.caffemodel"
    weights.write_bytes(LENET_W.read_bytes())
    net = Net(str(LENET), str(weights), TEST)
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(GraphError, match="forward\\(\\): the data for 'data' is not numbers"):
        net.forward(data="abc")
    with pytest.raises(GraphError, match=r"forward\(blobs=...\): \['nope'\] are not blobs of"):
        net.forward(blobs=["nope"], data=x)
    with pytest.raises(GraphError, match="Blob.reshape: the shape \\[-1, 1, 28, 28\\] has a negative dimension"):
        net.blobs["data"].reshape(-1, 1, 28, 28)
    with pytest.raises(GraphError, match="Net: phase must be TRAIN \\(0\\) or TEST \\(1\\), got 7"):
        Net(str(LENET), str(weights), 7)
    with pytest.raises(AmctError, match="cannot write .*: a directory of that name exists"):
        net.save(str(tmp_path))


def test_overflow_and_nan_pass_through_without_numpy_warnings(tmp_path):
    """Caffe's float arithmetic overflows to inf and makes NaN silently; so do forward and backward (numpy's
    RuntimeWarnings, a line of our code under each, used to reach the screen of `amct-caffe run`)."""
    import warnings

    text = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1e30 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
'''
    p = tmp_path / "overflow.prototxt"
    p.write_text(text)
    net = Net(str(p), TEST)
    x = np.array([[1e30, 1e30, 1e30], [1.0, -1.0, 0.5]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = net.forward(data=x)
        net.backward(prob=np.ones((2, 2), np.float32))
    assert np.isinf(net.blobs["ip"].data[0]).all() and np.isnan(out["prob"][0]).all()
    assert np.isfinite(out["prob"][1]).all()


@pytest.mark.parametrize(("conv", "pool"), [
    ("num_output: 4 kernel_size: 3 stride_h: {s} stride_w: 2", "pool: MAX kernel_size: 2 stride_h: {s} stride_w: 1"),
    ("num_output: 3 kernel_size: 3 pad: 2 stride: {s} group: 3", "pool: AVE kernel_size: 2 pad: 1 stride: {s}"),
    ("num_output: 3 kernel_size: 1 stride: 1", "pool: MAX kernel_size: 5 pad: 2 stride: {s}"),  # segfaulted
])
def test_a_stride_up_to_int_max_gives_the_values_of_any_stride_past_the_input(tmp_path, conv, pool):
    """Caffe takes any int stride; past the padded input it leaves one output per axis whatever its value. The
    kernels used to overflow their int index arithmetic on one near INT_MAX (a depthwise convolution refused its
    output size with a ValueError)."""
    x = np.random.default_rng(0).random((2, 3, 9, 7)).astype(np.float32)
    blobs = []
    for s in (2147483647, 100):
        text = ('layer { name: "data" type: "Input" top: "data" '
                'input_param { shape { dim: 2 dim: 3 dim: 9 dim: 7 } } }\n'
                'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { '
                + conv.format(s=s) + ' weight_filler { type: "gaussian" std: 1 } } }\n'
                'layer { name: "p" type: "Pooling" bottom: "c" top: "p" pooling_param { ' + pool.format(s=s) + ' } }\n')
        p = tmp_path / f"s{s}.prototxt"
        p.write_text(text)
        net = Net(str(p), TEST)
        net.forward(data=x)
        blobs.append({k: v.data.copy() for k, v in net.blobs.items()})
    for name in ("c", "p"):
        assert blobs[0][name].shape == blobs[1][name].shape
        np.testing.assert_array_equal(blobs[0][name], blobs[1][name])


def test_set_random_seed_seeds_the_fillers_of_later_nets(tmp_path):
    """pycaffe's caffe.set_random_seed: Nets built afterwards fill their learned blobs from it (runtime/seed.py)."""
    import amct_caffe.runtime as caffe
    from amct_caffe.errors import AmctError

    (tmp_path / "m.prototxt").write_text(
        'name: "m"\nlayer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 4 '
        'weight_filler { type: "gaussian" std: 1 } } }\n')
    model = str(tmp_path / "m.prototxt")

    def weights():
        return caffe.Net(model, caffe.TEST).params["ip"][0].data.copy()

    default = weights()
    try:
        caffe.set_random_seed(7)
        seven = weights()
        np.testing.assert_array_equal(weights(), seven)  # the same seed, the same fill
        assert not np.array_equal(seven, default)
        np.testing.assert_array_equal(caffe.Net(model, caffe.TEST, seed=0).params["ip"][0].data, default)
        with pytest.raises(AmctError, match="the seed must be an integer"):
            caffe.set_random_seed(-1)
    finally:
        caffe.set_random_seed(0)
    np.testing.assert_array_equal(weights(), default)
    assert "InnerProduct" in caffe.layer_type_list() and "Python" in caffe.layer_type_list()


@pytest.mark.parametrize("owner, sharer, want", [
    ("", "lr_mult: 0", (0.0, 1.0)),                     # the owner gave none: the sharer's 0 freezes the weight
    ("lr_mult: 3 decay_mult: 0", "", (3.0, 0.0)),       # the sharer gives none: the owner's stay
    ("lr_mult: 2", "lr_mult: 2 decay_mult: 5", (2.0, 5.0)),
])
def test_shared_param_multipliers_merge_as_caffe_appends_params(owner, sharer, want):
    text = SHARED_W.replace('param { name: "w" }', f'param {{ name: "w" {owner} }}', 1)
    text = text.replace('top: "b" param { name: "w" }', f'top: "b" param {{ name: "w" {sharer} }}')
    net = Net(text_format.Parse(text, caffe_pb().NetParameter()), TEST, weights={"a": [np.ones((3, 3), np.float32)]})
    (blob, lr_mult, decay_mult), = net.learnable_params()
    assert blob is net.params["a"][0] and (lr_mult, decay_mult) == want


def test_shared_param_with_mismatched_lr_mult_is_refused_as_caffe_does():
    text = SHARED_W.replace('param { name: "w" }', 'param { name: "w" lr_mult: 1 }', 1)
    text = text.replace('top: "b" param { name: "w" }', 'top: "b" param { name: "w" lr_mult: 2 }')
    with pytest.raises(GraphError, match="layer 'b': shared param 'w' has mismatched lr_mult"):
        Net(text_format.Parse(text, caffe_pb().NetParameter()), TEST, weights={"a": [np.ones((3, 3), np.float32)]})


def test_arrays_held_before_a_forward_are_the_blobs_memory_after_it(tmp_path):
    """pycaffe's blobs keep their memory: a script takes ``prob = net.blobs['prob'].data`` and the input's array
    once, fills the input and reads the output at every forward. The executor's forwards made new arrays, so a
    held output stayed at its first values (zeros). (An in-place layer on an input writes a new array: Caffe's
    writes into the input's memory, README.)"""
    model = tmp_path / "m.prototxt"
    model.write_text(
        'layer { name: "x" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "pw" type: "Power" bottom: "data" top: "p" power_param { scale: 2 shift: 1 } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "p" top: "ip" inner_product_param { num_output: 4 '
        'weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }\n')
    net = Net(str(model), TEST, seed=1)
    reference = Net(str(model), TEST, seed=1)
    held_input, held_prob = net.blobs["data"].data, net.blobs["prob"].data
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((2, 3)).astype(np.float32)
        held_input[...] = x
        net.forward()
        want = reference.forward(data=x)["prob"]
        np.testing.assert_array_equal(held_prob, want)
        assert net.blobs["prob"].data is held_prob and net.blobs["data"].data is held_input


@pytest.mark.parametrize("layers", [
    'layer { name: "in" type: "Input" top: "data" top: "data" input_param { shape { dim: 1 dim: 4 } '
    'shape { dim: 2 dim: 4 } } }\n',
    'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }\n'
    'layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "a" slice_param { axis: 1 } }\n',
    'layer { name: "in" type: "Input" top: "data" top: "b" input_param { shape { dim: 2 dim: 4 } } }\n'
    'layer { name: "e" type: "Eltwise" bottom: "data" bottom: "b" top: "data" top: "data" }\n',
])
def test_a_layer_writing_one_top_twice_is_refused_as_caffe_does(tmp_path, layers):
    """Caffe's AppendTop refuses a top that names a blob already made, unless the bottom at its position is that
    blob: a second top of the same name in one layer was accepted (two legacy 'input: "data"' lines made one
    blob of the second shape)."""
    from amct_caffe.io.graph_io import graph_from_net
    from amct_caffe.io.files import parse_prototxt_text
    from tests.real_caffe import pycaffe_dir, run_with_pycaffe
    path = tmp_path / "net.prototxt"
    path.write_text(layers)
    with pytest.raises(GraphError, match="writes blob '(data|a)' twice .tops 0 and 1.; give each top its own name"):
        Net(str(path), TEST)
    with pytest.raises(GraphError, match="twice"):
        graph_from_net(parse_prototxt_text(layers, str(path)))
    if pycaffe_dir() is not None:
        done = run_with_pycaffe(f"import caffe\ncaffe.Net({str(path)!r}, caffe.TEST)")
        assert done.returncode != 0 and "produced by multiple sources" in done.stderr


def test_data_for_a_blob_a_layer_of_the_run_computes_is_refused(tmp_path):
    """forward(data=x) on a net whose MemoryData layer computes 'data' ran that layer over the given data and
    returned results for other inputs (pycaffe refuses data for anything but the net's inputs). Data for a blob
    computed before the run's start, or in place within it, still goes in."""
    import numpy as np

    from amct_caffe.errors import GraphError
    from amct_caffe.runtime import TEST, Net

    model = tmp_path / "m.prototxt"
    model.write_text('layer { name: "data" type: "MemoryData" top: "data" top: "label" memory_data_param { '
                     'batch_size: 2 channels: 1 height: 3 width: 3 } }\n'
                     'layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }\n'
                     'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { '
                     'num_output: 2 weight_filler { type: "constant" value: 0.1 } } }\n')
    net = Net(str(model), TEST)
    net.set_input_arrays(np.zeros((2, 1, 3, 3), np.float32), np.zeros(2, np.float32))
    given = np.full((2, 1, 3, 3), 5, np.float32)
    with pytest.raises(GraphError, match=r"forward\(\) got data for 'data', which layer 'data' of this run computes"):
        net.forward(data=given)
    np.testing.assert_allclose(net.forward(start="relu", data=given)["ip"], np.full((2, 2), 4.5), rtol=1e-6)
    np.testing.assert_allclose(net.forward(start="ip", data=-given)["ip"], np.full((2, 2), -4.5), rtol=1e-6)


@pytest.mark.parametrize("share", ['param { name: "w" }', 'param { name: "w" share_mode: PERMISSIVE }'])
def test_share_with_gives_each_sharer_the_other_nets_blob_of_its_own_name(tmp_path, share):
    """Two layers sharing 'w' here, two separate layers 'a' and 'b' in the other net: Caffe's ShareTrainedLayersWith
    points each at the other net's blob of its name (official Caffe: a = 1, b = 2, and 11 / 12 after the other
    net's weights change). A STRICT sharer's Blob is its owner's, so moving it for 'b' moved 'a' too (a = 2)."""
    import numpy as np

    from amct_caffe.runtime import TEST, Net

    def ip(name, value, spec=""):
        return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "data" top: "{name}" {spec} inner_product_param '
                f'{{ num_output: 4 bias_term: false weight_filler {{ type: "constant" value: {value} }} }} }}\n')

    data = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
    (tmp_path / "here.prototxt").write_text(data + ip("a", 5, 'param { name: "w" }') + ip("b", 5, share))
    (tmp_path / "other.prototxt").write_text(data + ip("a", 1) + ip("b", 2))
    here, other = Net(str(tmp_path / "here.prototxt"), TEST), Net(str(tmp_path / "other.prototxt"), TEST)
    here.share_with(other)
    assert (float(here.params["a"][0].data.flat[0]), float(here.params["b"][0].data.flat[0])) == (1.0, 2.0)
    other.params["a"][0].data[...] += 10
    other.params["b"][0].data[...] += 10
    out = here.forward(data=np.ones((1, 3), np.float32))
    np.testing.assert_array_equal(out["a"], np.full((1, 4), 33.0))
    np.testing.assert_array_equal(out["b"], np.full((1, 4), 36.0))
