"""caffemodel_chunks gives exactly the bytes protobuf serializes for net_to_caffemodel."""

import numpy as np
import pytest

from amct_caffe import io
from amct_caffe.io.caffemodel_bytes import caffemodel_chunks
from amct_caffe.io.schema import caffe_pb
from tests.golden import MODELS

needs_shared = pytest.mark.skipif(not MODELS.exists(), reason="../shared/models not beside the repository")
PROTOTXT = """
name: "n"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" loss_weight: 0.5
        param { lr_mult: 1 } include { phase: TEST } exclude { stage: "x" } phase: TEST
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" propagate_down: true }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "odd" type: "Scale" bottom: "ip" top: "odd" }
"""


def _expected(net, weights) -> bytes:
    return io.net_to_caffemodel(net, weights).SerializeToString()


def _net():
    return io.parse_prototxt_text(PROTOTXT, "<test>")


def test_every_blob_dtype_and_shape_gives_protobuf_bytes():
    rng = np.random.default_rng(0)
    weights = {
        "conv": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32)[:, ::-1],  # not contiguous
                 np.zeros(0, np.float32)],
        "ip": [rng.integers(-128, 128, (2, 256)).astype(np.int8), rng.integers(-9, 9, 2).astype(np.int32),
               np.arange(3, dtype=np.uint64), np.zeros((0, 4), np.int8)],
        "odd": [rng.standard_normal(5), np.float32(1.5).reshape(()), np.ones(3, np.float16),
                rng.standard_normal(3).astype(">f4")],
    }
    chunks = caffemodel_chunks(_net(), weights)
    assert b"".join(chunks) == _expected(_net(), weights)
    assert any(isinstance(c, memoryview) for c in chunks)  # the float and int8 values are not copied


def test_a_layer_with_blobs_or_unknown_fields_still_gives_protobuf_bytes():
    net = _net()
    io.array_to_blob(np.ones(2, np.float32), net.layer[2].blobs.add())  # replaced by the weights, as there
    unknown = caffe_pb().LayerParameter()
    unknown.MergeFromString(net.layer[1].SerializeToString() + bytes([0xF8, 0xFF, 0x7F, 0x01]))  # field 262143
    net.layer[1].CopyFrom(unknown)
    weights = {"ip": [np.full((2, 4), 0.25, np.float32)], "relu": [np.ones(1, np.float32)]}
    assert b"".join(caffemodel_chunks(net, weights)) == _expected(net, weights)


@needs_shared
def test_a_real_model_gives_protobuf_bytes():
    net, weights = io.load_model(MODELS / "lenet_mnist/lenet.prototxt",
                                 MODELS / "lenet_mnist/lenet_iter_10000.caffemodel")
    assert b"".join(caffemodel_chunks(net, weights)) == _expected(net, weights)
