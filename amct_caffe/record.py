"""The scale/offset record file (量化因子记录文件) and the quant_param_record outputs.

The record is a ``ScaleOffsetRecord`` (proto/scale_offset_record.proto) in protobuf text format:
one ``record { key: <layer> value { scale_w.. offset_w.. shift_bit.. num_bits_w record_d {...} } }``
per quantized layer. Weight factors are per output channel (or one value); activation factors
are per input (``record_d`` with ``index``).

Reading is strict first. Records written by hand (and the user guide's own sample) sometimes use
the older layout with ``scale_d`` / ``offset_d`` / ``channels`` / ``height`` / ``width`` directly
in ``value``, and sometimes lose a closing brace; :func:`read_record` repairs exactly those two
defects, with a warning, and otherwise reports the parse error with file and line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from google.protobuf import text_format

from amct_caffe.errors import AmctError
from amct_caffe.io.files import atomic_output
from amct_caffe.io.schema import records

_LOG = logging.getLogger(__name__)
_LEGACY_ACTIVATION_FIELDS = ("scale_d", "offset_d", "channels", "height", "width")


class RecordError(AmctError, RuntimeError):
    """A record file is unreadable or lacks what a step needs (a RuntimeError, as the guide shows)."""


def new_record():
    return records().ScaleOffsetRecord()


def layer_entry(record, layer: str, create: bool = False):
    """The SingleLayerRecord of ``layer`` (last one wins, as protobuf's map semantics); None if absent."""
    found = None
    for entry in record.record:
        if entry.key == layer:
            found = entry.value
    if found is None and create:
        entry = record.record.add()
        entry.key = layer
        found = entry.value
    return found


def activation_entry(layer_record, index: int = 0, create: bool = False):
    """The ``record_d`` for input ``index`` of a layer record."""
    for item in layer_record.record_d:
        if item.index == index:
            return item
    if not create:
        return None
    item = layer_record.record_d.add()
    item.index = index
    return item


def _split_records(text: str) -> list[str]:
    """Top-level ``record { ... }`` chunks of a record text, found by the keyword, not the braces."""
    starts = [m.start() for m in re.finditer(r"(?m)(?:^|(?<=[}\s]))record\s*\{", text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=False)]


def _balance(chunk: str) -> str:
    body = chunk.rstrip()
    depth = body.count("{") - body.count("}")
    while depth < 0 and body.endswith("}"):
        body, depth = body[:-1].rstrip(), depth + 1
    return body + " }" * max(depth, 0)


def _repair(text: str, path: str):
    """Parse a record with the legacy layout / unbalanced braces; returns the message."""
    record = new_record()
    chunks = _split_records(text)
    if not chunks:
        raise RecordError(f"{path}: no 'record {{ ... }}' entries found")
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
            act = activation_entry(entry.value, 0, create=True)
            for name, val in moved.items():
                if not act.HasField(name):
                    setattr(act, name, float(val) if name == "scale_d" else int(float(val)))
        record.record.add().CopyFrom(entry)
    return record


def parse_record_text(text: str, path: str = "<record>"):
    record = new_record()
    try:
        text_format.Parse(text, record)
        return record
    except text_format.ParseError as strict_error:
        try:
            repaired = _repair(text, path)
        except (text_format.ParseError, RecordError):
            raise RecordError(f"{path}: not a valid scale/offset record: {strict_error}") from None
        _LOG.warning("%s: record uses the legacy layout or has unbalanced braces; read it as %d layer "
                     "record(s) after repair (%s)", path, len(repaired.record), strict_error)
        return repaired


def read_record(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordError(f"record file {path} does not exist") from None
    return parse_record_text(text, str(path))


def write_record(record, path) -> None:
    """Write the record as text, atomically."""
    with atomic_output(path, "w") as f:
        f.write(text_format.MessageToString(record))
