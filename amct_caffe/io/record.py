"""The scale/offset record file (量化因子记录文件) and the quant_param_record outputs.

The file is a ``ScaleOffsetRecord`` (proto/scale_offset_record.proto) in protobuf text format:
one ``record { key: <layer> value { scale_w.. offset_w.. shift_bit.. num_bits_w record_d {...} } }``
per quantized layer. Weight factors are per output channel (or one value); activation factors
are per input (``record_d`` with ``index``).

Protobuf stays in this module: the rest of the package works on the dataclasses :class:`Record`
(layer name -> :class:`LayerRecord`) and :class:`ActivationRecord`, parsed once per file. Their
fields carry the proto's names, and ``None`` means "not set" (proto2 presence), so a record read
and written again is the same text. Float fields hold float32 values, as the file does: an
in-memory record filled by calibration and one read back from its file are equal.

Reading is strict first. Records written by hand (and the user guide's own sample) sometimes use
the older layout with ``scale_d`` / ``offset_d`` / ``channels`` / ``height`` / ``width`` directly
in ``value``, and sometimes lose a closing brace; :func:`read_record` repairs exactly those two
defects, with a warning, and otherwise reports the parse error with file and line. Two entries
for one layer: the last wins (protobuf map semantics).
"""

from __future__ import annotations

import logging
from collections import Counter
import os
import re
from dataclasses import dataclass, field, fields

import numpy as np
from google.protobuf import text_format

from amct_caffe.errors import AmctError
from amct_caffe.io.files import atomic_output, parse_failure, read_text, refuse_binary
from amct_caffe.io.float_text import float_texts
from amct_caffe.io.schema import records

_LOG = logging.getLogger(__name__)
_LEGACY_ACTIVATION_FIELDS = ("scale_d", "offset_d", "channels", "height", "width")


class RecordError(AmctError, RuntimeError):
    """A record file is unreadable or lacks what a step needs (a RuntimeError, as the guide shows)."""


class _LegacyValueError(RecordError):
    """A legacy top-level activation field whose value is not a number of its field's type."""


def f32(value: float) -> float:
    """``value`` rounded to float32, as a proto ``float`` field stores it."""
    return float(np.float32(value))


@dataclass
class ActivationRecord:
    """One ``record_d``: the factors of input ``index`` of a layer."""

    index: int
    scale_d: float | None = None
    offset_d: int | None = None
    channels: int | None = None
    height: int | None = None
    width: int | None = None
    num_bits_d: int | None = None

    def __setattr__(self, name, value):
        # a proto float field keeps float32: store what the file would give back
        if name == "scale_d" and value is not None:
            value = f32(value)
        super().__setattr__(name, value)


@dataclass
class LayerRecord:
    """One layer's entry (``SingleLayerRecord``)."""

    scale_w: list[float] = field(default_factory=list)
    offset_w: list[int] = field(default_factory=list)
    shift_bit: list[int] = field(default_factory=list)
    skip_fusion: bool | None = None
    object_layer: str | None = None
    num_bits_w: int | None = None
    record_d: list[ActivationRecord] = field(default_factory=list)
    # recurrent layers (docs/recurrent.md): the hidden state's data factors, the recurrent weights' scales
    scale_h: float | None = None
    offset_h: int | None = None
    scale_r: list[float] = field(default_factory=list)
    offset_r: list[int] = field(default_factory=list)

    def __setattr__(self, name, value):
        if name in ("scale_w", "scale_r"):  # float32, as the file holds them
            value = [f32(v) for v in value]
        elif name == "scale_h" and value is not None:
            value = f32(value)
        super().__setattr__(name, value)

    def activation(self, index: int = 0, create: bool = False) -> ActivationRecord | None:
        """The ``record_d`` of input ``index`` (the first one of that index; a new one with ``create``), else
        None. For many indices at once, :meth:`activations` (one pass instead of one per index)."""
        for item in self.record_d:
            if item.index == index:
                return item
        if not create:
            return None
        item = ActivationRecord(index)
        self.record_d.append(item)
        return item

    def activations(self) -> dict[int, ActivationRecord]:
        """{index: the first ``record_d`` of that index}, built now (a layer of thousands of inputs, such as a
        wide Concat, would take a scan per index through :meth:`activation`)."""
        out: dict[int, ActivationRecord] = {}
        for item in self.record_d:
            out.setdefault(item.index, item)
        return out


