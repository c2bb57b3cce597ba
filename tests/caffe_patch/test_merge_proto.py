"""caffe_patch.merge_proto: parser round trips, the user guide's merge rules and FAQ scenarios, protoc checks.

Inputs: our caffe.proto (as the build generates it from proto/caffe_base.proto and proto/amct_custom.proto)
and proto/amct_custom.proto, the guide's custom.proto examples (copied below),
a small fixture with the proto2 syntax Caffe forks use, and - when present - the Caffe fork CI builds
(brocolli-caffe 9.0.2, found through AMCT_REAL_CAFFE or where ../shared/tools/build_caffe.sh downloads it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from caffe_patch.merge_proto import MergeError, check_superset, merge_protos, parse
from caffe_patch.merge_proto.__main__ import main as cli_main
from caffe_patch.merge_proto.parser import Enum, Message, Oneof, ProtoSyntaxError, Statement
from tests.caffe_patch.guide_examples import GUIDE_CUSTOM_PROTO
from tests.proto_sources import generated_caffe_proto

REPO = Path(__file__).resolve().parents[2]
OURS = generated_caffe_proto()   # amct_caffe's schema, AMCT layers included
BASE = (REPO / "proto" / "caffe_base.proto").read_text()
AMCT = (REPO / "proto" / "amct_custom.proto").read_text()
EMPTY = 'syntax = "proto2";\n'

GUIDE_CUSTOM = GUIDE_CUSTOM_PROTO

# The guide's two message definitions, as they stand in its custom.proto.
_RELU6_ROI = GUIDE_CUSTOM_PROTO[GUIDE_CUSTOM_PROTO.index(" message ReLU6Parameter {"):]

# The four custom.proto files of the FAQ "执行proto合并时提示ERROR信息".
FAQ = {
    1: """message LayerParameter {
  optional QuantParameter quant_param = 208;
  optional ReLU6Parameter relu6_param = 1000000;
  optional ROIPoolingParameter roi_pooling_param = 8266711;
}

""" + _RELU6_ROI + """
message QuantParameter {

    optional bool with_offset = 1;
    optional float scale = 2;
    optional int32 offset = 3;
    optional string object_layer = 4;
    optional uint32 index = 5 [default = 0];
optional int32 num_bits_d = 6;
 }
""",
    2: """message LayerParameter {
   optional QuantParameter quant_param = 208;
   optional ReLU6Parameter relu6_param = 1000000;
   optional ROIPoolingParameter roi_pooling_param = 8266711;
 }

""" + _RELU6_ROI,
    3: """message LayerParameter {
   optional ReLU6Parameter relu6_param = 206;
   optional ROIPoolingParameter roi_pooling_param = 8266711;
 }

""" + _RELU6_ROI,
    4: """message LayerParameter {
   optional ReLU6Parameter relu6_param = 1000000;
   optional ROIPoolingParameter roi_pooling_param = 8266711;
   optional NormalizeParameter norm_param = 206;
 }

""" + _RELU6_ROI + """ message NormalizeParameter {
     optional bool across_spatial = 1 [default = true];
     // Initial value of scale. Default is 1.0 for all
     optional FillerParameter scale_filler = 2;
     // Whether or not scale parameters are shared across channels.
     optional bool channel_shared = 3 [default = true];
     // Epsilon for not dividing by zero while normalizing variance
     optional float eps = 4 [default = 1e-10];
 }
""",
}

# Proto2 syntax the parser must carry through: comments that look like code, strings holding braces and
# semicolons, nested messages and enums, oneof, map, group, reserved, extensions, extend, options, service.
FIXTURE = r"""// Fixture: a small Caffe-like schema. /* not a block comment start
syntax = "proto2";

package caffe;

import "google/protobuf/descriptor.proto";

option java_package = "org.example.caffe";  /* a } in a comment */
option optimize_for = SPEED;

extend google.protobuf.FieldOptions {
  optional string doc = 50001;
}

message BlobShape {
  repeated int64 dim = 1 [packed = true];
}

