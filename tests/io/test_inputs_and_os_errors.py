"""Nothing lost, nothing cryptic: an output never overwrites an input of the same call, and the
operating system's errors reach the user as the library's own, naming the path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest

import amct_caffe as amct
from amct_caffe import AmctError, ConfigError, FileAccessError, ModelFormatError, WeightsError
from amct_caffe.io.files import atomic_output
from amct_caffe.io.record import RecordError, read_record
from amct_caffe.runtime import TEST, Net
from tests.golden import MODELS

LENET = MODELS / "lenet_mnist/lenet.prototxt"
LENET_W = MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"
pytestmark = pytest.mark.skipif(not LENET.exists(), reason="../shared not beside the repository")


@pytest.fixture
def model(tmp_path):
    """LeNet copied into tmp_path (model.prototxt, model.caffemodel) with a config.json."""
    proto, weights = tmp_path / "model.prototxt", tmp_path / "model.caffemodel"
    shutil.copy(LENET, proto)
    shutil.copy(LENET_W, weights)
    amct.create_quant_config(str(tmp_path / "config.json"), str(proto), str(weights), batch_num=1)
    return proto, weights, tmp_path / "config.json"


def _unchanged(*paths):
    before = {p: p.read_bytes() for p in paths}

    def check():
        for p, data in before.items():
            assert p.read_bytes() == data, f"{p} was modified"
    return check


def _calibrated(tmp_path, proto, weights, config):
    graph = amct.init(str(config), str(proto), str(weights), str(tmp_path / "record.txt"))
    amct.weights_quantize_model(graph, str(tmp_path / "mod.prototxt"), str(tmp_path / "mod.caffemodel"))
    amct.activation_quantize_model(graph, str(tmp_path / "mod.prototxt"), str(tmp_path / "mod.caffemodel"))
    Net(str(tmp_path / "mod.prototxt"), str(tmp_path / "mod.caffemodel"), TEST).forward(
        data=np.random.default_rng(0).random((2, 1, 28, 28), np.float32))
    return graph


# ------------------------------------------------------------------ 1. inputs are never overwritten
def test_create_quant_config_refuses_to_write_over_the_model(model):
    proto, weights, _ = model
    unchanged = _unchanged(proto, weights)
    with pytest.raises(AmctError, match=r"output .*model.prototxt is the same file as the input model_file"):
        amct.create_quant_config(str(proto), str(proto), str(weights))
    with pytest.raises(AmctError, match="the same file as the input weights_file"):
        amct.create_quant_config(os.path.join(os.path.dirname(weights), ".", "model.caffemodel"), str(proto),
                                 str(weights))
    unchanged()


def test_init_refuses_a_record_that_is_the_config(model):
    proto, weights, config = model
    unchanged = _unchanged(config)
    with pytest.raises(AmctError, match="the same file as the input config_file"):
        amct.init(str(config), str(proto), str(weights), str(config))
    unchanged()


def test_quantize_steps_refuse_to_overwrite_the_model_the_config_or_the_record(model, tmp_path):
    proto, weights, config = model
    graph = amct.init(str(config), str(proto), str(weights), str(tmp_path / "record.txt"))
    unchanged = _unchanged(proto, weights, config, tmp_path / "record.txt")
    with pytest.raises(AmctError, match="the same file as the input model_file"):
        amct.weights_quantize_model(graph, str(proto), str(weights))
    unchanged()


@pytest.mark.parametrize("target", ["config", "record", "same_twice"])
def test_modified_model_cannot_replace_an_input_or_collide(model, tmp_path, target):
    proto, weights, config = model
    graph = amct.init(str(config), str(proto), str(weights), str(tmp_path / "record.txt"))
    amct.weights_quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    unchanged = _unchanged(config, tmp_path / "record.txt")
    out = {"config": (config, tmp_path / "m.caffemodel"), "record": (tmp_path / "m.prototxt", tmp_path / "record.txt"),
           "same_twice": (tmp_path / "x.prototxt", tmp_path / "x.prototxt")}[target]
    with pytest.raises(AmctError, match="same file as the input|two outputs of this call are the same file"):
        amct.activation_quantize_model(graph, str(out[0]), str(out[1]))
    unchanged()


def test_save_model_and_convert_model_refuse_outputs_over_inputs(model, tmp_path):
    proto, weights, config = model
    victim = tmp_path / "out_deploy_weights.caffemodel"
    shutil.copy(weights, victim)  # the user's weights happen to sit where the deploy weights would go
    graph = _calibrated(tmp_path, proto, victim, config)
    with pytest.raises(AmctError, match="same file as the input weights_file"):
        amct.save_model(graph, "Both", str(tmp_path / "out"))
    assert victim.read_bytes() == weights.read_bytes()
    assert not (tmp_path / "out_fake_quant_model.prototxt").exists()  # all or nothing
    record = tmp_path / "r_quant_param_record.txt"
    shutil.copy(tmp_path / "record.txt", record)
    unchanged = _unchanged(record)
    with pytest.raises(AmctError, match="same file as the input scale_offset_record_file"):
        amct.convert_model(str(proto), str(weights), str(record), str(tmp_path / "r"))
    unchanged()


def test_a_file_name_the_file_system_refuses(model, tmp_path):
    """A prefix longer than a file name may be (255 bytes here): the library's error, and nothing written."""
    proto, weights, config = model
    graph = _calibrated(tmp_path, proto, weights, config)
    (tmp_path / "out").mkdir()
    long = str(tmp_path / "out" / ("x" * 300))
    with pytest.raises(FileAccessError, match="cannot write .*xxx_fake_quant_model.prototxt: File name too long"):
        amct.save_model(graph, "Both", long)
    with pytest.raises(FileAccessError, match="File name too long"):
        amct.convert_model(str(proto), str(weights), str(tmp_path / "record.txt"), long)
    assert not list((tmp_path / "out").iterdir())


