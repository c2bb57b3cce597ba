"""Net.backward against official Caffe: diffs of blobs and learned blobs, Caffe's split sums,
the need-backward rules (propagate_down, lr_mult 0, force_backward) and loss weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_caffe import pycaffe_dir
from tests.training.gradcheck import assert_matches_caffe, run_in_caffe

pytestmark = pytest.mark.real_caffe

_IN = 'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'
_TARGET = 'layer { name: "target" type: "Input" top: "target" input_param { shape { dim: 4 dim: 2 } } }\n'


def _input(*dims):
    return _IN.format(dims=" ".join(f"dim: {d}" for d in dims))


CASES = {
    # a blob read by two layers: Caffe's automatic split adds the two diffs
    "ip_two_readers": "force_backward: true\n" + _input(3, 2, 2, 2) +
    'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 4 } }\n'
    'layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2" '
    'inner_product_param { num_output: 3 transpose: true axis: 2 } }\n',
    # no force_backward: the input gets no diff; lr_mult 0 on the first IP's weight
    "lr_mult_zero": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { lr_mult: 0 } param { lr_mult: 1 } '
    'inner_product_param { num_output: 4 } }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 3 } '
    'loss_weight: 0.5 }\n',
    # propagate_down false on the second layer stops the gradient before the first
    "propagate_down_false": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 } }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" propagate_down: false '
    'inner_product_param { num_output: 3 } loss_weight: 2 }\n',
    # a loss-weighted blob also read by another layer: the split carries the loss
    "loss_blob_also_read": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 } '
    'loss_weight: 1.5 }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 3 } '
    'loss_weight: 0.25 }\n',
    # a loss-weighted top whose other reader leads to no loss: the split carrying the loss still runs backward
    "loss_blob_read_by_a_dead_end": _input(4, 3) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 3 } '
    'loss_weight: 0.1 }\n'
    'layer { name: "t" type: "TanH" bottom: "a" top: "t" }\n',
    # ... or reads it with propagate_down false
    "loss_blob_read_without_propagation": _input(4, 3) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 3 } '
    'loss_weight: 0.1 }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" propagate_down: false '
    'inner_product_param { num_output: 2 } loss_weight: 1 }\n',
    # a loss layer's top with an explicit weight, read by another layer: the layer's own top gets a LossLayer's
    # default weight 1 again (the forward's loss counts 1 + 2 of it, the gradient 2)
    "loss_layer_top_also_read": _input(4, 3) + _TARGET +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 2 } }\n'
    'layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "target" top: "loss" loss_weight: 2 }\n'
    'layer { name: "pw" type: "Power" bottom: "loss" top: "pw" power_param { scale: 3 } }\n',
    # a Slice whose weighted first top is read: Caffe clears the layer's loss_weight list, the second top's too
    "split_clears_the_other_tops_weights": _input(4, 3) + _TARGET +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 } }\n'
    'layer { name: "sl" type: "Slice" bottom: "a" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 2 } '
    'loss_weight: 0.3 loss_weight: -0.2 }\n'
    'layer { name: "loss" type: "EuclideanLoss" bottom: "s1" bottom: "target" top: "loss" }\n',
    # in place, Caffe's Normalize, Crop and Resize write over the top diff they share before reading it: the
    # bottom's diff is zero (Normalize's scale diff, computed first, is the gradient)
    "normalize_in_place": "force_backward: true\n" + _input(1, 3, 2, 2) +
    'layer { name: "n" type: "Normalize" bottom: "data" top: "data" }\n',
    "crop_in_place": "force_backward: true\n" + _input(1, 2, 3, 3) +
    _TARGET.replace("dim: 4 dim: 2", "dim: 1 dim: 2 dim: 3 dim: 3") +
    'layer { name: "c" type: "Crop" bottom: "data" bottom: "target" top: "data" }\n',
    "resize_in_place": "force_backward: true\n" + _input(1, 2, 3, 3) +
    'layer { name: "r" type: "Resize" bottom: "data" top: "data" resize_param { height: 3 width: 3 } }\n',
    # shared parameters: both layers accumulate into one weight
    "shared_param": _input(2, 5) +
    'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } param { name: "bias" } '
    'inner_product_param { num_output: 5 } }\n'
    'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } param { name: "bias" } '
    'inner_product_param { num_output: 5 } loss_weight: 1 }\n',
}


_INPUT_SHAPES = {name: (4, 3) for name in ("loss_blob_read_by_a_dead_end", "loss_blob_read_without_propagation",
                                          "loss_layer_top_also_read", "split_clears_the_other_tops_weights")}
_INPUT_SHAPES.update(normalize_in_place=(1, 3, 2, 2), crop_in_place=(1, 2, 3, 3), resize_in_place=(1, 2, 3, 3))


@pytest.fixture(scope="module")
def caffe_results(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    workdir = tmp_path_factory.mktemp("backward_net")
    rng = np.random.default_rng(7)
    cases = []
    for name, text in CASES.items():
        shape = (3, 2, 2, 2) if name == "ip_two_readers" else (2, 5)
        arrays = {"data": rng.standard_normal(_INPUT_SHAPES.get(name, shape)).astype(np.float32)}
        if '"target"' in text:
            arrays["target"] = rng.standard_normal((1, 2, 3, 3) if "crop" in name else (4, 2)).astype(np.float32)
        cases.append((name, f'name: "{name}"\n' + text, arrays, "TRAIN"))
    return workdir, run_in_caffe(workdir, cases)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_matches_caffe(caffe_results, case):
    workdir, results = caffe_results
    assert_matches_caffe(workdir, results, case)


@pytest.mark.parametrize("extra, why", [
    ('layer { name: "r" type: "ReLU" bottom: "ip" top: "ip" }\n', "the loss (loss_weight 0.5 of layer 'ip')"),
    ('layer { name: "t" type: "TanH" bottom: "ip" top: "t" }\n'
     'layer { name: "r" type: "ReLU" bottom: "ip" top: "ip" }\n', "layer 't'"),
])
def test_an_in_place_layer_on_a_split_blob_is_refused_as_caffe_does(tmp_path, extra, why):
    """A blob read by two layers, or read once and weighted as a loss, gets Caffe's Split, which renames the
    readers' bottoms only: an in-place reader then makes the blob a second time and Caffe aborts."""
    import re  # noqa: PLC0415

    from amct_caffe.errors import GraphError  # noqa: PLC0415
    from amct_caffe.runtime import TRAIN, Net  # noqa: PLC0415
    from tests.real_caffe import run_with_pycaffe  # noqa: PLC0415

    weight = "loss_weight: 0.5 " if "loss" in why else ""
    path = tmp_path / "net.prototxt"
    path.write_text(_input(2, 3) + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                    f'inner_product_param {{ num_output: 2 }} {weight}}}\n' + extra)
    message = f"layer 'r' computes blob 'ip' in place, but {why} already read it"
    with pytest.raises(GraphError, match=re.escape(message)):
        Net(str(path), TRAIN)
    if pycaffe_dir() is not None:
        done = run_with_pycaffe(f"import caffe\ncaffe.Net({str(path)!r}, caffe.TRAIN)")
        assert done.returncode != 0 and "Top blob 'ip' produced by multiple sources" in done.stderr