/* A block comment that looks like code:
message Fake { optional int32 x = 1; }
*/
message FillerParameter {
  // The filler type.
  optional string type = 1 [default = 'constant']; // trailing comment
  optional float value = 2 [default = 0, (doc) = "a } brace; and a semicolon"];
  optional string pattern = 3 [default = "{;}\"//not a comment"];
  enum VarianceNorm {
    FAN_IN = 0;
    FAN_OUT = 1;
    AVERAGE = 2;
  }
  optional VarianceNorm variance_norm = 8 [default = FAN_IN];
  optional double min = 4 [default = -inf];
  optional double max = 5 [default = 1e-10, deprecated = true];
  optional int32 hex = 6 [default = 0x1F];
  reserved 9, 11 to 15;
  reserved "old_name";
  extensions 100 to max;
}

message NetParameter {
  optional string name = 1;
  repeated LayerParameter layer = 100;
  map<string, BlobShape> shapes = 7;
  oneof source {
    string file = 8;
    bytes inline = 9;
  }
  message Inner {
    enum Kind { option allow_alias = true; A = 0; B = 0; C = -1; }
    optional Kind kind = 1 [default = C];
  }
  optional Inner inner = 10;
  optional group Legacy = 11 {
    optional int32 x = 1;
  }
}

enum Phase {
   TRAIN = 0;
   TEST = 1;
}

message LayerParameter {
  optional string name = 1; // the layer name
  repeated string bottom = 3;
  optional FillerParameter filler = 100;
  optional ReLU6Parameter relu6_param = 503;
  optional NormalizeParameter norm_param = 206;
  optional Phase phase = 10;
  extensions 1000 to 1999;
}

extend LayerParameter {
  optional int32 ext_field = 1000;
}

message ReLU6Parameter {
    optional float negative_slope = 1 [default = 0];
    optional float threshold = 2 [default = 6];
}
message NormalizeParameter { optional bool across_spatial = 1 [default = true];
  optional float eps = 4 [default = 1e-10]; }

service Dummy { rpc Get (BlobShape) returns (BlobShape); }
"""


def _fork_proto() -> str | None:
    """src/caffe/proto/caffe.proto of the Caffe fork CI builds, if one is on this machine."""
    rel = "src/brocolli-caffe-9.0.2/src/caffe/proto/caffe.proto"
    roots = [os.environ.get("AMCT_REAL_CAFFE", ""), os.environ.get("AMCT_CAFFE_ROOT", ""),
             str(Path.home() / ".cache/amct-caffe/caffe"), "/tmp/real_caffe"]
    cands = [Path(r) / rel for r in roots if r] + [Path("/tmp/dl") / rel.split("/", 1)[1]]
    for c in cands:
        if c.is_file():
            return c.read_text()
    return None


FORK = _fork_proto()
NO_FORK = ("the brocolli-caffe 9.0.2 sources are not on this machine (run ../shared/tools/build_caffe.sh or "
           "set AMCT_REAL_CAFFE)")
needs_fork = pytest.mark.skipif(FORK is None, reason=NO_FORK)
BASES = {"ours": OURS, "base": BASE, "fixture": FIXTURE, "fork": FORK}


def protoc(tmp_path: Path, text: str, name: str = "caffe.proto"):
    """Compile ``text`` with grpcio-tools' protoc; return the FileDescriptorProto."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    d = tmp_path / f"protoc_{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    (d / name).write_text(text)
    inc = Path(grpc_tools.__file__).parent / "_proto"
    res = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{d}", f"-I{inc}",
                          f"--python_out={d}", f"--descriptor_set_out={d / 'set.pb'}", str(d / name)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    fds = descriptor_pb2.FileDescriptorSet.FromString((d / "set.pb").read_bytes())
    return fds.file[-1]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def amct_line(needle: str) -> int:
    return line_of(AMCT, needle)


def _schema(fd) -> dict:
    """{message full name: {field name: (number, label, type, type_name)}} from a FileDescriptorProto."""
    out = {}

    def walk(msgs, prefix):
        for m in msgs:
            name = prefix + m.name
            out[name] = {f.name: (f.number, f.label, f.type, f.type_name.rsplit(".", 1)[-1]) for f in m.field}
            walk(m.nested_type, name + ".")
    walk(fd.message_type, "")
    return out


# ---------------------------------------------------------------------------------------------- parser

