"""float_texts prints float values as text_format does, and so the record's text is text_format's."""

import math

import numpy as np
from google.protobuf import text_format
from google.protobuf.internal import type_checkers

from amct_caffe.io import record as R
from amct_caffe.io.float_text import float_texts

SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 3.4028234663852886e38, -3.4028234663852886e38, 1e-45,
           1.1754944e-38, 0.1, 0.9, 1.0, 1234567.0, 1e16, 1e-5, 1e-4, 123456789.0, 3.4e38, 3.40001e38]


def _text_format(v: float) -> str:
    return str(v) if math.isnan(v) else str(type_checkers.ToShortestFloat(v))


def test_every_kind_of_float32_prints_as_text_format_prints_it():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)  # subnormals, NaNs, huge ones
    values = np.concatenate([bits.view(np.float32), np.asarray(SPECIAL, np.float32),
                             (rng.standard_normal(20_000) * 0.01).astype(np.float32)]).tolist()
    assert float_texts(values) == [_text_format(v) for v in values]
    assert float_texts([]) == []


def test_a_record_prints_as_text_format_prints_it():
    msg = R.records().ScaleOffsetRecord()
    for i, values in enumerate((np.asarray(SPECIAL, np.float32).tolist(), [0.5], [])):
        item = msg.record.add()
        item.key = f"layer{i}"
        item.value.scale_w.extend(values)
        item.value.offset_w.extend(range(len(values)))
        item.value.record_d.add().scale_d = 0.25
    R._WEIGHT_TEXT.clear()
    assert R.message_text(msg) == text_format.MessageToString(msg)
