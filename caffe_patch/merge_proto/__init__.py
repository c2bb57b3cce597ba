"""Merge a user's custom.proto and AMCT's amct_custom.proto into a Caffe tree's caffe.proto.

Library use (``caffe_patch/install.py`` does this)::

    from caffe_patch.merge_proto import merge_protos, MergeError
    result = merge_protos(tree_proto_text, amct_text, custom_text)    # may raise MergeError
    result.text      # the new caffe.proto (package and options of the tree's file)
    result.added     # "LayerParameter.ifmr_param = 200001 (amct_custom.proto)", "message IFMRParameter (...)"
    result.notices   # what was replaced, renumbered or left out, for the user to read

Command: ``python -m caffe_patch.merge_proto --caffe_proto X [--amct_proto Y] [--custom_proto Z] -o OUT``.

The rules are the user guide's ("proto合并原理" and the FAQ on proto-merge errors); see ``merge.py``.
Nothing here needs a Caffe tree, protoc or protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .check import superset_problems, validate
from .merge import AMCT_START, LAYER, USER_LIMIT, MergeError, Names, combine, merge_into_base
from .parser import ProtoFile, ProtoSyntaxError, parse

__all__ = ["merge_protos", "merge_files", "check_superset", "default_amct_proto", "MergeResult", "MergeError",
           "ProtoSyntaxError", "parse", "ProtoFile", "LAYER", "USER_LIMIT", "AMCT_START"]


_PROTOC_RULE = "rule: every input must be a .proto file protoc accepts"


@dataclass
class MergeResult:
    text: str
    added: list = field(default_factory=list)
    notices: list = field(default_factory=list)


def _parse(text: str, name: str) -> ProtoFile:
    try:
        return parse(text, name)
    except ProtoSyntaxError as e:
        raise MergeError([f"{e} ({_PROTOC_RULE})"]) from None


def merge_protos(base_text: str, amct_text: str, custom_text: str | None = None, *,
                 base_name: str = "caffe.proto", amct_name: str = "amct_custom.proto",
                 custom_name: str = "custom.proto") -> MergeResult:
    """Merge ``custom_text`` with ``amct_text``, then the result into ``base_text`` (a Caffe tree's
    caffe.proto).

    The ``*_name`` arguments only label the inputs in messages (``custom.proto:3: LayerParameter.x = 206``).
    Raises :class:`MergeError` listing every clash with both definitions and the rule broken. Merging the
    output again with the same inputs returns it unchanged.
    """
    if len({base_name, amct_name, custom_name}) < 3:
        raise ValueError(f"the three inputs need different names, got {base_name!r}, {amct_name!r}, "
                         f"{custom_name!r}")
    names = Names(base_name, amct_name, custom_name)
    base = _parse(base_text, base_name)
    amct = _parse(amct_text, amct_name)
    custom = None if custom_text is None else _parse(custom_text, custom_name)
    problems = []
    for pf in (custom, amct, base):
        if pf is not None:
            problems += [f"{p} ({_PROTOC_RULE})" for p in validate(pf)]
    if problems:
        raise MergeError(problems)
    comb = combine(amct, custom, names)
    text, added, notices = merge_into_base(base, comb, names)
    merged = _parse(text, f"{base_name} (merged)")
    problems = validate(merged) + superset_problems(base, merged)
    if problems:   # the rules above should make this impossible; refuse rather than break a Caffe tree
        raise MergeError([f"the merged file would not compile or lacks part of {base_name}: {p}"
                          for p in problems])
    return MergeResult(text, added, notices)


def _read_text(path: Path) -> str:
    """A .proto file's UTF-8 text, or a MergeError naming it and what is wrong."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError([f"{path} is not UTF-8 text (byte {e.start}): give a .proto text file"]) from None
    except IsADirectoryError:
        raise MergeError([f"{path} is a directory, not a .proto file"]) from None
    except FileNotFoundError:
        raise MergeError([f"{path} does not exist"]) from None
    except (OSError, ValueError) as e:
        raise MergeError([f"cannot read {path}: {getattr(e, 'strerror', None) or e}"]) from None


def merge_files(caffe_proto, amct_proto, custom_proto=None) -> MergeResult:
    """:func:`merge_protos` on files (UTF-8), labelled by their base names in messages."""
    paths = [Path(p) for p in (caffe_proto, amct_proto)] + ([Path(custom_proto)] if custom_proto else [])
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):   # e.g. two files called caffe.proto: keep messages unambiguous
        labels = [str(p) for p in paths]
    texts = [_read_text(p) for p in paths]
    kw = dict(base_name=labels[0], amct_name=labels[1])
    if custom_proto:
        kw["custom_name"] = labels[2]
    elif labels[0] == "custom.proto" or labels[1] == "custom.proto":
        kw["custom_name"] = "<custom>"
    return merge_protos(texts[0], texts[1], texts[2] if custom_proto else None, **kw)


def check_superset(base_text: str, merged_text: str, base_name: str = "caffe.proto") -> list[str]:
    """What of ``base_text`` is missing from ``merged_text`` (messages, enums, fields, enum values)."""
    return superset_problems(parse(base_text, base_name), parse(merged_text, f"{base_name} (merged)"))


def default_amct_proto() -> Path:
    """amct_custom.proto next to this package (caffe_patch/merge_proto/) or in the repository's proto/."""
    here = Path(__file__).resolve().parent
    for cand in (here / "amct_custom.proto", here.parents[1] / "proto" / "amct_custom.proto"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"amct_custom.proto is neither in {here} nor in {here.parents[1] / 'proto'}")