@pytest.mark.parametrize("which", ["ours", "base", "fixture", "fork", "amct"])
def test_round_trip_unchanged(which):
    """Merging nothing gives the identical text; every definition's span re-parses to itself."""
    text = AMCT if which == "amct" else BASES[which]
    if text is None:
        pytest.skip("fork sources not on this machine")
    assert merge_protos(text, EMPTY).text == text
    pf = parse(text, which)

    def check(items):
        for it in items:
            span = text[it.start:it.end]
            lead = text[it.lead:it.start].strip()
            assert lead == "" or (lead.startswith(("//", "/*")) and parse(lead, "comment").items == [])
            if isinstance(it, (Message, Enum)):
                again = parse(span, "span").items[0]
                assert again.key == it.key and again.name == it.name
                check(it.items)
            elif isinstance(it, Oneof):
                check(it.items)
    check(pf.items)


def test_parser_details():
    pf = parse(FIXTURE, "fixture.proto")
    assert pf.package == "caffe" and pf.syntax == "proto2"
    assert [s.value for s in pf.statements("import")] == ["google/protobuf/descriptor.proto"]
    types = pf.types()
    assert "Fake" not in types                      # inside a block comment
    filler = types["FillerParameter"]
    f = {x.name: x for x in filler.all_fields()}
    assert f["value"].options == 'default = 0, (doc) = "a } brace; and a semicolon"'
    assert f["pattern"].options == r'default = "{;}\"//not a comment"'
    assert f["hex"].number == 6 and f["min"].options == "default = -inf"
    assert FIXTURE[f["type"].start:f["type"].tail].endswith("// trailing comment")
    assert FIXTURE[f["type"].lead:f["type"].start].strip() == "// The filler type."
    assert [v.name for v in filler.types()["VarianceNorm"].values] == ["FAN_IN", "FAN_OUT", "AVERAGE"]
    net = types["NetParameter"]
    nf = {x.name: x for x in net.all_fields()}
    assert nf["shapes"].type == "map<string,BlobShape>"
    assert nf["file"].oneof == "source" and nf["inline"].label == ""
    assert nf["legacy"].group is not None and nf["legacy"].type == "Legacy"
    assert [v.number for v in net.types()["Inner"].types()["Kind"].values] == [0, 0, -1]
    assert [s.kind for s in filler.items if isinstance(s, Statement)] == \
        ["reserved", "reserved", "extensions"]
    assert [s.kind for s in pf.items if not isinstance(s, (Message, Enum))] == \
        ["syntax", "package", "import", "option", "option", "extend", "extend", "service"]


@pytest.mark.parametrize("text, where, what", [
    ("message A {\n  # a shell comment\n}\n", "x.proto:2:3", "'#' comments"),
    ("message A {\n  optional int32 a = 1;\n", "x.proto:3:1", "missing '}'"),
    ("message A { optional int32 a 1; }", "x.proto:1:30", "expected '=' and the field number"),
    ('message A { optional string a = 1 [default = "x]; }', "x.proto:1:46", "unterminated string"),
    ("message A { optional int32 a = one; }", "x.proto:1:32", "expected the field number"),
])
def test_syntax_errors_name_the_place(text, where, what):
    with pytest.raises(ProtoSyntaxError, match=f"^{where}: {what}"):
        parse(text, "x.proto")
    with pytest.raises(MergeError, match="custom.proto"):
        merge_protos(OURS, AMCT, text)


# ---------------------------------------------------------------------------------------------- FAQ

@pytest.mark.parametrize("base", ["ours", "fork"])
def test_faq_scenario1_message_name_clash_with_amct(base):
    if BASES[base] is None:
        pytest.skip("fork sources not on this machine")
    with pytest.raises(MergeError) as e:
        merge_protos(BASES[base], AMCT, FAQ[1])
    first = e.value.problems[0]
    assert first.startswith("custom.proto:21: message QuantParameter has the name of amct_custom.proto:")
    assert "message QuantParameter" in first and "reserved" in first
    # quant_param = 208 is AMCT's too; it is reported in the same run so the user fixes both at once.
    assert any("quant_param = 208 clashes with amct_custom.proto" in p for p in e.value.problems[1:])