@dataclass
class Record:
    """A whole record: layer name -> entry, in file order."""

    layers: dict[str, LayerRecord] = field(default_factory=dict)

    def layer(self, name: str, create: bool = False) -> LayerRecord | None:
        entry = self.layers.get(name)
        if entry is None and create:
            entry = self.layers[name] = LayerRecord()
        return entry

    def copy(self) -> "Record":
        return Record({k: _copy_layer(v) for k, v in self.layers.items()})


def _copy_layer(entry: LayerRecord) -> LayerRecord:
    return LayerRecord(list(entry.scale_w), list(entry.offset_w), list(entry.shift_bit), entry.skip_fusion,
                       entry.object_layer, entry.num_bits_w,
                       [ActivationRecord(**{f.name: getattr(a, f.name) for f in fields(a)}) for a in entry.record_d],
                       entry.scale_h, entry.offset_h, list(entry.scale_r), list(entry.offset_r))


def new_record() -> Record:
    return Record()


def layer_entry(record: Record, layer: str, create: bool = False) -> LayerRecord | None:
    """The entry of ``layer`` (a new one with ``create``); None if absent."""
    return record.layer(layer, create)


def activation_entry(layer_record: LayerRecord, index: int = 0, create: bool = False) -> ActivationRecord | None:
    """The ``record_d`` for input ``index`` of a layer record."""
    return layer_record.activation(index, create)


# ------------------------------------------------------------------ proto <-> dataclasses
_ACT_FIELDS = ("scale_d", "offset_d", "channels", "height", "width", "num_bits_d")
_LAYER_SCALARS = ("skip_fusion", "object_layer", "num_bits_w")
_RECURRENT_SCALARS = ("scale_h", "offset_h")
_RECURRENT_LISTS = ("scale_r", "offset_r")


def _from_message(msg, path: str = "record") -> Record:
    out = Record()
    for item in msg.record:
        v = item.value
        entry = LayerRecord(list(v.scale_w), list(v.offset_w), list(v.shift_bit),
                            *(getattr(v, n) if v.HasField(n) else None for n in _LAYER_SCALARS))
        for name in _RECURRENT_SCALARS:
            if v.HasField(name):
                setattr(entry, name, getattr(v, name))
        for name in _RECURRENT_LISTS:
            setattr(entry, name, list(getattr(v, name)))
        for d in v.record_d:
            entry.record_d.append(ActivationRecord(d.index, *(getattr(d, n) if d.HasField(n) else None
                                                              for n in _ACT_FIELDS)))
        counts = Counter(d.index for d in entry.record_d)
        if len(counts) < len(entry.record_d):  # (the first of an index is the one read: LayerRecord.activation)
            _LOG.warning("%s: layer '%s' has more than one record_d of index %s; the first one is used", path,
                         item.key, sorted(i for i, n in counts.items() if n > 1)[:8])
        if item.key in out.layers:  # a protobuf map's rule: the last value wins, at the first one's place
            _LOG.warning("%s: layer '%s' has more than one entry; the last one is used", path, item.key)
        out.layers[item.key] = entry
    return out


