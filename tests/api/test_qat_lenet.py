"""The guide's QAT flow end to end on LeNet, trained by the embedded runtime.

create_quant_retrain_config -> create_quant_retrain_model -> SGDSolver on the modified TRAIN/TEST
model (4000 MNIST digits, the guide's solver: step policy, one TEST at the end writing the
record) -> save_quant_retrain_model('Both'). The fake-quant and deploy models must classify the
1000 held-out digits at least as well as the float model.
"""

from __future__ import annotations

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import runtime as caffe
from tests.golden import SHARED
from tests.training.mnist import mnist_lenet

WEIGHTS = SHARED / "models" / "lenet_mnist" / "lenet_iter_10000.caffemodel"
TRAIN_ITER = 60

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared/models is absent")


def _accuracy(model, weights, batches: int = 10) -> float:
    net = caffe.Net(str(model), str(weights), caffe.TEST)
    return float(np.mean([float(net.forward()["accuracy"]) for _ in range(batches)]))


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    pytest.importorskip("lmdb")
    work = tmp_path_factory.mktemp("qat")
    mnist_lenet(work, train_batch=64, test_batch=100)
    model = work / "lenet_train_test.prototxt"
    config, modified, modified_weights, record = (work / "config.json", work / "modified_model.prototxt",
                                                  work / "modified_model.caffemodel", work / "record.txt")
    amct.create_quant_retrain_config(str(config), str(model), str(WEIGHTS))
    amct.create_quant_retrain_model(str(model), str(WEIGHTS), str(config), str(modified), str(modified_weights),
                                    str(record))
    solver_file = work / "solver.prototxt"
    solver_file.write_text(
        f'net: "{modified}"\ntest_iter: 10\ntest_interval: {TRAIN_ITER}\nbase_lr: 0.0001\nlr_policy: "step"\n'
        f'stepsize: {TRAIN_ITER // 2}\ngamma: 0.1\nmomentum: 0.9\nweight_decay: 0.0001\nmax_iter: {TRAIN_ITER}\n'
        f'snapshot: {TRAIN_ITER}\nsnapshot_prefix: "{work / "solver"}"\ntest_initialization: false\n'
        "solver_mode: CPU\n")
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(str(modified_weights))
    solver.solve()
    retrained = work / f"solver_iter_{TRAIN_ITER}.caffemodel"
    amct.save_quant_retrain_model(str(modified), str(retrained), "Both", str(work / "results" / "retrain"),
                                  str(record))
    return work, model, record


def test_record_holds_every_retrained_layer(qat):
    work, _, record = qat
    text = record.read_text()
    for layer in ("conv1", "conv2", "ip1", "ip2"):
        assert f'key: "{layer}"' in text
    assert "scale_d" in text and "scale_w" in text


def test_training_moved_the_float_weights_and_the_clips(qat):
    """Both kinds of parameter train: the float weights (through the object layer's gradient) and the clips."""
    from amct_caffe import io

    work, _, _ = qat
    before = io.load_weights(str(work / "modified_model.caffemodel"))
    after = io.load_weights(str(work / f"solver_iter_{TRAIN_ITER}.caffemodel"))
    for layer in ("conv1", "conv2", "ip1", "ip2"):
        assert not np.array_equal(before[f"{layer}_weight_quant"][1], after[f"{layer}_weight_quant"][1]), layer
    assert not np.array_equal(before["conv2_data_quant"][0], after["conv2_data_quant"][0])


def test_fake_quant_and_deploy_accuracy_at_least_float(qat):
    work, model, _ = qat
    float_acc = _accuracy(model, WEIGHTS)
    fake = _accuracy(work / "results" / "retrain_fake_quant_model.prototxt",
                     work / "results" / "retrain_fake_quant_weights.caffemodel")
    deploy = _accuracy(work / "results" / "retrain_deploy_model.prototxt",
                       work / "results" / "retrain_deploy_weights.caffemodel")
    assert float_acc > 0.98
    assert fake >= float_acc and deploy >= float_acc, (float_acc, fake, deploy)
