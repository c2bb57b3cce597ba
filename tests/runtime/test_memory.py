"""A calibration net allocates its blobs with numpy's huge-page hint off (runtime/memory.py); other nets,
and calibration nets under AMCT_NUMPY_HUGEPAGE=1, leave numpy's setting alone."""

import numpy as np
import pytest

from amct_caffe.runtime import TEST, Net, memory

FLOAT = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'
         'layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }\n')
CALIBRATION = FLOAT + ('layer { name: "relu_ifmr" type: "IFMR" bottom: "data" ifmr_param { batch_num: 2 '
                       'record_file_path: "REC" object_layer: "relu" max_percentile: 0.999999 min_percentile: 0.999999 '
                       'search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 } }\n')

pytestmark = pytest.mark.skipif(memory._SWITCH is None,  # noqa: SLF001
                                reason="this numpy has no huge-page hint switch")


@pytest.fixture
def hint_seen(monkeypatch):
    """Records numpy's hint setting whenever a blob array is made during a forward; numpy's own setting
    is on for the test and restored afterwards."""
    switch = memory._SWITCH  # noqa: SLF001
    before = switch(True)
    seen = []
    zeros = np.zeros

    def recording_zeros(*args, **kwargs):
        current = switch(True)  # (the switch returns the setting it replaces)
        switch(current)
        seen.append(current)
        return zeros(*args, **kwargs)
    monkeypatch.setattr("amct_caffe.runtime.blob.np.zeros", recording_zeros)
    monkeypatch.delenv("AMCT_NUMPY_HUGEPAGE", raising=False)
    yield seen
    switch(before)


def _net(tmp_path, text):
    path = tmp_path / "m.prototxt"
    path.write_text(text.replace("REC", str(tmp_path / "record.txt")))
    return Net(str(path), TEST)


def test_a_calibration_net_makes_its_blobs_with_the_hint_off(tmp_path, hint_seen):
    net = _net(tmp_path, CALIBRATION)
    hint_seen.clear()
    net.forward(data=np.ones((4, 2, 3, 3), np.float32))  # a new batch size: the blobs are made again
    assert hint_seen and not any(hint_seen)
    assert memory._SWITCH(True) is True  # noqa: SLF001 - numpy's setting is back after the forward


def test_other_nets_and_the_opt_out_keep_numpys_hint(tmp_path, hint_seen, monkeypatch):
    net = _net(tmp_path, FLOAT)
    hint_seen.clear()
    net.forward(data=np.ones((4, 2, 3, 3), np.float32))
    assert hint_seen and all(hint_seen)
    monkeypatch.setenv("AMCT_NUMPY_HUGEPAGE", "1")
    net = _net(tmp_path, CALIBRATION)
    hint_seen.clear()
    net.forward(data=np.ones((4, 2, 3, 3), np.float32))
    assert hint_seen and all(hint_seen)


def test_calls_that_run_nets_a_few_times_make_their_blobs_with_the_hint_off(tmp_path, hint_seen):
    net = _net(tmp_path, FLOAT)

    @memory.few_forwards
    def report(x):
        """Runs a float net twice."""
        net.forward(data=x)
        return net.forward(data=x + 1)["out"].copy()

    hint_seen.clear()
    out = report(np.ones((3, 2, 3, 3), np.float32))
    assert hint_seen and not any(hint_seen)
    assert out.min() == 2 and report.__doc__ == "Runs a float net twice."
    assert memory._SWITCH(True) is True  # noqa: SLF001 - back on after the call


def test_the_accuracy_report_is_such_a_call(tmp_path, hint_seen):
    from amct_caffe.api.accuracy import compare_model
    from amct_caffe.api.workflow import calibrate
    from tests.golden import SHARED
    model = SHARED / "models" / "lenet_mnist" / "lenet.prototxt"
    weights = SHARED / "models" / "lenet_mnist" / "lenet_iter_10000.caffemodel"
    if not weights.exists():
        pytest.skip("shared LeNet not available")
    batches = [{"data": np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)}]
    q = calibrate(str(model), str(weights), batches, str(tmp_path / "q"), 1, progress=False)
    hint_seen.clear()
    compare_model(str(model), str(weights), q["fake_quant_model"], q["fake_quant_weights"], batches,
                  str(tmp_path / "report"), progress=False)
    assert hint_seen and not any(hint_seen)


@pytest.mark.usefixtures("cli_scratch_dir")  # (no log handler left on a closed stream)
@pytest.mark.parametrize("few", [True, False])
def test_a_short_command_line_run_makes_its_blobs_with_the_hint_off(tmp_path, hint_seen, monkeypatch, capsys, few):
    from amct_caffe import cli
    (tmp_path / "m.prototxt").write_text(FLOAT)
    Net(str(tmp_path / "m.prototxt"), TEST).save(str(tmp_path / "m.caffemodel"))
    np.savez(tmp_path / "x.npz", data=np.ones((6, 2, 3, 3), np.float32))
    if not few:
        monkeypatch.setattr(memory, "FEW_FORWARDS", 2)  # 3 batches of 2: a long run here
    hint_seen.clear()
    assert cli.main(["run", "--model", str(tmp_path / "m.prototxt"), "--weights", str(tmp_path / "m.caffemodel"),
                     "--input", str(tmp_path / "x.npz"), "--batch-size", "2", "--no-progress"]) == 0
    # (the Net is built before the run decides; the blobs its forwards make for batches of 2 come last)
    assert hint_seen and hint_seen[-1] is not few and (False in hint_seen) == few


def test_overlapping_blocks_of_two_threads_restore_numpys_setting(hint_seen):
    import threading
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with memory.hint_off():
            a_in.set()
            b_in.wait(5)
        a_out.set()  # leaves while the other block is still open

    def second():
        a_in.wait(5)
        with memory.hint_off():
            b_in.set()
            a_out.wait(5)
            assert memory._SWITCH(False) is False  # noqa: SLF001 - still off for this block
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert memory._SWITCH(True) is True  # noqa: SLF001 - on again once both have closed
