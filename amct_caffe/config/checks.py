"""Value checks shared by the JSON config and the simple .cfg, with the guide's ranges.

Every failure raises :class:`~amct_caffe.errors.ConfigError` whose message starts with where the
value was found (file, layer, field path) and ends with the allowed range written as in the
guide's tables, e.g. ``layer 'conv1': activation_quant_params.max_percentile 1.5 is out of
range (0.5, 1.0]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from amct_caffe.errors import ConfigError
from amct_caffe.io.files import parse_failure, read_text, refuse_binary


_SHOW_CHARS = 120


def show(value) -> str:
    """A value as the user wrote it in JSON (true, "text", [0.7, 1.3], 1e-10), cut after _SHOW_CHARS characters."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except (ValueError, RecursionError):  # an int of more digits than Python prints, a deep nest
            text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "..."


def fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}" if where else message)


def unique(where: str, field: str, names) -> None:
    """A ConfigError naming ``field`` if a name of its list ``names`` is given twice."""
    seen = set()
    for name in names:
        if name in seen:
            raise fail(where, f"{field}: '{name}' is listed twice")
        seen.add(name)


@dataclass(frozen=True)
class Interval:
    """A numeric range; ``text`` is how the guide writes it."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    text: str

    def __contains__(self, v) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below


# The guide's tables (量化配置 > 参数配置说明; SNQuantize rows of the .cfg table).
PERCENTILE = Interval(0.5, 1.0, True, False, "(0.5, 1.0]")
ACT_NUM_BITS = Interval(8, 16, False, False, "[8, 16]")
MAX_ITERATION = Interval(500, 2000, False, False, "[500, 2000]")
MIN_DISTANCE = Interval(1e-10, 1e-3, False, False, "[1e-10, 1e-3]")
BN_FRACTION = Interval(0.0, 1.0, True, True, "(0, 1.0)")
BN_ITERATIONS = Interval(0, 1000, True, True, "(0, 1000)")
POSITIVE = Interval(0, math.inf, True, True, "(0, +inf)")
BATCH_NUM = Interval(0, math.inf, True, True, "(0, +inf): an integer greater than 0")

# Limits of the proto fields the values end up in (the calibration layers' ifmr_param, the .cfg).
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
# IFMR tries every ratio of search_range, search_step apart, over all the calibration data; the
# guide's default makes 61. More than this many is a mistake (a step of 1e-9...) that would run out
# of memory or time.
MAX_SEARCH_CANDIDATES = 100_000

VERSIONS = (1,)
WTS_ALGOS = ("arq_quantize", "snq_quantize")
# Table 26 lists "uniform" and "gaussian"; the SNQuantize row of the .cfg table also lists
# "d2sampling" (kmeans++), which the SNQ kernel implements, so all three are accepted.
INIT_ALGOS = ("uniform", "gaussian", "d2sampling")
ARQ_NUM_BITS = 8  # table 23: uniform weight quantization is 8 bit only
SNQ_NUM_BITS = 4  # table 23: non-uniform weight quantization is 4 bit only


def in_range(where: str, field: str, value, interval: Interval) -> None:
    """``value`` in ``interval``; a float must be so as the float32 its proto field stores too."""
    if value not in interval:
        raise fail(where, f"{field} {show(value)} is out of range {interval.text}")
    if isinstance(value, float) and shortest_float(value) not in interval:
        raise fail(where, f"{field} {show(value)} is out of range {interval.text} once stored as a float32 "
                          f"({show(shortest_float(value))})")


def check_uint32(where: str, field: str, value: int) -> None:
    """An integer that a uint32 proto field must hold (the calibration layers' batch_num)."""
    if value > UINT32_MAX:
        raise fail(where, f"{field} {show(value)} is too large: at most {UINT32_MAX}")


def one_of(where: str, field: str, value, allowed) -> None:
    if value not in allowed:
        raise fail(where, f"{field} {show(value)} is not one of: {', '.join(show(a) for a in allowed)}")


def search_step_fits(step: float, width: float) -> bool:
    """search_step in (0, width], at float32 precision so that 0.6 == 1.3 - 0.7 still fits.

    (amct_caffe.quant.ifmr.IfmrParams applies the same rule to the values it receives.)
    """
    return 0 < step <= width or (step > 0 and np.float32(step) <= np.float32(width))


def search_candidates(start: float, end: float, step: float) -> int:
    """How many ratios IFMR tries (amct_caffe.quant.ifmr.ifmr_ratios)."""
    return int(math.floor((end - start) / step + 1e-6)) + 1


def check_search(where: str, prefix: str, start: float, end: float, step: float) -> None:
    """Tables 17-18: 0 < search_range_start < search_range_end; search_step in (0, end - start].

    The values must hold as the float32s the calibration layer stores (finite, start still below
    end), and give at most MAX_SEARCH_CANDIDATES ratios to try.
    """
    for name, value in (("search_range", [start, end]), ("search_step", step)):
        if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in np.atleast_1d(value)):
            raise fail(where, f"{prefix}{name} {show(value)} is out of range: it must be finite (a float32, "
                              f"at most {FLOAT32_MAX:.7g})")
    if not (0 < start < end):
        raise fail(where, f"{prefix}search_range {show([start, end])} is out of range: "
                          "0 < search_range_start < search_range_end is required")
    width = end - start
    if not search_step_fits(step, width):
        raise fail(where, f"{prefix}search_step {show(step)} is out of range "
                          f"(0, search_range_end - search_range_start] = (0, {show(round(width, 9))}]")
    start32, end32, step32 = (shortest_float(v) for v in (start, end, step))
    if not (0 < start32 < end32):
        raise fail(where, f"{prefix}search_range {show([start, end])} is out of range once stored as float32s "
                          f"({show([start32, end32])}): 0 < search_range_start < search_range_end is required")
    if not search_step_fits(step32, end32 - start32):
        raise fail(where, f"{prefix}search_step {show(step)} is out of range once stored as a float32 "
                          f"({show(step32)}): (0, search_range_end - search_range_start] is required")
    n = search_candidates(start32, end32, step32)
    if n > MAX_SEARCH_CANDIDATES:
        raise fail(where, f"{prefix}search_step {show(step)} is too small for search_range {show([start, end])}: "
                          f"it makes {n} ratios to try, at most {MAX_SEARCH_CANDIDATES} are allowed (the default "
                          "[0.7, 1.3] with 0.01 makes 61)")


