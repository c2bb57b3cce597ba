"""amct-caffe inspect and create-config on the bundled LeNet (and open_nsfw when ../shared has it)."""

import json
import re
from pathlib import Path

import pytest

import amct_caffe as amct
from amct_caffe import cli
from tests.golden import MODELS

from .test_cli import LENET, LENET_WEIGHTS
from .test_cli_errors import fails

NSFW = MODELS / "open_nsfw"


pytestmark = pytest.mark.usefixtures("cli_scratch_dir")


def _inspect(capsys, *args) -> list[dict]:
    assert cli.main(["inspect", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _enabled(config_file) -> set[str]:
    config = json.loads(Path(config_file).read_text())
    return {k for k, v in config.items() if isinstance(v, dict) and v.get("quant_enable")}


def test_inspect_json_lists_every_layer_with_what_the_generated_config_quantizes(capsys, tmp_path):
    layers = _inspect(capsys, "--model", LENET, "--weights", LENET_WEIGHTS)
    assert [x["name"] for x in layers] == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]
    by_name = {x["name"]: x for x in layers}
    assert by_name["conv1"] == {
        "name": "conv1", "type": "Convolution", "config_type": "Convolution", "bottoms": ["data"], "tops": ["conv1"],
        "top_shapes": [[64, 20, 24, 24]], "params": 20 * 25 + 20, "quantizable": True,
        "quant_kind": "weights_and_data", "by_default": True, "note": None}
    assert by_name["relu1"]["tops"] == ["ip1"] and by_name["relu1"]["top_shapes"] == [[64, 500]]  # in place
    assert (by_name["relu1"]["quantizable"], by_name["relu1"]["quant_kind"], by_name["relu1"]["by_default"]) == (
        True, "data_only", False)
    assert (by_name["data"]["quantizable"], by_name["data"]["quant_kind"]) == (False, None)
    amct.create_quant_config(str(tmp_path / "config.json"), str(LENET), str(LENET_WEIGHTS))
    assert {x["name"] for x in layers if x["by_default"]} == _enabled(tmp_path / "config.json")
    assert sum(x["params"] for x in layers) == 431080
    assert _inspect(capsys, "--model", LENET) == layers  # without weights: shapes and counts from the prototxt


def test_inspect_table_is_aligned_and_ends_with_the_counts(capsys):
    assert cli.main(["inspect", "--model", str(LENET)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0], lines[1:10]
    assert header.split() == ["LAYER", "TYPE", "OUTPUT", "SHAPE", "PARAMS", "QUANTIZABLE", "BY", "DEFAULT", "NOTE"]
    for column in ("TYPE", "OUTPUT SHAPE", "PARAMS", "QUANTIZABLE"):
        start = header.index(column)
        assert all(row[start - 2:start] == "  " and row[start] != " " for row in rows), column
    assert re.match(r"ip1 +InnerProduct +64x500 +400,500 +weights\+data +yes$", rows[5])
    assert re.match(r"relu1 +ReLU +64x500 +0 +data only +no +switch on in the config$", rows[6])
    assert lines[10] == ("9 layers, 431,080 parameters; quantized by default: 7 (4 weights+data, 3 data only); "
                         "1 more can be switched on (quant_enable in the config)")
    assert lines[11].startswith("without --weights")


@pytest.mark.skipif(not NSFW.is_dir(), reason="../shared/models/open_nsfw not present")
def test_inspect_without_weights_infers_every_shape_of_a_resnet(capsys):
    """Scale layers shape their output from their blobs: without weights, placeholders stand in."""
    model = NSFW / "deploy.prototxt"
    bare = _inspect(capsys, "--model", model)
    assert all(None not in x["top_shapes"] and x["params"] is not None for x in bare)
    assert bare == _inspect(capsys, "--model", model, "--weights", NSFW / "resnet_50_1by2_nsfw.caffemodel")
    scale = next(x for x in bare if x["type"] == "Scale")
    assert scale["quant_kind"] == "data_only" and not scale["by_default"]


def test_inspect_without_weights_of_a_kernel_caffe_cannot_hold(capsys, tmp_path):
    """A weight of more than INT_MAX elements: its shapes stay unknown instead of an allocation failing."""
    (tmp_path / "k.prototxt").write_text(LENET.read_text().replace("kernel_size: 5", "kernel_size: 4294967295", 1))
    rows = _inspect(capsys, "--model", tmp_path / "k.prototxt")
    conv1 = next(x for x in rows if x["name"] == "conv1")
    assert conv1["params"] == 20 * 4294967295 ** 2 + 20  # counted from the shapes, not allocated


def test_inspect_without_weights_says_where_and_why_shapes_become_unknown(capsys, tmp_path):
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 25 dim: 25 } } }\n'
            'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
            'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
            'layer { name: "up" type: "Deconvolution" bottom: "pool" top: "up" '
            'convolution_param { num_output: 3 kernel_size: 2 stride: 2 } }\n'
            'layer { name: "cat" type: "Concat" bottom: "up" bottom: "data" top: "cat" }\n'
            'layer { name: "conv" type: "Convolution" bottom: "cat" top: "conv" convolution_param { num_output: 2 '
            'kernel_size: 1 } }\n')
    (tmp_path / "m.prototxt").write_text(text)
    rows = {x["name"]: x for x in _inspect(capsys, "--model", tmp_path / "m.prototxt")}
    assert rows["up"]["top_shapes"] == [[1, 3, 26, 26]] and rows["up"]["note"] is None
    assert rows["cat"]["top_shapes"] == [None] and rows["cat"]["note"] == (
        "output shape unknown: layer 'cat' (Concat): bottom shapes [[1, 3, 26, 26], [1, 3, 25, 25]] differ off axis 1")
    assert rows["conv"]["top_shapes"] == [None] and rows["conv"]["note"] is None
    (tmp_path / "u.prototxt").write_text(text.replace('type: "Concat" bottom: "up" bottom: "data"',
                                                      'type: "FancyUnknown" bottom: "up"'))
    rows = {x["name"]: x for x in _inspect(capsys, "--model", tmp_path / "u.prototxt")}
    assert rows["cat"]["note"] == ("output shape unknown: layer 'cat' (FancyUnknown): the executor does not run "
                                   "this type")


