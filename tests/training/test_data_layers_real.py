"""The executor's data layers against real Caffe: several consecutive batches (with a wrap-around) of
Data, MemoryData and HDF5Data, bit for bit, in the deterministic settings (no TRAIN crop, no mirror),
TRAIN and TEST phase.

The reference build has no OpenCV (``USE_OPENCV`` off): it registers no ImageData layer and refuses
encoded Datums ("Encoded datum requires OpenCV"), so those two are checked against an independent
numpy computation only (tests/runtime/test_data_layers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from amct_caffe.runtime.net import Net
from tests.real_caffe import pycaffe_dir, run_with_pycaffe
from tests.runtime.data_builders import data_net, datum, mnist, write_h5, write_lmdb, write_mean

pytestmark = pytest.mark.real_caffe
TRAIN, TEST = 0, 1
STEPS = 4

# Runs in the pycaffe subprocess: every case's net, STEPS forwards, each blob saved per step.
_RUNNER = """
import json, os
import numpy as np
import caffe
os.chdir({workdir!r})
for name, spec in json.load(open("cases.json")).items():
    net = caffe.Net(name + ".prototxt", spec["phase"])
    if spec["memory"]:
        arrays = np.load(name + "_in.npz")
        data, labels = arrays["data"], arrays["labels"]
        net.set_input_arrays(data, labels)
    out = {{}}
    for k in range(spec["steps"]):
        net.forward()
        for b in net.blobs:
            out[b + "_" + str(k)] = net.blobs[b].data.copy()
    np.savez(name + "_caffe.npz", **out)
    del net
"""


def _layer(kind: str, param: str, transform: str = "") -> str:
    return f'  type: "{kind}"\n  {param}\n' + (f"  transform_param {{ {transform} }}\n" if transform else "")


def _build(workdir: Path) -> dict[str, dict]:
    """Write the data and the prototxts of every case; {case: {phase, steps, memory}}."""
    rng = np.random.default_rng(3)
    images, labels = mnist(10)
    write_lmdb(workdir / "mnist_db", {f"{i:08d}": datum(images[i], labels[i]) for i in range(10)})
    write_mean(workdir / "mnist_mean.binaryproto", rng.uniform(0, 255, (1, 28, 28)))
    colour = rng.integers(0, 256, (7, 3, 9, 11), dtype=np.uint8)  # BGR (C, H, W)
    write_lmdb(workdir / "float_db", {f"k{i}": datum(colour[i] / 7.0, i, floats=True) for i in range(7)})
    write_h5(workdir / "a.h5", data=rng.normal(size=(5, 2, 3)), label=np.arange(5))
    write_h5(workdir / "b.h5", data=rng.normal(size=(3, 2, 3)).astype(np.float32), label=np.arange(10, 13))
    (workdir / "h5.txt").write_text("a.h5\nb.h5\n")
    np.savez(workdir / "mem_in.npz", data=rng.normal(size=(6, 2, 3, 4)).astype(np.float32),
             labels=np.arange(6, dtype=np.float32))

    mem = "memory_data_param {{ batch_size: {} channels: 2 height: 3 width: 4 }}"
    db = 'data_param {{ source: "{}" batch_size: {} backend: LMDB }}'
    cases = {
        # raw uint8, centre crop, one mean value, scale; 10 records in batches of 4 wrap around
        "data_test_crop": (TEST, _layer("Data", db.format("mnist_db", 4),
                                        "scale: 0.00390625 mean_value: 33 crop_size: 20")),
        # TRAIN without crop or mirror is deterministic: mean_file and scale
        "data_train_meanfile": (TRAIN, _layer("Data", db.format("mnist_db", 3),
                                              'scale: 0.5 mean_file: "mnist_mean.binaryproto"')),
        # float_data with a mean value per channel; a single top
        "data_float": (TEST, _layer("Data", db.format("float_db", 3), "mean_value: 1 mean_value: 2 mean_value: 3"),
                       ("data",)),
        "mem_test": (TEST, _layer("MemoryData", mem.format(2))),
        "mem_train": (TRAIN, _layer("MemoryData", mem.format(3))),
        "h5_test": (TEST, _layer("HDF5Data", 'hdf5_data_param { source: "h5.txt" batch_size: 3 }')),
        "h5_train": (TRAIN, _layer("HDF5Data", 'hdf5_data_param { source: "h5.txt" batch_size: 5 }')),
    }
    specs = {}
    for name, (phase, layer, *tops) in cases.items():
        (workdir / f"{name}.prototxt").write_text(data_net(layer, *tops))
        memory = name.startswith("mem")
        if memory:
            (workdir / f"{name}_in.npz").write_bytes((workdir / "mem_in.npz").read_bytes())
        specs[name] = {"phase": phase, "steps": STEPS, "memory": memory}
    (workdir / "cases.json").write_text(json.dumps(specs))
    return specs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if pycaffe_dir() is None:
        pytest.skip("AMCT_REAL_CAFFE is not set")
    pytest.importorskip("lmdb")
    pytest.importorskip("h5py")
    pytest.importorskip("PIL")
    workdir = tmp_path_factory.mktemp("data_layers_real")
    specs = _build(workdir)
    proc = run_with_pycaffe(_RUNNER.format(workdir=str(workdir)), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, specs


@pytest.mark.parametrize("case", ["data_test_crop", "data_train_meanfile", "data_float", "mem_test", "mem_train",
                                  "h5_test", "h5_train"])
def test_batches_equal_caffe(workdir, case, monkeypatch):
    root, specs = workdir
    spec = specs[case]
    monkeypatch.chdir(root)  # the sources are relative paths, read from the current directory as in Caffe
    net = Net(f"{case}.prototxt", spec["phase"])
    if spec["memory"]:
        arrays = np.load(f"{case}_in.npz")
        data, labels = arrays["data"], arrays["labels"]
        net.set_input_arrays(data, labels)
    want = np.load(f"{case}_caffe.npz")
    for k in range(spec["steps"]):
        net.forward()
        for name, blob in net.blobs.items():
            ref = want[f"{name}_{k}"]
            assert blob.data.dtype == np.float32
            assert blob.data.shape == ref.shape, (case, name, k)
            np.testing.assert_array_equal(blob.data, ref, err_msg=f"{case}: blob {name}, batch {k}")