def test_a_loss_layers_regained_weight_is_read_from_its_diff_each_forward(tmp_path):
    """EuclideanLoss with loss_weight 2 whose top a Power also reads: Caffe's split overwrites the loss top's diff
    in backward, and the next forward weights that top by it (its own weight being 1 again): the losses of
    forward, backward, forward are Caffe's."""
    import json

    from amct_caffe.runtime import TRAIN, Net
    from tests.real_caffe import run_with_pycaffe

    text = CASES["loss_layer_top_also_read"]
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    weights = tmp_path / "w.caffemodel"
    Net(str(path), TRAIN, seed=2).save(str(weights))
    rng = np.random.default_rng(4)
    data, target = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    np.savez(tmp_path / "in.npz", data=data, target=target)
    done = run_with_pycaffe(f"""
import json, numpy as np, caffe
net = caffe.Net({str(path)!r}, {str(weights)!r}, caffe.TRAIN)
z = np.load({str(tmp_path / "in.npz")!r})
net.blobs["data"].data[...] = z["data"]; net.blobs["target"].data[...] = z["target"]
losses = []
for _ in range(3):
    losses.append(float(net._forward(0, len(net.layers) - 1)))
    net._backward(len(net.layers) - 1, 0)
print(json.dumps(losses))
""")
    assert done.returncode == 0, done.stderr
    want = json.loads(done.stdout.strip().splitlines()[-1])
    net = Net(str(path), str(weights), TRAIN)
    got = []
    for _ in range(3):
        net.forward(data=data, target=target)
        got.append(net.loss)
        net.backward()
    assert want[1] != pytest.approx(want[0])  # (the case shows the effect)
    np.testing.assert_allclose(got, want, rtol=1e-5)

