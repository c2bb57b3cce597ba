"""Inputs the fuzz tests (test_fuzz_readers.py) found raising something other than an AmctError.

Each is kept here with the message it now gets.
"""

import pytest

from amct_caffe import ModelFormatError, io
from amct_caffe.io import record
from amct_caffe.runtime import TEST, Net


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
    with pytest.raises(record.RecordError, match=r"record file .*record.txt is not UTF-8 text \(byte 19"):
        record.read_record(path)  # was UnicodeDecodeError


# ------------------------------------------------------------------------------------------ V0 upgrade
_V0_HEAD = 'name: "v0"\ninput: "data"\ninput_dim: 1 input_dim: 1 input_dim: 8 input_dim: 8\n'


def _v0(text):
    return io.parse_prototxt_text(_V0_HEAD + text, "v0.prototxt")


def test_v0_net_of_only_a_padding_layer_upgrades():
    net = _v0('layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "pad" }')
    io.upgrade_net(net, "v0.prototxt")  # was IndexError
    assert [layer.type for layer in net.layer] == ["Input"]


@pytest.mark.parametrize("connections", ['top: "pad"', 'bottom: "data"', 'bottom: "data" bottom: "x" top: "pad"'])
def test_v0_padding_layer_needs_one_bottom_and_one_top(connections):
    net = _v0(f'layers {{ layer {{ name: "pad" type: "padding" pad: 1 }} {connections} }}')
    with pytest.raises(ModelFormatError, match="v0.prototxt: V0 padding layer 'pad' has"):
        io.upgrade_net(net, "v0.prototxt")  # was IndexError for a missing bottom or top


def test_v0_padding_read_by_a_layer_other_than_conv_or_pool_is_refused():
    net = _v0('layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "pad" }\n'
              'layers { layer { name: "relu" type: "relu" } bottom: "pad" top: "relu" }')
    with pytest.raises(ModelFormatError, match="'relu' .* reads the output of a padding layer"):
        io.upgrade_net(net, "v0.prototxt")


def test_v0_padding_folds_into_a_pool_as_in_caffe():
    net = _v0('layers { layer { name: "pad" type: "padding" pad: 2 } bottom: "data" top: "pad" }\n'
              'layers { layer { name: "pool" type: "pool" pool: MAX kernelsize: 3 stride: 1 } bottom: "pad" '
              'top: "pool" }')
    io.upgrade_net(net, "v0.prototxt")
    pool = net.layer[-1]
    assert list(pool.bottom) == ["data"] and pool.pooling_param.pad == 2  # was 0: the padding was lost


# ------------------------------------------------------------------------------------------ prototxt
def test_prototxt_text_with_a_lone_surrogate():
    text = 'layer { name: "pool1" type: "Pooling"\npooling_param { pool:\udc80 MAX } }'
    with pytest.raises(ModelFormatError, match=r"p.prototxt: cannot parse prototxt \(in or after layer 'pool1'\): "
                                               r"line 2 holds '\\udc80', which is not valid Unicode text"):
        io.parse_prototxt_text(text, "p.prototxt")  # was SystemError from protobuf's enum lookup


@pytest.mark.parametrize("text, where", [
    ('name: "LeNet"\nlayer { name: "data" type: "Input" top: "data" }\nbad', " (in or after layer 'data')"),
    ('name: "LeNet"\nbad\nlayer { name: "data" type: "Input" top: "data" }', ""),  # the net's name is no layer's
    ('layer { name: "ip" type: "InnerProduct" param { name: "shared_w" }\nbad }', " (in or after layer 'ip')"),
    ('layer { param { name: "shared_w" } name: "ip" type: "InnerProduct"\nbad }', " (in or after layer 'ip')"),
])
def test_a_parse_error_names_the_layer_it_is_in(text, where):
    with pytest.raises(ModelFormatError) as err:
        io.parse_prototxt_text(text, "p.prototxt")
    assert str(err.value).startswith(f"p.prototxt: cannot parse prototxt{where}:")


def test_prototxt_lacking_a_required_field_names_the_layer_and_fields(tmp_path):
    # The tool's IFMR parameters are required fields: Caffe's parser refuses a text without them. Ours
    # parsed it and then failed inside protobuf (EncodeError) the first time the message was serialized.
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
            'layer { name: "conv_ifmr" type: "IFMR" bottom: "data" ifmr_param { batch_num: 1 record_file_path: "r" '
            'object_layer: "conv" search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 } }\n')
    with pytest.raises(ModelFormatError, match=r"m.prototxt: required field\(s\) missing: layer 'conv_ifmr' \(IFMR\) "
                                               r"lacks ifmr_param.max_percentile, ifmr_param.min_percentile\."):
        io.parse_prototxt_text(text, "m.prototxt")
    path = tmp_path / "m.prototxt"
    path.write_text(text)
    with pytest.raises(ModelFormatError, match="lacks ifmr_param.max_percentile"):
        Net(str(path), TEST)


def test_a_prototxt_name_that_is_not_utf8_is_refused_not_renamed(tmp_path):
    """Undecodable bytes are allowed in comments (replaced), but in a layer name they would come out as U+FFFD
    in every saved model, no longer matching the weights or the record."""
    from amct_caffe.io.files import read_prototxt

    body = b'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
    (tmp_path / "comment.prototxt").write_bytes(b"# caf\xe9 (Latin-1)\n" + body)
    assert [lp.name for lp in read_prototxt(tmp_path / "comment.prototxt").layer] == ["data"]
    (tmp_path / "name.prototxt").write_bytes(body.replace(b'name: "data"', b'name: "d\xffta"'))
    with pytest.raises(ModelFormatError, match=r"name.prototxt: layer #0 \(counting from 0\): its name 'd\ufffdta' "
                                              r"holds bytes that are not UTF-8 text"):
        read_prototxt(tmp_path / "name.prototxt")