def test_uninplace_model_refuses_its_input_also_through_links(model, tmp_path):
    proto, _, _ = model
    unchanged = _unchanged(proto)
    (tmp_path / "sym.prototxt").symlink_to(proto)
    os.link(proto, tmp_path / "hard.prototxt")
    for out in (proto, tmp_path / "sym.prototxt", tmp_path / "hard.prototxt"):
        with pytest.raises(AmctError, match="the same file as the input model_file"):
            amct.uninplace_model(str(proto), str(out))
    unchanged()


# ------------------------------------------------------------------ 2. OS and encoding errors
def test_a_directory_where_a_file_is_expected(tmp_path):
    with pytest.raises(ModelFormatError, match=r"cannot read prototxt file .*: it is a directory"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(tmp_path), str(LENET_W))
    with pytest.raises(WeightsError, match=r"cannot read caffemodel file .*: it is a directory"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(LENET), str(tmp_path))
    with pytest.raises(FileAccessError, match="a directory of that name exists"):
        amct.create_quant_config(str(tmp_path), str(LENET), str(LENET_W))


def test_an_output_whose_parent_is_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileAccessError, match=r"cannot write .*: .*file is a file, not a directory"):
        amct.create_quant_config(str(tmp_path / "file" / "c.json"), str(LENET), str(LENET_W))
    assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_location_names_the_path(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(FileAccessError, match=r"cannot write .*c.json: permission denied"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(LENET), str(LENET_W))
    with pytest.raises(OSError):  # still an OSError for code that handled those
        with atomic_output(tmp_path / "x.bin") as f:
            f.write(b"x")


def test_a_nul_byte_in_a_path(tmp_path):
    with pytest.raises(AmctError, match="NUL byte"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(LENET) + "\0x", str(LENET_W))
    with pytest.raises(AmctError, match="NUL byte"):
        amct.create_quant_config(str(tmp_path / "c\0.json"), str(LENET), str(LENET_W))


def test_text_files_that_are_not_utf8(model, tmp_path):
    proto, weights, config = model
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"quantization config file .*binary is not UTF-8 text"):
        amct.init(str(binary), str(proto), str(weights), str(tmp_path / "r.txt"))
    with pytest.raises(ConfigError, match=r"simple config file .*binary is not UTF-8 text"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(proto), str(weights), config_defination=str(binary))
    with pytest.raises(RecordError, match=r"record file .*binary is not UTF-8 text"):
        read_record(binary)
    with pytest.raises(RecordError, match="not UTF-8"):
        amct.convert_model(str(proto), str(weights), str(binary), str(tmp_path / "out"))
    json.loads(config.read_text())  # the inputs are intact


def test_outputs_an_input_folder_would_read_as_data_are_refused(tmp_path):
    from amct_caffe.data.images import IMAGE_SUFFIXES
    from amct_caffe.io.paths import check_output, reading

    (tmp_path / "images").mkdir()
    with reading(data=str(tmp_path / "images")):
        for name in [f"plot{suffix}" for suffix in IMAGE_SUFFIXES] + ["PLOT.PNG", "batch_000003.npz", "data.mdb"]:
            with pytest.raises(AmctError, match=rf"{name} is inside the input folder data .*next reader would take"):
                check_output(tmp_path / "images" / name)  # the next run would read it among the data
        for name in ("model_deploy_model.prototxt", "report.html", "outputs.npz", "results/plot.png"):
            check_output(tmp_path / "images" / name)  # not data to the folder's reader (a subfolder is not read)
        check_output(tmp_path / "plot.png")
