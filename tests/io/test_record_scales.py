"""A record whose scales are inf, NaN, zero or negative is refused when it is read.

protobuf's text format reads ``scale_d: nan`` or ``scale_w: -inf`` without complaint; the record
reader refuses them with a RecordError naming the file, the layer and the field.
"""

from __future__ import annotations

import pytest

import amct_caffe as amct
from amct_caffe import AmctError
from amct_caffe.io import record
from tests.test_cli import LENET, LENET_WEIGHTS


def _text(scale_w="0.5 scale_w: 0.25", scale_d="0.02", layer="conv1") -> str:
    return (f'record {{ key: "{layer}" value {{ scale_w: {scale_w} offset_w: 0 offset_w: 0 num_bits_w: 8 '
            f'record_d {{ index: 0 scale_d: {scale_d} offset_d: -128 num_bits_d: 8 }} }} }}\n'
            'record { key: "fc" value { scale_w: 0.1 record_d { index: 0 scale_d: 0.3 } } }\n')


# 1e39 overflows float32 to inf; 1e-39 (a subnormal float32) has no float32 reciprocal, which the models store, and
# 1e-50 reads as 0
BAD = ["inf", "-inf", "nan", "-nan", "infinity", "0", "-0.5", "1e39", "1e-39", "2.9e-39", "1e-50"]


@pytest.mark.parametrize("value", BAD)
def test_bad_scale_d_is_refused_naming_file_layer_and_field(value, tmp_path):
    path = tmp_path / "record.txt"
    path.write_text(_text(scale_d=value))
    with pytest.raises(record.RecordError) as e:
        record.read_record(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: layer 'conv1': record_d (index 0) scale_d is "), msg
    assert "a scale must be a finite number > 0" in msg and isinstance(e.value, AmctError)


@pytest.mark.parametrize("value", BAD)
def test_bad_scale_w_is_refused_naming_the_channel(value):
    with pytest.raises(record.RecordError, match=r"^r\.txt: layer 'conv1': scale_w\[1\] is .*finite number > 0"):
        record.parse_record_text(_text(scale_w=f"0.5 scale_w: {value}"), "r.txt")


def test_one_bad_scale_w_names_the_field_without_an_index():
    with pytest.raises(record.RecordError, match=r"layer 'conv1': scale_w is nan;"):
        record.parse_record_text(_text(scale_w="nan"), "r.txt")


def test_several_bad_scales_are_counted():
    with pytest.raises(record.RecordError, match=r"scale_w\[0\] is inf \(and 2 more bad scale\(s\)\)"):
        record.parse_record_text(_text(scale_w="inf scale_w: 0", scale_d="nan"), "r.txt")


@pytest.mark.parametrize("value, shown", [("0", "0.0"), ("-0.5", "-0.5"), ("1e39", "inf")])
def test_bad_scale_in_the_legacy_layout_is_refused_too(value, shown):
    text = f'record {{ key: "conv1" value {{ scale_w: 0.5 scale_d: {value} offset_d: -128 }} }}'
    with pytest.raises(record.RecordError, match=rf"layer 'conv1': record_d \(index 0\) scale_d is {shown};"):
        record.parse_record_text(text, "r.txt")


def test_good_scales_and_absent_ones_read():
    rec = record.parse_record_text(_text(), "r.txt")
    assert rec.layers["conv1"].scale_w == [0.5, 0.25]
    assert rec.layers["conv1"].record_d[0].scale_d == pytest.approx(0.02)
    # a weights-only record (after init, before calibration) has no scale_d yet: nothing to check
    rec = record.parse_record_text('record { key: "a" value { scale_w: 0.5 record_d { index: 0 } } }', "r.txt")
    assert rec.layers["a"].record_d[0].scale_d is None


def test_convert_model_stops_at_the_record(tmp_path):
    """The public entry point gives the same error before touching the model files."""
    path = tmp_path / "record.txt"
    path.write_text(_text(scale_d="nan"))
    with pytest.raises(record.RecordError, match=r"record\.txt: layer 'conv1': record_d \(index 0\) scale_d is nan"):
        amct.convert_model(str(LENET), str(LENET_WEIGHTS), str(path), str(tmp_path / "out/m"))
    assert not (tmp_path / "out").exists()


def test_a_damaged_first_entry_is_not_dropped_by_the_repair():
    """The repair of unbalanced braces splits the text at each 'record {': a damaged first keyword used to put
    that entry before the first chunk, where it was dropped with its layer."""
    ok = _text()
    assert set(record.parse_record_text(ok[:-2], "r.txt").layers) == {"conv1", "fc"}  # a brace lost: repaired
    for damaged in ("rec/rd {" + ok[len("record {"):-2], "rec\0rd {" + ok[len("record {"):-2]):
        with pytest.raises(record.RecordError, match=r"^r\.txt: (not a valid scale/offset record|the record holds a "
                                                     r"NUL byte)"):
            record.parse_record_text(damaged, "r.txt")


def test_a_layer_given_twice_warns_and_the_last_entry_wins(caplog):
    text = _text() + 'record { key: "fc" value { scale_w: 0.2 record_d { index: 0 scale_d: 0.6 } } }\n'
    with caplog.at_level("WARNING", logger="amct_caffe"):
        rec = record.parse_record_text(text, "r.txt")
    assert rec.layers["fc"].scale_w == [pytest.approx(0.2)] and list(rec.layers) == ["conv1", "fc"]
    assert "r.txt: layer 'fc' has more than one entry; the last one is used" in caplog.text


def test_an_input_given_twice_in_one_layer_warns_and_the_first_is_used(caplog):
    text = 'record { key: "fc" value { scale_w: 0.2 record_d { index: 0 scale_d: 0.6 } record_d { index: 0 ' \
           'scale_d: 0.9 } } }\n'
    with caplog.at_level("WARNING", logger="amct_caffe"):
        rec = record.parse_record_text(text, "r.txt")
    assert rec.layers["fc"].activation(0).scale_d == pytest.approx(0.6)
    assert "r.txt: layer 'fc' has more than one record_d of index [0]; the first one is used" in caplog.text


def test_activations_by_index_keep_the_first_of_each_index():
    entry = record.LayerRecord()
    made = [entry.activation(i, create=True) for i in range(5)]
    entry.record_d.append(record.ActivationRecord(0))  # a second entry of index 0: the first wins, as activation()
    by_index = entry.activations()
    assert by_index == {i: made[i] for i in range(5)} and by_index[0] is made[0] is entry.activation(0)


def test_the_smallest_scale_whose_reciprocal_is_a_float32_reads():
    """The bound of the reciprocal rule is exact: 2.9387e-39 has 1 / scale = 3.4028e38 in float32, below it inf."""
    import numpy as np

    smallest = np.nextafter(np.float32(1) / np.finfo(np.float32).max, np.float32(1))
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(1) / smallest) and not np.isfinite(np.float32(1) / np.nextafter(smallest,
                                                                                                     np.float32(0)))
    rec = record.parse_record_text(_text(scale_d=repr(float(smallest))), "r.txt")
    assert rec.layers["conv1"].record_d[0].scale_d == float(smallest)
