"""Text fields of a binary message that are not UTF-8.

Caffe's ``string`` fields (layer names, types, bottoms, tops...) must hold UTF-8. Protobuf's upb
backend parses a proto2 string holding other bytes without complaint and hands the value back as
``bytes``, which then fails far from the file (a ``TypeError`` joining names, a ``ValueError`` copying
the layer); the pure-Python backend raises ``UnicodeDecodeError`` while parsing. Readers call
:func:`check_utf8` on what they parsed, so the error names the file and the layer instead.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

from amct_caffe.errors import ModelFormatError, WeightsError

_LAYER_FIELDS = ("layer", "layers")


def _repeated(field) -> bool:
    # protobuf >= 6 drops FieldDescriptor.label in favour of is_repeated
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def invalid_strings(msg, prefix: str = "", bad=lambda v: isinstance(v, bytes)):
    """(field path, value) of every string field under ``msg`` whose value is ``bad`` (default: bytes, i.e.
    not UTF-8)."""
    for field, value in msg.ListFields():
        name = prefix + field.name
        repeated = _repeated(field)
        if field.type == FieldDescriptor.TYPE_STRING:
            items = enumerate(value) if repeated else [(None, value)]
            for i, v in items:
                if bad(v):
                    yield (name if i is None else f"{name}[{i}]"), v
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                for i, sub in enumerate(value):
                    yield from invalid_strings(sub, f"{name}[{i}].", bad)
            else:
                yield from invalid_strings(value, f"{name}.", bad)


def _where(field: str) -> str:
    head, _, rest = field.partition("].")
    if head.split("[")[0] in _LAYER_FIELDS and rest:
        return f"layer #{int(head.split('[')[1])} (counting from 0): its {rest}"
    return field


def check_replaced(net, path) -> None:
    """For a prototxt read with undecodable bytes replaced by U+FFFD (its comments may hold anything): raise a
    ModelFormatError naming ``path`` and the field if such a byte was in a string field (a layer name...),
    which would otherwise be renamed silently."""
    for field, value in invalid_strings(net, bad=lambda v: isinstance(v, str) and "\ufffd" in v):
        raise ModelFormatError(f"{path}: {_where(field)} {value!r} holds bytes that are not UTF-8 text: save the "
                               "prototxt as UTF-8")


def check_utf8(net, path) -> None:
    """Raise a WeightsError naming ``path`` and the layer if a string field of ``net`` is not UTF-8."""
    for field, raw in invalid_strings(net):
        shown = raw[:40] + (b"..." if len(raw) > 40 else b"")
        raise WeightsError(f"{path}: {_where(field)} is not valid UTF-8 text ({shown!r}): the caffemodel is corrupt, "
                           "or was written by a tool that does not store text as UTF-8; re-export it from Caffe")
