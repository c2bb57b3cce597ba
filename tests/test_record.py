"""The scale/offset record: strict text round trip, and the guide's hand-written sample."""

import pytest

from amct_caffe.io import record
from tests.golden import SHARED

GUIDE = SHARED / "spec/amct_caffe_user_guide.md"


def _guide_sample() -> str:
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("record {"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start:end])


def test_round_trip(tmp_path):
    rec = record.new_record()
    conv = record.layer_entry(rec, "conv1", create=True)
    conv.scale_w.extend([0.5, 0.25])
    conv.offset_w.extend([0, 0])
    act = record.activation_entry(conv, 0, create=True)
    act.scale_d, act.offset_d, act.num_bits_d = 0.0123, -128, 8
    path = tmp_path / "r.txt"
    record.write_record(rec, path)
    back = record.read_record(path)
    assert back == rec
    assert record.activation_entry(record.layer_entry(back, "conv1"), 0).offset_d == -128
    assert record.layer_entry(back, "nope") is None


def test_a_record_read_back_as_written_is_the_parsed_record(tmp_path):
    """read_record takes a text this process wrote from its message, not through the text parser:
    the result must be the parser's, and an edited file must be parsed again."""
    rec = record.new_record()
    for i in range(3):
        layer = record.layer_entry(rec, f"conv{i}", create=True)
        layer.scale_w.extend([0.1 / (i + 1), 3e-7, 12345.678])
        layer.offset_w.extend([0, 0, 0])
        act = record.activation_entry(layer, 0, create=True)
        act.scale_d, act.offset_d = 0.0123 * (i + 1), -7
    path = tmp_path / "r.txt"
    record.write_record(rec, path)
    cached = record.read_record(path)
    assert cached == record.parse_record_text(path.read_text(), str(path))
    path.write_text(path.read_text().replace("-7", "-9", 1))
    edited = record.read_record(path)
    assert record.activation_entry(record.layer_entry(edited, "conv0"), 0).offset_d == -9


def test_last_entry_wins_like_protobuf_maps():
    rec = record.parse_record_text('record { key: "a" value { scale_w: 1 } } record { key: "a" value { scale_w: 2 } }')
    assert list(record.layer_entry(rec, "a").scale_w) == [2]


@pytest.mark.skipif(not GUIDE.exists(), reason="../shared/spec not beside the repository")
def test_guide_sample_record_is_read_with_repairs(caplog):
    rec = record.parse_record_text(_guide_sample(), "guide")
    assert list(rec.layers) == ["conv1", "pool1", "fc1000"]
    conv = record.layer_entry(rec, "conv1")
    assert list(conv.scale_w) == pytest.approx([0.43213, 0.78163, 1.03213])
    assert list(conv.shift_bit) == [1, 1, 1]
    # the explicit record_d wins over the legacy top-level scale_d / offset_d
    act = record.activation_entry(conv, 0)
    assert act.scale_d == pytest.approx(1.554879) and act.offset_d == -49
    fc = record.layer_entry(rec, "fc1000")
    assert record.activation_entry(fc, 0).offset_d == -128 and list(fc.shift_bit) == [2]
    assert "legacy layout" in caplog.text


def test_legacy_top_level_activation_fields_move_into_record_d():
    rec = record.parse_record_text('record { key: "c" value { scale_d: 0.5 offset_d: 3 scale_w: 0.1 '
                                   'channels: 16 height: 8 width: 8 } }')
    act = record.activation_entry(record.layer_entry(rec, "c"), 0)
    assert (act.scale_d, act.offset_d, act.channels, act.height, act.width) == (0.5, 3, 16, 8, 8)


def test_garbage_is_rejected_with_the_file_name(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("record { key: 'a' value { scale_w: oops } }")
    with pytest.raises(record.RecordError, match="bad.txt"):
        record.read_record(bad)
    with pytest.raises(record.RecordError, match="does not exist"):
        record.read_record(tmp_path / "missing.txt")


def test_builder_rejects_out_of_range_bits_naming_the_layer():
    from amct_caffe.passes.quantized_models import QuantTarget, activation_factors, weight_factors

    target = QuantTarget("conv1", (0,), True, "Convolution")
    rec = record.parse_record_text('record { key: "conv1" value { scale_w: 0.5 num_bits_w: 4 '
                                   'record_d { scale_d: 0.1 offset_d: 0 index: 0 num_bits_d: 17 } } }')
    with pytest.raises(record.RecordError, match="'conv1': num_bits_d 17 is out of range"):
        activation_factors(rec, target)
    with pytest.raises(record.RecordError, match="'conv1': num_bits_w 4 is not supported"):
        weight_factors(rec, target, 1)


def test_record_text_is_text_formats():
    """message_text prints per entry, weights from a cache: the characters of MessageToString."""
    from google.protobuf import text_format
    rec = record.new_record()
    conv = record.layer_entry(rec, 'a "quoted"\\name', create=True)
    conv.scale_w.extend([0.1, 1e-30, 3.0e38, 1.0])
    conv.offset_w.extend([0, 0, 0, 0])
    conv.shift_bit.extend([3, 4, 5, 6])
    record.activation_entry(conv, 1, create=True).scale_d = 0.5
    lstm = record.layer_entry(rec, "lstm", create=True)
    lstm.scale_h, lstm.offset_h = 0.25, -3
    record.layer_entry(rec, "empty", create=True)
    msg = record.to_message(rec)
    msg.record.add().key = "no value"
    for _ in range(2):  # printed, then from the cache
        assert record.message_text(msg) == text_format.MessageToString(msg)


VALID_RECORD = '''record {
  key: "conv1"
  value {
    scale_w: 0.00390625
    offset_w: 0
    record_d {
      scale_d: 0.00390625
      offset_d: -128
      index: 0
      num_bits_d: 8
    }
  }
}
record {
  key: "conv2"
  value {
    scale_w: 0.0078125
    offset_w: 0
    record_d {
      scale_d: 0.125
      offset_d: -3
      index: 0
      num_bits_d: 8
    }
  }
}
'''


def test_a_record_cut_short_is_refused_not_repaired():
    """A record cut inside its last entry was closed by the brace repair (meant for the guide's sample) and read:
    a cut 'scale_d: 0.0039' became a factor, and convert wrote a deploy model from it with exit 0."""
    assert list(record.parse_record_text(VALID_RECORD).layers) == ["conv1", "conv2"]
    last = VALID_RECORD.index('record {\n  key: "conv2"')
    ends = [i + 1 for i, c in enumerate(VALID_RECORD) if c == "\n" and last < i < len(VALID_RECORD) - 3]
    cuts = [VALID_RECORD.index("0.125") + 3] + ends
    for cut in cuts:
        if VALID_RECORD[:cut].rstrip().endswith("}"):  # only closing braces lost: the entry is whole, and repaired
            assert record.parse_record_text(VALID_RECORD[:cut], "cut.txt").layers["conv2"].scale_w == [0.0078125]
            continue
        with pytest.raises(record.RecordError, match=r"cut.txt: the file ends inside its last entry \(the "
                                                     r"'record \{' of line 14 is not closed\): it looks cut short"):
            record.parse_record_text(VALID_RECORD[:cut], "cut.txt")