@pytest.mark.parametrize("body, message", [
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
     'convolution_param { num_output: 4 kernel_size: 1 group: 0 } }',
     "layer 'c' (Convolution): convolution_param.group must be > 0, got 0"),
    ('layer { name: "in2" type: "Input" top: "a" top: "b" input_param { } }',
     "layer 'in2' (Input): input_param must give 1 shape or one per top (2), it gives 0"),
])
def test_messages_for_a_zero_group_and_missing_input_shapes(tmp_path, body, message):
    from amct_caffe import AmctError

    proto = tmp_path / "m.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" '
                     'input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n' + body)
    with pytest.raises(AmctError) as e:
        Net(str(proto), TEST)
    assert message in str(e.value)


def test_a_replacement_character_written_as_utf8_is_a_name_like_any_other(tmp_path):
    from amct_caffe.io.files import read_prototxt

    proto = tmp_path / "m.prototxt"
    proto.write_text('layer { name: "d\ufffdta" type: "Input" top: "data" input_param { shape { dim: 1 } } }\n',
                     encoding="utf-8")
    assert [lp.name for lp in read_prototxt(proto).layer] == ["d\ufffdta"]


def test_a_byte_order_mark_is_named(tmp_path):
    from amct_caffe.config import read_quant_config
    from amct_caffe.errors import ConfigError
    proto, config = tmp_path / "m.prototxt", tmp_path / "c.json"
    proto.write_bytes(b'\xef\xbb\xbfname: "LeNet"\n')
    config.write_bytes(b'\xef\xbb\xbf{"version": 1}')
    with pytest.raises(ModelFormatError, match=r"prototxt file .*m.prototxt starts with a UTF-8 byte-order mark "
                                               r"\(BOM\), which Caffe's parser refuses too: save it as UTF-8 without"):
        io.read_prototxt(proto)
    with pytest.raises(ConfigError, match=r"c.json starts with a UTF-8 byte-order mark"):
        read_quant_config(config)


def test_a_solver_given_as_the_net_is_named_and_custom_layers_are_not_blamed(tmp_path):
    text = 'net: "lenet_train_test.prototxt"\nbase_lr: 0.01\nmax_iter: 100\n'
    with pytest.raises(ModelFormatError) as err:
        io.parse_prototxt_text(text, "solver.prototxt")
    assert "It looks like a solver prototxt" in str(err.value) and "custom layer" not in str(err.value)
    with pytest.raises(ModelFormatError) as err:  # an unknown field inside a layer keeps the custom-layer advice
        io.parse_prototxt_text('layer { name: "x" type: "Foo" foo_param { a: 1 } }', "m.prototxt")
    assert "If this is a custom layer" in str(err.value)


# ------------------------------------------------------------------------------------------ huge or binary text
def test_a_text_file_of_nul_bytes_is_refused_at_once(tmp_path):
    """A zero-filled file (a download cut off and padded): the text parser quoted all of it in its message
    (a 30 MB file took 16 s, 2.5 GB and printed a 126 MB line); each text reader now refuses a NUL byte first."""
    import amct_caffe as amct
    from tests.test_cli import LENET, LENET_WEIGHTS

    path = tmp_path / "zeros.prototxt"
    path.write_bytes(b'name: "x"\n' + b"\0" * 100_000)
    with pytest.raises(ModelFormatError, match=r"zeros.prototxt: the prototxt holds a NUL byte \(line 2\): it is "
                                               "binary, not text"):
        io.load_prototxt(path)
    with pytest.raises(record.RecordError, match="the record holds a NUL byte") as e:
        record.parse_record_text('record { key: "a" }\0', "r.txt")
    assert "caffemodel" not in str(e.value)  # the weights-file hint is the prototxt's only
    cfg = tmp_path / "quant.cfg"
    cfg.write_bytes(b"batch_num: 2\n\0\0")
    with pytest.raises(amct.AmctError, match=r"quant.cfg: the simple config holds a NUL byte \(line 2\)"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(LENET), str(LENET_WEIGHTS), config_defination=str(cfg))


@pytest.mark.parametrize("what", ["prototxt", "record", "cfg"])
def test_a_parse_error_on_a_huge_line_quotes_only_its_start(tmp_path, what):
    import amct_caffe as amct
    from amct_caffe.config.checks import parse_text_message
    from amct_caffe.io.schema import caffe_pb

    junk = "x" * 1_000_000
    with pytest.raises(amct.AmctError) as e:
        if what == "prototxt":
            io.parse_prototxt_text(f'name: "x" layer {{ {junk} }}', "m.prototxt")
        elif what == "record":
            record.parse_record_text(f'record {{ key: "a" value {{ {junk} }} }}', "r.txt")
        else:
            path = tmp_path / "quant.cfg"
            path.write_text(f'name: "x" {junk}\n')
            parse_text_message(path, caffe_pb().NetParameter(), "simple config")
    assert len(str(e.value)) < 1000 and "characters in all)" in str(e.value), str(e.value)[:2000]
