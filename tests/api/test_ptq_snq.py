"""Non-uniform (SNQ, INT4) weight quantization end to end: the guide's .cfg route on LeNet."""

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import io
from amct_caffe.runtime import TEST, Net
from tests.golden import MODELS, SHARED

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
MNIST = SHARED / "data/mnist_5k.npz"
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason="../shared not beside the repository")

CFG = '''
batch_num: 2
override_layer_configs : {
    layer_name : "conv2"
    calibration_config : {
        snq_quantize : { channel_wise : true  max_iteration : 500  min_distance : 1e-6  init_algo : "d2sampling" }
        ifmr_quantize : { search_range_start : 0.7 search_range_end : 1.3 search_step : 0.01
                          max_percentile : 0.999999 min_percentile : 0.999999 num_bits : 8 }
    }
}
'''


def test_snq_layer_has_at_most_16_levels_per_channel_and_keeps_accuracy(tmp_path):
    cfg = tmp_path / "snq.cfg"
    cfg.write_text(CFG)
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(LENET), str(LENET_W), config_defination=str(cfg))
    assert '"snq_quantize"' in config.read_text()
    graph = amct.init(str(config), str(LENET), str(LENET_W), str(tmp_path / "record.txt"))
    mm, mw = str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel")
    amct.weights_quantize_model(graph, mm, mw)
    amct.activation_quantize_model(graph, mm, mw)
    z = np.load(MNIST)
    x = z["images"][:, None].astype(np.float32) * np.float32(0.00390625)
    net = Net(mm, mw, TEST)
    for b in range(2):
        net.forward(data=x[b * 32:(b + 1) * 32])
    amct.save_model(graph, "Both", str(tmp_path / "out/lenet"))

    fake = io.load_weights(tmp_path / "out/lenet_fake_quant_weights.caffemodel")["conv2"][0]
    deploy = io.load_weights(tmp_path / "out/lenet_deploy_weights.caffemodel")["conv2"][0]
    assert deploy.dtype == np.int8
    for c in range(fake.shape[0]):
        assert len(np.unique(fake[c])) <= 16 and len(np.unique(deploy[c])) <= 16
    # ARQ layers keep the full grid
    conv1 = io.load_weights(tmp_path / "out/lenet_deploy_weights.caffemodel")["conv1"][0]
    assert max(len(np.unique(conv1[c])) for c in range(conv1.shape[0])) > 16

    test_x, test_y = x[1000:2000], z["labels"][1000:2000]
    fp = Net(str(LENET), str(LENET_W), TEST).forward(data=test_x)["prob"].argmax(1)
    fq = Net(str(tmp_path / "out/lenet_fake_quant_model.prototxt"),
             str(tmp_path / "out/lenet_fake_quant_weights.caffemodel"), TEST).forward(data=test_x)["prob"].argmax(1)
    assert np.mean(fq == test_y) >= np.mean(fp == test_y) - 0.01

