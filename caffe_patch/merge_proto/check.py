"""Checks on parsed .proto files: what protoc would reject, and whether one file still holds another.

Each function returns a list of problems (strings naming ``file:line``); an empty list means the check passed.
"""

from __future__ import annotations

from .parser import Enum, Message, Oneof, ProtoFile, Statement

__all__ = ["SCALARS", "field_kind", "describe_kind", "resolves", "validate", "superset_problems",
           "unresolved_types", "walk_types"]

SCALARS = frozenset("double float int32 int64 uint32 uint64 sint32 sint64 fixed32 fixed64 sfixed32 sfixed64 "
                    "bool string bytes".split())


def short_type(type_name: str, package: str = "") -> str:
    """A type reference without a leading dot or this file's package prefix."""
    name = type_name.lstrip(".")
    if package and name.startswith(package + "."):
        name = name[len(package) + 1:]
    return name


def field_kind(f, package: str = "") -> tuple:
    """What generated C++ code depends on: whether the field is repeated, and its type."""
    return (f.label == "repeated", short_type(f.type, package))


def describe_kind(f) -> str:
    return f"{f.label + ' ' if f.label else ''}{f.type}"


def walk_types(items, prefix=""):
    """Yield ``(full_name, node)`` for every message and enum, nested ones included (without the package)."""
    for it in items:
        if isinstance(it, (Message, Enum)):
            full = prefix + it.name
            yield full, it
            if isinstance(it, Message):
                yield from walk_types(it.items, full + ".")
                for f in it.all_fields():
                    if f.group is not None:
                        yield from walk_types([f.group], full + ".")


def _allow_alias(enum) -> bool:
    return any(isinstance(it, Statement) and it.kind == "option" and "allow_alias" in it.key
               and it.key[-2] == "true" for it in enum.items)


def validate(pf: ProtoFile) -> list[str]:
    """Duplicate definitions protoc rejects: type names in one scope, field names and numbers in one message,
    enum value names (and numbers, unless ``allow_alias``)."""
    problems = []

    def dup_symbols(items, scope, fields=()):
        """Names sharing one scope: types, the values of enums declared there (C++ scoping), oneofs and
        fields. Field/field and same-enum value pairs are left to the checks below."""
        entries = []
        for it in items:
            if isinstance(it, (Message, Enum, Oneof)):
                entries.append((it.name, it, it))
            if isinstance(it, Enum):
                entries += [(v.name, v, it) for v in it.values]
        entries += [(f.name, f, None) for f in fields]
        seen = {}
        for name, node, owner in entries:
            first = seen.setdefault(name, (node, owner))
            if first[0] is not node and (owner is not None or first[1] is not None) and owner is not first[1]:
                problems.append(f"{pf.where(node)}: {scope}{name} is defined twice "
                                f"(first at {pf.where(first[0])})")

    dup_symbols(pf.items, "")
    for full, node in walk_types(pf.items):
        if isinstance(node, Message):
            dup_symbols(node.items, full + ".", node.all_fields())
            by_num, by_name = {}, {}
            for f in node.all_fields():
                for table, k in ((by_num, f.number), (by_name, f.name)):
                    if k in table:
                        o = table[k]
                        problems.append(f"{pf.where(f)}: {full}.{f.name} = {f.number} clashes with "
                                        f"{pf.where(o)}: {full}.{o.name} = {o.number} in the same file")
                    table[k] = f
        else:
            by_num, by_name = {}, {}
            for v in node.values:
                if v.name in by_name:
                    problems.append(f"{pf.where(v)}: enum value {full}.{v.name} is defined twice")
                if v.number in by_num and not _allow_alias(node):
                    o = by_num[v.number]
                    problems.append(f"{pf.where(v)}: {full}.{v.name} = {v.number} reuses the number of "
                                    f"{pf.where(o)}: {full}.{o.name}")
                by_name[v.name] = by_num[v.number] = v
    return problems


def superset_problems(base: ProtoFile, merged: ProtoFile) -> list[str]:
    """What of ``base`` is missing from ``merged``: every message and enum (full name), every field (name,
    repeated-ness and type) and every enum value name must survive, or code generated from ``base`` (a Caffe
    tree's C++ sources) stops compiling. Field numbers may differ: accessors do not depend on them."""
    got = dict(walk_types(merged.items))
    problems = []
    for full, node in walk_types(base.items):
        other = got.get(full)
        if other is None or type(other) is not type(node):
            problems.append(f"{base.where(node)}: {type(node).__name__.lower()} {full} is missing")
            continue
        if isinstance(node, Message):
            fields = {f.name: f for f in other.all_fields()}
            for f in node.all_fields():
                o = fields.get(f.name)
                if o is None:
                    problems.append(f"{base.where(f)}: field {full}.{f.name} is missing")
                elif field_kind(o, merged.package) != field_kind(f, base.package):
                    problems.append(f"{base.where(f)}: field {full}.{f.name} changed type from "
                                    f"{describe_kind(f)} to {describe_kind(o)}")
        else:
            names = {v.name for v in other.values}
            problems += [f"{base.where(v)}: enum value {full}.{v.name} is missing"
                         for v in node.values if v.name not in names]
    return problems


def resolves(ref: str, scope: str, names: set, package: str) -> bool:
    """Whether type reference ``ref`` used in message ``scope`` names one of ``names`` (full names without the
    package), following protobuf's scoping: innermost enclosing scope first."""
    if ref in SCALARS or ref.startswith("map<"):
        if ref.startswith("map<"):
            return resolves(ref[4:-1].split(",", 1)[1], scope, names, package)
        return True
    if ref.startswith("."):
        return short_type(ref, package) in names
    ref = short_type(ref, package)
    head = ref.split(".", 1)[0]
    parts = scope.split(".") if scope else []
    for k in range(len(parts), -1, -1):
        prefix = ".".join(parts[:k])
        if (prefix + "." if prefix else "") + head in names:
            return (prefix + "." if prefix else "") + ref in names
    return False


def unresolved_types(pf: ProtoFile) -> list[str]:
    """Fields whose type no message or enum of ``pf`` defines (skipped when ``pf`` imports other files)."""
    if pf.statements("import"):
        return []
    types = dict(walk_types(pf.items))
    names = set(types)
    problems = []
    for full, node in types.items():
        if isinstance(node, Message):
            for f in node.all_fields():
                if f.group is None and not resolves(f.type, full, names, pf.package):
                    problems.append(f"{pf.where(f)}: {full}.{f.name} = {f.number} has type {f.type}, "
                                    f"which no input defines")
    for st in pf.statements("extend"):
        problems += [f"{pf.where(f)}: extension {f.name} has type {f.type}, which no input defines"
                     for f in st.fields if not resolves(f.type, "", names, pf.package)]
    return problems