def shortest_float(value: float) -> float:
    """A float32 proto value as the shortest decimal that reads back to it (0.7f -> 0.7, not 0.699999988).

    The guide warns that .cfg values and the generated JSON "do not match exactly"; this keeps
    them equal to what the user typed, and keeps 1e-3f inside [1e-10, 1e-3].
    """
    with np.errstate(over="ignore"):  # beyond float32's range: inf, which every range check refuses
        return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


# ------------------------------------------------------------------------------------- JSON types
_TYPE_TEXT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def get_typed(d: dict, key: str, kind: type, where: str, default):
    """``d[key]`` checked to be a JSON ``kind`` (bool is not an integer, an integer is a number)."""
    if key not in d:
        return default
    value = d[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return to_float(value, key, where)
    if not ok:
        raise fail(where, f"{key} must be {_TYPE_TEXT[kind]}, got {show(value)}")
    return value


def to_float(value: int | float, field: str, where: str) -> float:
    """A JSON number as a float; an integer too large for one is an error, not an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        raise fail(where, f"{field} {show(value)} is out of range: too large for a number") from None


def reject_unknown(d: dict, allowed, where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise fail(where, f"unknown field(s) {', '.join(repr(k) for k in unknown)}; "
                          f"allowed: {', '.join(allowed)}")


def parse_text_message(path, msg, what: str):
    """Parse the protobuf text file ``path`` into ``msg``; errors name the file, line and column.

    ``what`` names the file's kind in messages ("simple config", "retrain simple config").
    """
    path = Path(path)
    text = read_text(path, what, ConfigError)
    refuse_binary(text, path, what, ConfigError)
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        at = f"{path}:{line}:{col}" if line is not None else str(path)
        detail = parse_failure(e)
        if line is not None and detail.startswith(f"{line}:{col} : "):
            detail = detail[len(f"{line}:{col} : "):]
        raise ConfigError(f"{at}: cannot parse {what}: {detail}") from None
    return msg


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def _check_unicode(data, where: str) -> None:
    """Refuse strings with a lone surrogate (JSON's "\\ud800"): no layer or path is named so, and no
    file can hold them as UTF-8. Walked without recursion: the JSON may nest as deep as the parser allows."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise fail(where, f"{ascii(item)[:60]} is not valid Unicode text (a lone surrogate "
                                  "\\uXXXX escape)") from None


def load_config_json(text: str, where: str, what: str):
    """The JSON value of a config file's ``text``: a key given twice, a lone surrogate, nesting too deep
    or a number too long to read are ConfigErrors naming ``where`` (``what``: "config", "retrain config")."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise fail(where, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except _DuplicateKey as e:
        unique = " (layer names must be unique)" if "config" in what else ""
        raise fail(where, f"key '{e.args[0]}' appears twice{unique}") from None
    except RecursionError:
        raise fail(where, f"not valid JSON for a {what}: arrays or objects nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise fail(where, f"not valid JSON for a {what}: a number has too many digits to be read") from None
    _check_unicode(data, where)
    return data
