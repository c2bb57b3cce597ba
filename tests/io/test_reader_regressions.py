"""Inputs the fuzz tests (test_fuzz_readers.py) found raising something other than an AmctError.

Each is kept here with the message it now gets.
"""

import pytest

from amct_caffe.io import record


# ------------------------------------------------------------------------------------------ record
@pytest.mark.parametrize("value, message", [
    ("scale_d: 3-1", "record 'a': scale_d '3-1' is not a number"),                   # was ValueError
    ("scale_d: 1e", "record 'a': scale_d '1e' is not a number"),                      # was ValueError
    ("offset_d: 1e400", "record 'a': offset_d '1e400' is not an integer"),            # was OverflowError
    ("offset_d: 3.5", "record 'a': offset_d '3.5' is not an integer"),                # was silently 3
    ("channels: -1", "record 'a': channels '-1' is out of range"),                    # was ValueError
    ("offset_d: 99999999999", "record 'a': offset_d '99999999999' is out of range"),  # was ValueError
])
def test_legacy_activation_field_of_a_bad_value(value, message):
    with pytest.raises(record.RecordError) as e:
        record.parse_record_text(f'record {{ key: "a" value {{ scale_w: 1 {value} }} }}', "r.txt")
    assert str(e.value).startswith("r.txt: not a valid scale/offset record") and message in str(e.value)


def test_legacy_integer_field_written_as_a_float_still_reads():
    rec = record.parse_record_text('record { key: "a" value { offset_d: -128.0 channels: 3 } }', "r.txt")
    act = record.activation_entry(record.layer_entry(rec, "a"), 0)
    assert (act.offset_d, act.channels) == (-128, 3)


def test_record_file_not_utf8(tmp_path):
    path = tmp_path / "record.txt"
    path.write_bytes(b'record { key: "conv\x80" }')
    with pytest.raises(record.RecordError, match=r"record.txt: not a scale/offset record: not UTF-8 text \(byte 19"):
        record.read_record(path)  # was UnicodeDecodeError
