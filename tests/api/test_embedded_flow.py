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