def to_message(record: Record):
    """The ``ScaleOffsetRecord`` message of ``record`` (unset fields stay unset)."""
    msg = records().ScaleOffsetRecord()
    for key, entry in record.layers.items():
        item = msg.record.add()
        item.key = key
        v = item.value
        v.scale_w.extend(entry.scale_w)
        v.offset_w.extend(entry.offset_w)
        v.shift_bit.extend(entry.shift_bit)
        for name in _LAYER_SCALARS:
            if getattr(entry, name) is not None:
                setattr(v, name, getattr(entry, name))
        for name in _RECURRENT_SCALARS:
            if getattr(entry, name) is not None:
                setattr(v, name, getattr(entry, name))
        for name in _RECURRENT_LISTS:
            getattr(v, name).extend(getattr(entry, name))
        for act in entry.record_d:
            d = v.record_d.add()
            d.index = act.index
            for name in _ACT_FIELDS:
                if getattr(act, name) is not None:
                    setattr(d, name, getattr(act, name))
    return msg


def record_text(record: Record) -> str:
    return message_text(to_message(record))


# The text of each layer's scale_w / offset_w lists (one line per value: most of a record's text and of
# the time text_format takes to print it), by their serialized bytes. The guide's flow prints the same
# lists again and again (weights_quantize_model, the calibration's last forward, save_model).
_WEIGHT_TEXT: dict[bytes, str] = {}
_WEIGHT_TEXT_MAX = 4096


def message_text(msg) -> str:
    """``text_format.MessageToString(msg)`` of a ScaleOffsetRecord, the same characters, printed per
    entry: ``record { key ... value { <fields 1-2> <fields 3-> } }``, since text_format prints the
    fields of a message in field-number order; fields 1-2 (scale_w, offset_w) come from a cache."""
    out = []
    for item in msg.record:
        if not item.HasField("value"):
            out.append("record {\n" + text_format.MessageToString(item, indent=2) + "}\n")
            continue
        head = type(item)()
        head.CopyFrom(item)
        head.ClearField("value")
        weights, rest = type(item.value)(), type(item.value)()
        rest.CopyFrom(item.value)
        for name in ("scale_w", "offset_w"):
            getattr(weights, name).extend(getattr(item.value, name))
            rest.ClearField(name)
        key = weights.SerializeToString()
        text = _WEIGHT_TEXT.get(key)
        if text is None:  # text_format's lines (field 1 float, field 2 int32), the floats printed together
            text = "".join([*(f"    scale_w: {t}\n" for t in float_texts(weights.scale_w)),
                            *(f"    offset_w: {v}\n" for v in weights.offset_w)])
            if len(_WEIGHT_TEXT) >= _WEIGHT_TEXT_MAX:
                _WEIGHT_TEXT.pop(next(iter(_WEIGHT_TEXT)))
            _WEIGHT_TEXT[key] = text
        out.append("record {\n" + text_format.MessageToString(head, indent=2) + "  value {\n" + text
                   + text_format.MessageToString(rest, indent=4) + "  }\n}\n")
    return "".join(out)


def record_bytes(record: Record) -> bytes:
    return to_message(record).SerializeToString()


def _split_records(text: str) -> list[str]:
    """Top-level ``record { ... }`` chunks of a record text, found by the keyword, not the braces."""
    starts = [m.start() for m in re.finditer(r"(?m)(?:^|(?<=[}\s]))record\s*\{", text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=False)]


class _Truncated(RecordError):
    """A record text that ends inside an entry (see :func:`_repair`)."""


def _balance(chunk: str) -> str:
    body = chunk.rstrip()
    depth = body.count("{") - body.count("}")
    while depth < 0 and body.endswith("}"):
        body, depth = body[:-1].rstrip(), depth + 1
    return body + " }" * max(depth, 0)


