"""The text protobuf's ``text_format`` prints for the values of a ``float`` field, many at once.

``text_format`` prints a float32 value ``v`` as ``str(ToShortestFloat(v))``: the first precision
from 6 significant digits on whose ``'{:.{p}g}'`` reads back as the same float32, printed as a
Python float. A record prints a line per scale_w value (15,000 for open_nsfw), and that loop, a
struct round trip per attempt, is most of the record's text. Here each precision is tried on all
the values left at once and the float32 comparison is NumPy's; the strings are the same.
"""

from __future__ import annotations

import math
from itertools import compress

import numpy as np
from google.protobuf.internal import type_checkers

# Beyond this a rounding to fewer digits may exceed float32's range, where text_format's struct.pack
# raises (NumPy would give inf): such values go through text_format's own function.
_SAFE = 3.4e38


def float_texts(values) -> list[str]:
    """``text_format``'s text of each value of a ``float`` field (``nan`` for a NaN)."""
    single = np.asarray(values, dtype=np.float32)  # a float field's values are float32 values
    doubles = single.astype(np.float64)
    texts = np.empty(single.size, dtype=object)
    plain = np.isinf(single) | (np.abs(single) <= _SAFE)  # False for NaN
    for i in np.flatnonzero(~plain).tolist():
        v = float(doubles[i])
        texts[i] = str(v) if math.isnan(v) else str(type_checkers.ToShortestFloat(v))
    todo = np.flatnonzero(plain)
    precision = 6
    while todo.size:
        rounded = list(map(float, map(f"{{:.{precision}g}}".format, doubles[todo].tolist())))
        same = np.asarray(rounded, dtype=np.float64).astype(np.float32) == single[todo]
        texts[todo[same]] = list(map(repr, compress(rounded, same.tolist())))
        todo, precision = todo[~same], precision + 1
    return texts.tolist()