@pytest.mark.parametrize("base", ["ours", "fork"])
def test_faq_scenario2_number_clash_with_amct(base):
    if BASES[base] is None:
        pytest.skip("fork sources not on this machine")
    with pytest.raises(MergeError) as e:
        merge_protos(BASES[base], AMCT, FAQ[2])
    assert e.value.problems == [
        f"custom.proto:2: LayerParameter.quant_param = 208 clashes with amct_custom.proto:"
        f"{amct_line('= 208;')}: LayerParameter.quant_param = 208. rule: custom.proto's LayerParameter "
        "numbers must not clash with amct_custom.proto's (AMCT uses 208 and 200000 and up); give custom "
        "layers unused numbers below 5000."]


@pytest.mark.parametrize("base", ["ours", "fork"])
def test_faq_scenario3_number_clash_with_caffe_proto(base):
    text = BASES[base]
    if text is None:
        pytest.skip("fork sources not on this machine")
    with pytest.raises(MergeError) as e:
        merge_protos(text, AMCT, FAQ[3])
    assert e.value.problems == [
        f"custom.proto:2: LayerParameter.relu6_param = 206 clashes with caffe.proto:"
        f"{line_of(text, 'norm_param = 206')}: LayerParameter.norm_param = 206. rule: a LayerParameter field "
        f"number may be used once; custom.proto's numbers must not clash with caffe.proto's (custom layers: "
        f"unused numbers below 5000)."]


@pytest.mark.parametrize("base", ["ours", "fork", "fixture"])
def test_faq_scenario4_user_message_wins_with_notice(base, tmp_path):
    text = BASES[base]
    if text is None:
        pytest.skip("fork sources not on this machine")
    res = merge_protos(text, AMCT, FAQ[4])
    notice = [n for n in res.notices if "message NormalizeParameter" in n]
    assert len(notice) == 1 and "the definition in custom.proto is used" in notice[0]
    assert any("LayerParameter.norm_param = 206 is already in caffe.proto" in n for n in res.notices)
    got = _schema(protoc(tmp_path, res.text))
    assert got["NormalizeParameter"]["eps"][0] == 4 and "channel_shared" in got["NormalizeParameter"]
    assert got["LayerParameter"]["relu6_param"][0] == 1000000       # custom.proto's number wins
    assert got["LayerParameter"]["norm_param"][0] == 206
    assert check_superset(text, res.text) == []


def test_faq_scenario4_different_definition_replaces_the_base_one(tmp_path):
    custom = FAQ[4].replace("optional float eps = 4 [default = 1e-10];",
                            "optional float eps = 4 [default = 1e-6];  // the user's default")
    res = merge_protos(OURS, AMCT, custom)
    assert any(n.startswith("custom.proto:20: message NormalizeParameter replaces caffe.proto:")
               for n in res.notices)
    assert "optional float eps = 4 [default = 1e-6];  // the user's default" in res.text
    assert "[default = 1e-10]" not in res.text.split("message NormalizeParameter")[1].split("}")[0]
    protoc(tmp_path, res.text)


# ---------------------------------------------------------------------------------------------- real inputs

@needs_fork
def test_fork_plus_amct_keeps_every_fork_field(tmp_path):
    res = merge_protos(FORK, AMCT)
    before, after = _schema(protoc(tmp_path, FORK)), _schema(protoc(tmp_path, res.text))
    for msg, fields in before.items():
        assert {k: v for k, v in after[msg].items() if k in fields} == fields, msg
    numbers = {v[0] for v in after["LayerParameter"].values()}
    assert {*range(200, 208), *range(500, 508), 1000, 1111} <= numbers
    lp = after["LayerParameter"]
    assert lp["ifmr_param"][0] == 200001 and lp["quant_param"][0] == 208
    assert "LayerParameter.quant_param = 208 (amct_custom.proto)" in res.added
    assert "message ScaleOffsetRecord (amct_custom.proto)" in res.added
    assert res.text.startswith(FORK.split("message LayerParameter")[0])     # package caffe, header untouched
    assert res.notices == []


