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