def test_inspect_errors_are_one_line(capsys, tmp_path):
    fails(capsys, ["inspect", "--model", "none.prototxt"], "model file none.prototxt does not exist")
    fails(capsys, ["inspect", "--model", str(LENET), "--weights", "none.caffemodel"],
          "weights file none.caffemodel does not exist")
    (tmp_path / "bad.prototxt").write_text("layer { name: 'x' type: 'ReLU' bottom: 'a' top: 'b' ")
    fails(capsys, ["inspect", "--model", "bad.prototxt"], "bad.prototxt")


def test_create_config_writes_what_create_quant_config_writes(capsys, tmp_path):
    lenet = ["--model", str(LENET), "--weights", str(LENET_WEIGHTS)]
    assert cli.main(["create-config", *lenet, "--output", "out/config.json", "--batch-num", "4",
                     "--no-activation-offset"]) == 0
    out = capsys.readouterr().out.splitlines()
    amct.create_quant_config(str(tmp_path / "api.json"), str(LENET), str(LENET_WEIGHTS), batch_num=4,
                             activation_offset=False)
    assert (tmp_path / "out/config.json").read_text() == (tmp_path / "api.json").read_text()
    assert out[:2] == ["config: out/config.json",
                       "7 layer(s) quantized, 1 listed with quant_enable false; batch_num 4, activation_offset false"]
    assert out[2].startswith("next: edit it, then amct-caffe calibrate --model ")
    assert "--config out/config.json" in out[2]


def test_create_config_from_a_cfg_warns_of_the_flags_it_overrides(capsys, tmp_path, caplog):
    (tmp_path / "q.cfg").write_text('batch_num: 2\nskip_layers: "conv1"\n')
    lenet = ["--model", str(LENET), "--weights", str(LENET_WEIGHTS)]
    with caplog.at_level("WARNING", logger="amct_caffe"):
        assert cli.main(["create-config", *lenet, "--cfg", "q.cfg", "--output", "c.json", "--batch-num", "4",
                         "--no-activation-offset"]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "--batch-num 4 is ignored: the fields of q.cfg win over the command line, and q.cfg sets batch_num: 2 "
        "(change it there instead)",
        "--no-activation-offset is ignored: the fields of q.cfg win over the command line, and q.cfg does not set "
        "activation_offset, so its default true applies (write activation_offset: false there)"]
    config = json.loads((tmp_path / "c.json").read_text())
    assert config["batch_num"] == 2 and config["activation_offset"] is True and "conv1" not in config
    assert "6 layer(s) quantized" in capsys.readouterr().out
    caplog.clear()
    with caplog.at_level("WARNING", logger="amct_caffe"):  # flags that agree with the file: nothing to say
        assert cli.main(["create-config", *lenet, "--cfg", "q.cfg", "--output", "c.json", "--batch-num", "2"]) == 0
    assert caplog.records == []


def test_create_config_errors_are_one_line(capsys, tmp_path):
    lenet = ["create-config", "--model", str(LENET), "--weights", str(LENET_WEIGHTS)]
    fails(capsys, lenet + ["--output", "config.txt"], "--output config.txt: expected a .json file name")
    fails(capsys, lenet + ["--output", "c.json", "--cfg", "none.cfg"], "--cfg none.cfg does not exist")
    (tmp_path / "bad.cfg").write_text("batch_num: x\n")
    fails(capsys, lenet + ["--output", "c.json", "--cfg", "bad.cfg"], "bad.cfg:1:")
    assert not (tmp_path / "c.json").exists()