@needs_fork
def test_fork_plus_amct_plus_guide_example(tmp_path):
    res = merge_protos(FORK, AMCT, GUIDE_CUSTOM)
    after = _schema(protoc(tmp_path, res.text))
    assert after["LayerParameter"]["roi_pooling_param"][0] == 8266711
    assert after["LayerParameter"]["relu6_param"][0] == 2060
    assert set(after["ReLU6Parameter"]) == {"negative_slope", "threshold"}     # the fork's threshold is kept
    assert set(after["ROIPoolingParameter"]) == {"pooled_h", "pooled_w", "spatial_scale"}
    assert check_superset(FORK, res.text) == []
    assert "// Multiplicative spatial scale factor to translate ROI coords from their" in res.text
    assert "// merge_proto: added from custom.proto" in res.text
    assert any("relu6_param = 2060 renumbers caffe.proto:" in n for n in res.notices)
    assert merge_protos(res.text, AMCT, GUIDE_CUSTOM).text == res.text


@pytest.mark.parametrize("base", ["ours", "fixture", "fork"])
@pytest.mark.parametrize("custom", [None, "guide"])
def test_output_compiles_and_merging_again_changes_nothing(base, custom, tmp_path):
    text = BASES[base]
    if text is None:
        pytest.skip("fork sources not on this machine")
    custom_text = GUIDE_CUSTOM if custom else None
    res = merge_protos(text, AMCT, custom_text)
    fd = protoc(tmp_path, res.text)
    assert fd.package == parse(text).package
    assert check_superset(text, res.text) == []
    again = merge_protos(res.text, AMCT, custom_text)
    assert again.text == res.text and again.added == []


def test_our_caffe_proto_already_holds_the_amct_layers():
    res = merge_protos(OURS, AMCT)
    # the record messages live in scale_offset_record.proto, so only they are new
    assert res.added == ["message ActivationQuantParam (amct_custom.proto)",
                         "message SingleLayerRecord (amct_custom.proto)",
                         "message ScaleOffsetRecord (amct_custom.proto)"]
    assert res.text.startswith(OURS) and res.notices == []


# ---------------------------------------------------------------------------------------------- rules

CUSTOM_FIXTURE = """syntax = "proto2";
package mine;
message LayerParameter {
  optional MyLayerParameter my_param = 4001;  // a new layer
  optional ReLU6Parameter relu6_param = 503;
}
// My layer.
message MyLayerParameter {
  optional Mode mode = 1 [default = FAST];
  enum Mode { FAST = 0; SLOW = 1; }
}
// Only part of the base's FillerParameter: the rest must be carried over.
message FillerParameter {
  optional string type = 1 [default = 'gaussian'];
  optional float std = 10 [default = 1];
  enum VarianceNorm {
    FAN_IN = 0;
  }
  oneof source { string file2 = 20; }
}
message NetParameter {
  optional string name = 1;
  oneof source {
    string file = 8;
  }
}
enum Phase { TRAIN = 0; TEST = 1; VAL = 2; }
"""


def test_user_definitions_win_and_base_members_are_carried(tmp_path):
    res = merge_protos(FIXTURE, AMCT, CUSTOM_FIXTURE)
    got = _schema(protoc(tmp_path, res.text))
    assert got["FillerParameter"]["type"][0] == 1 and got["FillerParameter"]["std"][0] == 10
    assert {"value", "pattern", "variance_norm", "min", "max", "hex"} <= set(got["FillerParameter"])
    assert {"inline", "file", "layer", "shapes", "inner", "legacy"} <= set(got["NetParameter"])
    assert "NetParameter.Inner" in got and got["LayerParameter"]["my_param"][0] == 4001
    assert "default = 'gaussian'" in res.text and "reserved 9, 11 to 15;" in res.text
    assert "VAL = 2;" in res.text and "AVERAGE = 2;" in res.text
    assert "package caffe;" in res.text and "package mine;" not in res.text
    assert check_superset(FIXTURE, res.text) == []
    assert "message MyLayerParameter (custom.proto)" in res.added
    assert merge_protos(res.text, AMCT, CUSTOM_FIXTURE).text == res.text


