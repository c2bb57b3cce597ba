"""Text fields of a binary message that are not UTF-8.

Caffe's ``string`` fields (layer names, types, bottoms, tops...) must hold UTF-8. Protobuf's upb
backend parses a proto2 string holding other bytes without complaint and hands the value back as
``bytes``, which then fails far from the file (a ``TypeError`` joining names, a ``ValueError`` copying
the layer); the pure-Python backend raises ``UnicodeDecodeError`` while parsing. Readers call
:func:`check_utf8` on what they parsed, so the error names the file and the layer instead.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

from amct_caffe.errors import WeightsError

_LAYER_FIELDS = ("layer", "layers")


def _repeated(field) -> bool:
    # protobuf >= 6 drops FieldDescriptor.label in favour of is_repeated
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def invalid_strings(msg, prefix: str = ""):
    """(field path, raw bytes) of every string field under ``msg`` whose value is not UTF-8."""
    for field, value in msg.ListFields():
        name = prefix + field.name
        repeated = _repeated(field)
        if field.type == FieldDescriptor.TYPE_STRING:
            items = enumerate(value) if repeated else [(None, value)]
            for i, v in items:
                if isinstance(v, bytes):
                    yield (name if i is None else f"{name}[{i}]"), v
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                for i, sub in enumerate(value):
                    yield from invalid_strings(sub, f"{name}[{i}].")
            else:
                yield from invalid_strings(value, f"{name}.")


def check_utf8(net, path) -> None:
    """Raise a WeightsError naming ``path`` and the layer if a string field of ``net`` is not UTF-8."""
    for field, raw in invalid_strings(net):
        shown = raw[:40] + (b"..." if len(raw) > 40 else b"")
        head, _, rest = field.partition("].")
        if head.split("[")[0] in _LAYER_FIELDS and rest:
            index = int(head.split("[")[1])
            where = f"layer #{index} (counting from 0): its {rest}"
        else:
            where = field
        raise WeightsError(f"{path}: {where} is not valid UTF-8 text ({shown!r}): the caffemodel is corrupt, or "
                           "was written by a tool that does not store text as UTF-8; re-export it from Caffe")
