"""A user's merged caffe.proto compiles at run time, so models with custom layers parse."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import amct_caffe
from amct_caffe import ModelFormatError, io
from amct_caffe.io.schema import caffe_pb
from tests.proto_sources import generated_caffe_proto

REPO = Path(__file__).resolve().parents[2]
CUSTOM_PROTOTXT = '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "id" type: "Identity2" bottom: "data" top: "out" identity2_param { scale: 2.5 } }
'''


def _user_proto(tmp_path) -> Path:
    """Our caffe.proto (as the build generates it) plus a custom layer, in the user's own package name."""
    text = generated_caffe_proto()
    text = text.replace("package amct_caffe;", "package caffe;")
    anchor = "message LayerParameter {"
    text = text.replace(anchor, anchor + "\n  optional Identity2Parameter identity2_param = 4999;", 1)
    text += "\nmessage Identity2Parameter {\n  optional float scale = 1 [default = 1.0];\n}\n"
    path = tmp_path / "caffe.proto"
    path.write_text(text)
    return path


@pytest.fixture
def restore_schema():
    yield
    amct_caffe.set_caffe_proto(None)


def test_custom_layer_parses_after_set_caffe_proto(tmp_path, restore_schema):
    model = tmp_path / "m.prototxt"
    model.write_text(CUSTOM_PROTOTXT)
    with pytest.raises(ModelFormatError, match="identity2_param"):
        io.read_prototxt(model)
    amct_caffe.set_caffe_proto(_user_proto(tmp_path))
    net = io.read_prototxt(model)
    assert net.layer[1].identity2_param.scale == pytest.approx(2.5)
    assert caffe_pb().package == "caffe"


def test_environment_variable_selects_user_proto(tmp_path):
    model = tmp_path / "m.prototxt"
    model.write_text(CUSTOM_PROTOTXT)
    code = ("from amct_caffe import io; n = io.read_prototxt(%r); print(n.layer[1].identity2_param.scale)"
            % str(model))
    env = dict(os.environ, AMCT_CAFFE_PROTO=str(_user_proto(tmp_path)))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2.5"


def test_broken_user_proto_reports_protoc_error(tmp_path, restore_schema):
    bad = tmp_path / "caffe.proto"
    bad.write_text('syntax = "proto2";\nmessage NetParameter { optional int32 x = 1 }\n')
    with pytest.raises(ModelFormatError, match="protoc failed"):
        amct_caffe.set_caffe_proto(bad)


def test_a_folder_or_a_missing_proto_file_is_named_as_such(tmp_path, restore_schema):
    with pytest.raises(ModelFormatError, match="is a folder, not a .proto file"):
        amct_caffe.set_caffe_proto(tmp_path)
    with pytest.raises(ModelFormatError, match="none.proto does not exist"):
        amct_caffe.set_caffe_proto(tmp_path / "none.proto")


def test_a_caffe_proto_without_the_integer_blob_fields_runs_the_whole_flow(tmp_path, restore_schema):
    """BVLC's caffe.proto (and one merged from it) has no BlobProto int8_data / int32_data / uint64_data, which
    deploy models hold (ATC's caffe.proto has them): reading any caffemodel failed with a bare AttributeError,
    and save_model could not write the deploy weights. The fields are added where their numbers are free."""
    import numpy as np

    from tests.test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE

    text = _user_proto(tmp_path).read_text()
    for line in ("  optional bytes int8_data = 10;\n", "  repeated int32 int32_data = 11 [packed = true];\n",
                 "  repeated uint64 uint64_data = 12 [packed = true];\n"):
        assert line in text
        text = text.replace(line, "")
    proto = tmp_path / "bvlc_like.proto"
    proto.write_text(text)
    amct_caffe.set_caffe_proto(proto)
    assert {"int8_data", "int32_data", "uint64_data"} <= set(caffe_pb().BlobProto.DESCRIPTOR.fields_by_name)
    x = (np.load(MNIST_SAMPLE / "mnist_500.npz")["images"][:64, None] / 256).astype(np.float32)
    from amct_caffe.api.workflow import calibrate

    paths = calibrate(str(LENET), str(LENET_WEIGHTS), [{"data": x}], str(tmp_path / "out" / "m"), 1, progress=False)
    deploy = io.read_caffemodel(paths["deploy_weights"])
    conv1 = next(layer for layer in deploy.layer if layer.name == "conv1")
    assert len(conv1.blobs[0].int8_data) == 20 * 25  # the INT8 weights, in the field ATC reads


def _without_integer_fields(tmp_path) -> str:
    text = _user_proto(tmp_path).read_text()
    for line in ("  optional bytes int8_data = 10;\n", "  repeated int32 int32_data = 11 [packed = true];\n",
                 "  repeated uint64 uint64_data = 12 [packed = true];\n"):
        text = text.replace(line, "")
    return text


@pytest.mark.parametrize("blob_lines", ["  optional float my_scale = 10;", "  extensions 10 to 100;"])
def test_blob_numbers_taken_in_a_users_proto_are_named_when_a_deploy_model_is_written(tmp_path, restore_schema,
                                                                                       caplog, blob_lines):
    """A field of the user's own at 10 (or an extension range over it): the schema was built anyway (an extension
    range made it a bare TypeError) and the deploy weights failed with a bare AttributeError at the very end."""
    import logging

    import numpy as np

    from amct_caffe.api.workflow import calibrate
    from tests.test_cli import LENET, LENET_WEIGHTS, MNIST_SAMPLE

    proto = tmp_path / "taken.proto"
    proto.write_text(_without_integer_fields(tmp_path).replace("message BlobProto {",
                                                               "message BlobProto {\n" + blob_lines, 1))
    caplog.set_level(logging.WARNING, logger="amct_caffe")
    amct_caffe.set_caffe_proto(proto)
    assert any("BlobProto has no int8_data = 10" in r.getMessage() for r in caplog.records)
    x = (np.load(MNIST_SAMPLE / "mnist_500.npz")["images"][:64, None] / 256).astype(np.float32)
    with pytest.raises(ModelFormatError, match=r"BlobProto has no field int8_data = 10, where a deploy model keeps"):
        calibrate(str(LENET), str(LENET_WEIGHTS), [{"data": x}], str(tmp_path / "out" / "m"), 1, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_proto_without_amcts_layers_is_refused_before_quantization_starts(tmp_path, restore_schema):
    """BVLC's caffe.proto, unmerged: the calibration model could not be built (a bare AttributeError: ifmr_param)."""
    text = _without_integer_fields(tmp_path)
    for message in ("IFMRParameter",):
        assert f"message {message} {{" in text
    text = text.replace("message IFMRParameter {", "message IFMRParameterRenamed {", 1).replace(
        "optional IFMRParameter ", "optional IFMRParameterRenamed ")
    proto = tmp_path / "bvlc_like.proto"
    proto.write_text(text)
    amct_caffe.set_caffe_proto(proto)
    from tests.test_cli import LENET, LENET_WEIGHTS

    with pytest.raises(ModelFormatError, match=r"bvlc_like.proto has no IFMRParameter \(AMCT's layers\), which "
                                               "quantization writes: merge"):
        amct_caffe.create_quant_config(str(tmp_path / "c.json"), str(LENET), str(LENET_WEIGHTS))