@pytest.mark.parametrize("custom, expected", [
    ("message LayerParameter { repeated MyP my_param = 3000; }\nmessage MyP {}",
     "custom.proto:1: LayerParameter.my_param = 3000 is repeated. rule: custom.proto declares its layers"),
    ("message LayerParameter { optional MyP ifmr_param = 3000; }\nmessage MyP {}",
     f"custom.proto:1: LayerParameter.ifmr_param = 3000 has the name of amct_custom.proto:"
     f"{amct_line('ifmr_param = ')}: "
     "LayerParameter.ifmr_param = 200001. rule: a LayerParameter field name may be declared once"),
    ("message LayerParameter { optional MyP dq = 200000; }\nmessage MyP {}",
     f"custom.proto:1: LayerParameter.dq = 200000 clashes with amct_custom.proto:{amct_line('= 200000;')}: "
     "LayerParameter.dequant_param"),
    ("message LayerParameter { optional Missing my_param = 3000; }",
     "custom.proto:1: LayerParameter.my_param = 3000 has type Missing, which no input defines."),
    ("message LayerParameter { optional MyP relu6_param = 3000; }\nmessage MyP {}",
     "custom.proto:1: LayerParameter.relu6_param = 3000 (optional MyP) redefines caffe.proto:"),
    ("message FillerParameter { optional int32 value = 2; }",
     "custom.proto:1: FillerParameter.value = 2 (optional int32) redefines caffe.proto:"),
    ("message FillerParameter { optional float scale = 2; }",
     "custom.proto:1: FillerParameter.scale = 2 takes the number of caffe.proto:"),
    ("enum ReLU6Parameter { A = 0; }", "custom.proto:1: enum ReLU6Parameter has the name of caffe.proto:"),
    ("message A { optional int32 a = 1; optional int32 b = 1; }",
     "custom.proto:1: A.b = 1 clashes with custom.proto:1: A.a = 1 in the same file"),
    ('syntax = "proto3";\nmessage A { int32 a = 1; }', 'custom.proto: syntax = "proto3".'),
    ('syntax = "proto3";\nmessage LayerParameter { MyP my_param = 3000; }\nmessage MyP {}',
     "custom.proto:2: LayerParameter.my_param = 3000 is without a label. rule: custom.proto declares its layers"),
    ("message LayerParameter { oneof kind { MyP my_param = 3000; } }\nmessage MyP {}",
     "custom.proto:1: LayerParameter.my_param = 3000 is in oneof kind. rule: custom.proto declares its layers"),
    ("enum MyMode { TRAIN = 0; }", "custom.proto:1: enum value MyMode.TRAIN has the name of caffe.proto:60: "
     "enum value Phase.TRAIN. rule: enum values of top-level enums share one scope"),
])
def test_rule_violations_name_both_definitions(custom, expected):
    with pytest.raises(MergeError) as e:
        # FIXTURE imports a file, so only OURS lets the merge check that every type is defined
        merge_protos(OURS if "Missing" in custom else FIXTURE, AMCT, custom)
    assert any(p.startswith(expected) for p in e.value.problems), e.value.problems
    assert all("rule:" in p for p in e.value.problems)


def test_windows_line_endings_and_bom(tmp_path):
    custom = "\ufeff" + GUIDE_CUSTOM.replace("\n", "\r\n")
    res = merge_protos(OURS, AMCT, custom)
    assert "LayerParameter.roi_pooling_param = 8266711 (custom.proto)" not in res.added   # OURS has it
    assert protoc(tmp_path, res.text).package == "amct_caffe"
    assert merge_protos(res.text, AMCT, custom).text == res.text


def test_field_numbers_above_5000_only_warn():
    res = merge_protos(OURS, AMCT, "message LayerParameter { optional P p_param = 7000; }\nmessage P {}\n")
    assert res.notices[0].startswith("custom.proto:1: LayerParameter.p_param = 7000: custom layers should "
                                     "use numbers below 5000")
    assert "LayerParameter.p_param = 7000 (custom.proto)" in res.added


def test_superset_check_reports_what_is_missing():
    smaller = FIXTURE.replace("    optional float threshold = 2 [default = 6];\n", "")
    smaller = smaller.replace("   TEST = 1;\n", "")
    assert check_superset(FIXTURE, smaller) == ["caffe.proto:61: enum value Phase.TEST is missing",
                                                "caffe.proto:80: field ReLU6Parameter.threshold is missing"]
    assert check_superset(FIXTURE, FIXTURE.replace("package caffe;", "package other;")) == []


# ---------------------------------------------------------------------------------------------- command

def test_command_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--caffe_proto" in out and "--amct_proto" in out and "--custom_proto" in out and "-o OUT" in out