def _repair(text: str, path: str):
    """Parse a record with the legacy layout / unbalanced braces; returns the message."""
    record = records().ScaleOffsetRecord()
    chunks = _split_records(text)
    if not chunks:
        raise RecordError(f"{path}: no 'record {{ ... }}' entries found")
    if re.sub(r"(?m)#.*$", "", text[:text.find(chunks[0])]).strip():
        # a damaged first entry ("rec0rd {") would otherwise be dropped with its layer; the caller reports the
        # strict parser's error, which names the line
        raise RecordError(f"{path}: text before the first 'record {{' entry")
    last = re.sub(r"(?m)#.*$", "", chunks[-1]).rstrip()
    if last.count("{") > last.count("}") and not last.endswith("}"):
        # The guide's sample lacks a brace between two entries, and a file may lack its last closing braces,
        # which the repair restores; a file that ends inside a field or block of its last entry was cut short
        # (a copy or a write that did not finish), and closing it would read a cut number as a factor and
        # leave the layers after the cut out.
        line = text.count("\n", 0, len(text) - len(chunks[-1])) + 1
        raise _Truncated(f"{path}: the file ends inside its last entry (the 'record {{' of line {line} is not "
                         "closed): it looks cut short; write the record again (calibrate again, or copy the whole "
                         "file)")
    legacy = re.compile(r"\b(" + "|".join(_LEGACY_ACTIVATION_FIELDS) + r")\s*:\s*(-?[0-9.eE+-]+)")
    for chunk in chunks:
        chunk = _balance(chunk)
        # Move the legacy top-level activation fields into a record_d for input 0, unless a
        # record_d of the chunk already gives them (the explicit entry wins).
        value_start = chunk.find("value")
        head, rest = chunk[:value_start], chunk[value_start:]
        moved: dict[str, str] = {}
        depth, out, i = 0, [], 0
        while i < len(rest):
            ch = rest[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            m = legacy.match(rest, i) if depth == 1 else None
            if m:
                moved[m.group(1)] = m.group(2)
                i = m.end()
                continue
            out.append(ch)
            i += 1
        one = text_format.Parse(head + "".join(out), records().ScaleOffsetRecord())
        entry = one.record[0]
        if moved:
            act = next((d for d in entry.value.record_d if d.index == 0), None)
            if act is None:
                act = entry.value.record_d.add()
                act.index = 0
            for name, val in moved.items():
                if not act.HasField(name):
                    _set_legacy(act, name, val, f"record '{entry.key}'")
        record.record.add().CopyFrom(entry)
    return record


def _set_legacy(act, name: str, text: str, where: str) -> None:
    """Set a legacy top-level activation field; integer fields accept a float text of an integer (3.0)."""
    try:
        value = float(text)
    except ValueError:
        raise _LegacyValueError(f"{where}: {name} {text!r} is not a number") from None
    if name != "scale_d":
        if not value.is_integer():
            raise _LegacyValueError(f"{where}: {name} {text!r} is not an integer")
        value = int(value)
    try:
        setattr(act, name, value)
    except (ValueError, TypeError) as e:  # beyond the field's int32 / uint32 range
        raise _LegacyValueError(f"{where}: {name} {text!r} is out of range: {e}") from None


# The smallest float32 whose float32 reciprocal is finite (the Quant layers store 1 / scale_d).
_SMALLEST_SCALE = float(np.nextafter(np.float32(1) / np.finfo(np.float32).max, np.float32(1)))


def _usable_scales(values: np.ndarray) -> np.ndarray:
    """Which ``values`` are float32 scales > 0 with a finite float32 reciprocal."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scales = values.astype(np.float32)
        return np.isfinite(scales) & (scales > 0) & np.isfinite(np.float32(1) / scales)


def check_scales(record: Record, path: str) -> Record:
    """Refuse a record whose scales are not finite numbers > 0; returns it.

    A scale is a step size: the quantized value is ``round(x / scale) + offset``, and the deploy
    model stores ``deq_scale = scale_w * scale_d`` and ``1 / scale_d``. Zero, negative, inf or NaN
    (which protobuf's text format reads without complaint: ``scale_d: nan``), or a scale so small that
    its float32 reciprocal is infinite (1e-39), would give infinite or NaN codes, or flip signs, in every
    layer downstream, long after the file was read; so the file is refused when it is read, naming the
    layer and field. The offsets and shift_bit are integers,
    which cannot hold inf or NaN; their ranges depend on the bit width and are checked where used.
    """
    named = []  # (layer, field, value) of every scale, checked together (a record holds thousands of scale_w)
    for key, entry in record.layers.items():
        named += [(key, f"scale_w[{i}]" if len(entry.scale_w) > 1 else "scale_w", v)
                  for i, v in enumerate(entry.scale_w)]
        named += [(key, f"record_d (index {a.index}) scale_d", a.scale_d) for a in entry.record_d
                  if a.scale_d is not None]
        named += [(key, f"scale_r[{i}]" if len(entry.scale_r) > 1 else "scale_r", v)
                  for i, v in enumerate(entry.scale_r)]
        if entry.scale_h is not None:
            named.append((key, "scale_h", entry.scale_h))
    bad = np.flatnonzero(~_usable_scales(np.array([v for _, _, v in named], np.float64)))
    if bad.size:
        key, name, value = named[bad[0]]
        in_layer = sum(1 for i in bad if named[i][0] == key)
        more = f" (and {in_layer - 1} more bad scale(s))" if in_layer > 1 else ""
        raise RecordError(f"{path}: layer '{key}': {name} is {value!r}{more}; a scale must be a finite number "
                          f"> 0 whose reciprocal is a float32 too (>= {_SMALLEST_SCALE:.3g}; the models store "
                          "1 / scale): recalibrate the model, or correct the record")
    return record


def parse_record_text(text: str, path: str = "<record>") -> Record:
    """The record of a text (``path`` names it in messages); its scales are checked (:func:`check_scales`)."""
    message = records().ScaleOffsetRecord()
    refuse_binary(text, path, "record", RecordError)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as strict_error:
        strict = parse_failure(strict_error)
        try:
            repaired = _repair(text, path)
        except _LegacyValueError as e:
            raise RecordError(f"{path}: not a valid scale/offset record: {strict}; read in "
                              f"the legacy layout: {e}") from None
        except _Truncated as e:
            raise RecordError(str(e)) from None
        except (text_format.ParseError, RecordError):
            raise RecordError(f"{path}: not a valid scale/offset record: {strict}") from None
        _LOG.warning("%s: record uses the legacy layout or has unbalanced braces; read it as %d layer "
                     "record(s) after repair (%s)", path, len(repaired.record), strict)
        message = repaired
    return check_scales(_from_message(message, path), path)


# The texts this process wrote last, by absolute path: (text, the message serialized). The guide's flow
# writes the record and reads it back in the same process (init, the calibration layers, save_model);
# text_format's parser is pure Python (about 0.5 s for open_nsfw's record), and a text equal to one
# we printed parses to the message we printed, so that message is read back from its binary form.
_WRITTEN: dict[str, tuple[str, bytes]] = {}
_WRITTEN_MAX = 8


def read_record(path) -> Record:
    text = read_text(path, "record", RecordError)
    written = _WRITTEN.get(os.path.abspath(path))
    if written is not None and written[0] == text:
        return check_scales(_from_message(records().ScaleOffsetRecord.FromString(written[1])), str(path))
    return parse_record_text(text, str(path))


def record_file(record: Record) -> tuple[str, bytes]:
    """(text, the message serialized) of ``record``: what :func:`write_record` writes and remembers,
    printed ahead of the write (while another file is written)."""
    message = to_message(record)
    return message_text(message), message.SerializeToString()


def write_record(record: Record | tuple[str, bytes], path) -> None:
    """Write the record (or its :func:`record_file`) as text, atomically."""
    text, serialized = record_file(record) if isinstance(record, Record) else record
    with atomic_output(path, "w") as f:
        f.write(text)
    remember_written(path, (text, serialized))


def remember_written(path, printed: tuple[str, bytes]) -> None:
    """Note that ``path`` now holds the text of ``printed`` (a :func:`record_file`), which :func:`read_record`
    then reads back from its binary form."""
    text, serialized = printed
    key = os.path.abspath(path)
    _WRITTEN.pop(key, None)
    while len(_WRITTEN) >= _WRITTEN_MAX:
        _WRITTEN.pop(next(iter(_WRITTEN)))
    _WRITTEN[key] = (text, serialized)
