"""The embedded flow (everything in memory) saves exactly what the guide's file flow saves.

The file flow writes the modified model, runs the calibration model from its files (as a user's
own Caffe would) with the IFMR layers writing the record file, and save_model reads that file.
The embedded flow (``amct_caffe.api.workflow``, used by the command line and the fallback) runs
the calibration graph in a Net built from the IR, the record held in memory. Same inputs, so the
saved files must be the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amct_caffe.api.workflow import calibrate
from tests.api.test_saved_outputs_regression import CASES, KINDS, _snq_update_bn, run_flow
from tests.golden import SHARED

pytestmark = pytest.mark.skipif(not (SHARED / "data/mnist_5k.npz").exists(),
                                reason="../shared not beside the repository")


@pytest.mark.parametrize("case", ["lenet", "open_nsfw_snq_update_bn"])
def test_embedded_flow_saves_the_file_flows_bytes(case, tmp_path, monkeypatch):
    file_dir, mem_dir = tmp_path / "file", tmp_path / "memory"
    file_dir.mkdir()
    run_flow(case, file_dir)  # the guide's flow; leaves file_dir/config.json (edited as the case says)
    proto, weights, batches_of, edit = CASES[case]
    batches = [{"data": x} for x in batches_of()]
    if edit:  # the same config, but BatchNorm dumps of its own
        text = (file_dir / "config.json").read_text().replace(str(file_dir / "bn_dump"), str(mem_dir / "bn_dump"))
        mem_dir.mkdir()
        (mem_dir / "config.json").write_text(text)
        assert _snq_update_bn  # the case's edit is what the file flow applied
        config = mem_dir / "config.json"
    else:
        config = file_dir / "config.json"
    def no_record_file(*_):
        raise AssertionError("the embedded flow wrote a record file")

    # no record file between the steps: the calibration layers fill the session's record in memory
    monkeypatch.setattr("amct_caffe.runtime.record_sink.write_record", no_record_file)
    monkeypatch.setattr("amct_caffe.api.calibration.write_record", no_record_file)
    calibrate(str(proto), str(weights), batches, str(mem_dir / "out" / case), len(batches), config_file=str(config),
              progress=False)
    for kind in KINDS:
        want = Path(f"{file_dir}/out/{case}_{kind}").read_bytes()
        got = Path(f"{mem_dir}/out/{case}_{kind}").read_bytes()
        assert got == want, kind


def test_calibrate_checks_each_batch_it_draws(tmp_path):
    """A mapping is one batch (the same files as a list of it); a batch without samples, or not a
    mapping, gets the library's error naming it, and nothing is written."""
    import numpy as np

    from amct_caffe.errors import AmctError
    from tests.golden import MODELS

    model = str(MODELS / "lenet_mnist/lenet.prototxt")
    weights = str(MODELS / "lenet_mnist/lenet_iter_10000.caffemodel")
    x = np.random.default_rng(0).uniform(0, 1, (8, 1, 28, 28)).astype(np.float32)
    one = calibrate(model, weights, {"data": x}, str(tmp_path / "a" / "m"), 1, progress=False)
    listed = calibrate(model, weights, [{"data": x}], str(tmp_path / "b" / "m"), 1, progress=False)
    assert Path(one["fake_quant_weights"]).read_bytes() == Path(listed["fake_quant_weights"]).read_bytes()
    for batches, message in (([{"data": x}, {"data": x[:0]}], "calibration data: batch 1: input 'data' holds no "
                              "sample (shape [0, 1, 28, 28])"),
                             ((b for b in [None]), "calibration data: batch 0 is None, not a {input blob: array}"),
                             # a forward without an input would run on what its blob held (pycaffe's rule)
                             ([{"data": x}, {"label": x}], "calibration data: batch 1 gives no 'data' (the model's "
                              "inputs: data); give every input in every batch")):
        with pytest.raises(AmctError) as err:
            calibrate(model, weights, batches, str(tmp_path / "c" / "m"), 2, progress=False)
        assert message in str(err.value)
        assert not (tmp_path / "c").exists()