def test_command_merges_and_reports(tmp_path, capsys):
    (tmp_path / "caffe.proto").write_text(FIXTURE)
    (tmp_path / "custom.proto").write_text(GUIDE_CUSTOM)
    out = tmp_path / "out" / "caffe.proto"
    assert cli_main(["--caffe_proto", str(tmp_path / "caffe.proto"), "--custom_proto",
                     str(tmp_path / "custom.proto"), "-o", str(out)]) == 0
    assert out.read_text() == merge_protos(FIXTURE, AMCT, GUIDE_CUSTOM).text
    printed = capsys.readouterr().out
    assert "[INFO]Added LayerParameter.roi_pooling_param = 8266711 (custom.proto)" in printed
    assert "[WARNING]custom.proto:2: LayerParameter.relu6_param = 2060 renumbers" in printed


def test_command_error_writes_nothing(tmp_path, capsys):
    (tmp_path / "caffe.proto").write_text(OURS)
    (tmp_path / "custom.proto").write_text(FAQ[3])
    out = tmp_path / "merged.proto"
    amct = str(REPO / "proto" / "amct_custom.proto")
    assert cli_main(["--caffe_proto", str(tmp_path / "caffe.proto"), "--amct_proto", amct,
                     "--custom_proto", str(tmp_path / "custom.proto"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("[ERROR]custom.proto:2: LayerParameter.relu6_param = 206 clashes with caffe.proto:")
    assert not out.exists()


@pytest.mark.parametrize("case", ["binary", "directory", "output parent is a file", "NUL byte"])
def test_merge_proto_command_turns_os_errors_into_one_error_line(tmp_path, capsys, case):
    """UnicodeDecodeError / IsADirectoryError / FileExistsError / ValueError used to escape as tracebacks."""
    from caffe_patch.merge_proto.__main__ import main

    base = tmp_path / "caffe.proto"
    base.write_text('syntax = "proto2";\npackage caffe;\nmessage LayerParameter {\n  optional string name = 1;\n}\n')
    out = tmp_path / "merged.proto"
    expected = {"binary": "is not UTF-8 text", "directory": "is a directory", "output parent is a file":
                "cannot write", "NUL byte": "cannot read"}[case]
    if case == "binary":
        base.write_bytes(b"\xff\xfe\x00 not text")
    elif case == "directory":
        base = tmp_path
    elif case == "output parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "merged.proto"
    else:
        base = tmp_path / "ca\0ffe.proto"
    assert main(["--caffe_proto", str(base), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("[ERROR]") and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "merged.proto").exists()


@pytest.mark.parametrize("number", [0, 19000, 19999, (1 << 29)])
def test_field_numbers_protoc_refuses_are_syntax_errors(number):
    text = f'syntax = "proto2";\nmessage A {{\n  optional int32 r = {number};\n}}\n'
    with pytest.raises(ProtoSyntaxError, match=rf"^c.proto:3:\d+: field number {number} of 'r' is not allowed"):
        parse(text, "c.proto")
    parse(text.replace(f"= {number};", f"= {(1 << 29) - 1};"), "c.proto")  # the largest allowed


def test_definitions_nested_too_deeply_are_a_syntax_error_not_a_crash():
    with pytest.raises(ProtoSyntaxError, match="c.proto: definitions nested too deeply to read"):
        parse("message A { " * 3000 + "}" * 3000, "c.proto")


@pytest.mark.parametrize("closed, field", [("reserved 3000;", "optional MyP my_param = 3000;"),
                                           ("extensions 2000 to max;", "optional MyP my_param = 3000;"),
                                           ('reserved "my_param";', "optional MyP my_param = 3000;")])
def test_a_field_the_trees_layer_parameter_closes_is_refused(closed, field):
    """A LayerParameter whose reserved / extensions entries cover a field the merge adds: protoc would refuse
    the merged file, which the install used to write with its success line."""
    base = FIXTURE.replace("message LayerParameter {", f"message LayerParameter {{\n  {closed}", 1)
    assert base != FIXTURE
    with pytest.raises(MergeError) as e:
        merge_protos(base, AMCT, f"message LayerParameter {{ {field} }}\nmessage MyP {{}}")
    assert any("LayerParameter.my_param = 3000 falls under caffe.proto:" in p for p in e.value.problems), \
        e.value.problems
