"""The compiled schemas agree with each other and with the user guide's samples."""

import ast
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from amct_caffe.errors import ModelFormatError
from amct_caffe.io import schema
from amct_caffe.io.schema import _load_desc, caffe_pb, records
from tests.golden import SHARED

GUIDE = SHARED / "spec/amct_caffe_user_guide.md"
RECORD_MESSAGES = {"ActivationQuantParam", "SingleLayerRecord", "ScaleOffsetRecord"}


def _files(name):
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(_load_desc(name)).file}


def _normalized(msg) -> bytes:
    """A message or field descriptor without what depends on the file it sits in (package, json_name)."""
    copy = type(msg)()
    copy.CopyFrom(msg)

    def strip(m):
        for f in m.field:
            f.ClearField("json_name")
            f.type_name = f.type_name.split(".")[-1]
        for n in m.nested_type:
            strip(n)

    if isinstance(copy, descriptor_pb2.FieldDescriptorProto):
        copy.ClearField("json_name")
        copy.type_name = copy.type_name.split(".")[-1]
    else:
        strip(copy)
    return copy.SerializeToString(deterministic=True)


def test_generated_caffe_proto_has_every_definition_of_amct_custom_proto():
    """amct_custom.proto is what gets merged into users' Caffe and the source of our AMCT layers: the
    compiled schema must hold each of its LayerParameter fields and messages with the same numbers, labels,
    types and defaults, so the two can never drift."""
    custom = _files("amct_custom")["amct_custom.proto"]
    ours = {m.name: (name, m) for name, f in _files("schema").items() for m in f.message_type}
    layer_fields = {f.name: f for f in ours["LayerParameter"][1].field}
    assert any(f.number >= 200000 for f in layer_fields.values())
    for msg in custom.message_type:
        if msg.name == "LayerParameter":
            for f in msg.field:
                assert _normalized(layer_fields[f.name]) == _normalized(f), f.name
                assert f.number == 208 or f.number >= 200000, f"{f.name}: AMCT fields are numbered from 200000"
        else:
            where, mine = ours[msg.name]
            # the record messages come from scale_offset_record.proto, the others from the generated caffe.proto
            assert where == ("scale_offset_record.proto" if msg.name in RECORD_MESSAGES else "caffe.proto"), msg.name
            assert _normalized(mine) == _normalized(msg), msg.name


def test_field_numbering_rules():
    fields = {f.name: f.number for f in caffe_pb().LayerParameter.DESCRIPTOR.fields}
    assert fields["quant_param"] == 208 and fields["dequant_param"] == 200000
    assert fields["permute_param"] == 202 and fields["prior_box_param"] == 203
    assert fields["detection_output_param"] == 204 and fields["norm_param"] == 206
    assert fields["roi_pooling_param"] == 8266711


@pytest.mark.skipif(not GUIDE.exists(), reason="../shared/spec not beside the repository")
def test_guide_sample_cfg_parses():
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index("# global quantize parameter")
    sample = text[start:text.index("```", start)]
    cfg = text_format.Parse(sample, records().AMCTConfig())
    assert "pool1" in cfg.skip_layers


def test_record_example_parses():
    rec = text_format.Parse('record{ key:"fc1000" value{ scale_w:0.0057898927 offset_w:0 shift_bit:2 num_bits_w:8 '
                            'record_d{ scale_d:0.031852875 offset_d:-128 index:0 num_bits_d:8 } } }',
                            records().ScaleOffsetRecord())
    value = rec.record[0].value
    assert rec.record[0].key == "fc1000" and value.record_d[0].offset_d == -128
    assert value.record_d[0].scale_d == pytest.approx(0.031852875, rel=1e-7)


def test_schema_module_imports_only_the_errors_of_the_package():
    """io.schema sits below every other module (io's own included), so it must not import upward."""
    tree = ast.parse(Path(schema.__file__).read_text(encoding="utf-8"))
    ours = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            ours.update(a.name for a in node.names if a.name.split(".")[0] == "amct_caffe")
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] == "amct_caffe":
                ours.add("." * node.level + (node.module or ""))
    assert ours == {"amct_caffe.errors"}


def test_missing_descriptor_set_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(schema, "_DESC_PACKAGE", "amct_caffe.no_such_build_dir")
    with pytest.raises(ModelFormatError, match=r"schema\.desc is missing .*run `pip install \.`"):
        _load_desc("schema")
    monkeypatch.undo()
    with pytest.raises(ModelFormatError, match=r"no_such\.desc is missing .*run `pip install \.`"):
        _load_desc("no_such")
