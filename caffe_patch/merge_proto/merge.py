"""The two merge steps of the user guide's "proto合并原理".

1. ``combine``: the user's custom.proto with AMCT's amct_custom.proto. AMCT's LayerParameter numbers, field
   names and message/enum names are reserved: any clash is an error naming both definitions.
2. ``merge_into_base``: that result into a Caffe tree's caffe.proto (the base). A LayerParameter number
   already used by another field is an error. A message or enum defined in both is taken from custom.proto /
   amct_custom.proto (the "user's definition wins"), but what the base declares there is carried over when
   the user's definition lacks it, because the tree's C++ code uses it: the output stays a superset of the
   base (every message, enum, field name and type, enum value). Where that is impossible (a base field's
   number taken by a differently named field, a field whose type changes) the merge stops with an error
   instead of breaking the tree's build. A LayerParameter field declared in both under different numbers
   takes the user's number (reported): accessors, hence the tree's code, do not depend on numbers.

The output is the base's text with edits: new LayerParameter fields go before LayerParameter's closing brace,
new messages and enums at the end of the file, each block under a comment naming its source file; a replaced
definition is rewritten in place. Definitions are copied with their comments and layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .check import describe_kind, field_kind, resolves, walk_types
from .parser import Enum, Field, Message, Oneof, ProtoFile, Statement, parse_int
from .text import Edits, column, insert_before_close, line_indent, member_indent, reindent

__all__ = ["MergeError", "Names", "Combined", "combine", "merge_into_base", "LAYER", "USER_LIMIT",
           "AMCT_START"]

LAYER = "LayerParameter"
USER_LIMIT = 5000      # custom layers: numbers below this (guide: recommended)
AMCT_START = 200000    # amct_custom.proto: numbers from here (plus quant_param = 208)
MARK = "// merge_proto:"


class MergeError(ValueError):
    """The inputs cannot be merged. ``problems`` lists each clash: both definitions (file:line, message, field
    name and number) and the rule it breaks."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Names:
    base: str = "caffe.proto"
    amct: str = "amct_custom.proto"
    custom: str = "custom.proto"


@dataclass
class Src:
    """A definition and the file it was read from."""
    node: object
    file: ProtoFile

    @property
    def where(self) -> str:
        return self.file.where(self.node)

    def decl(self) -> tuple[str, int]:
        """The definition's text (with a comment on its last line) and the column of its first line."""
        text = self.file.text
        return text[self.node.start:self.node.tail], column(text, self.node.start)

    def with_comments(self) -> tuple[str, int]:
        text = self.file.text
        return text[self.node.lead:self.node.tail], column(text, self.node.start)


@dataclass
class Combined:
    """Step 1's result: what goes into the base, in order (amct_custom.proto's definitions first)."""
    layer: list = field(default_factory=list)        # Src of LayerParameter fields
    types: list = field(default_factory=list)        # Src of top-level messages and enums
    statements: list = field(default_factory=list)   # Src of import / extend / service / option statements
    notices: list = field(default_factory=list)


def _rules(n: Names):
    return {
        "amct_name": f"rule: AMCT's message and enum names ({n.amct}) are reserved; "
                     f"rename the one in {n.custom}.",
        "amct_number": f"rule: {n.custom}'s LayerParameter numbers must not clash with {n.amct}'s (AMCT uses "
                       f"208 and {AMCT_START} and up); give custom layers unused numbers below {USER_LIMIT}.",
        "field_name": f"rule: a LayerParameter field name may be declared once; "
                      f"rename the field in {n.custom}.",
        "optional": f"rule: {n.custom} declares its layers in LayerParameter as optional fields only.",
        "only_fields": f"rule: {n.custom}'s LayerParameter only lists fields; "
                       f"define messages at the top level.",
        "base_number": f"rule: a LayerParameter field number may be used once; {n.custom}'s numbers must not "
                       f"clash with {n.base}'s (custom layers: unused numbers below {USER_LIMIT}).",
        "base_type": f"rule: {n.base}'s fields keep their name and type, or the Caffe tree's code stops "
                     f"compiling; rename the field in the user's definition.",
        "base_kept": f"rule: the merged file keeps every field of {n.base}, or the Caffe tree's code stops "
                     f"compiling; use another number in the user's definition.",
        "kind": "rule: a name defined in both files must be a message in both or an enum in both.",
        "undefined": "rule: every field type needs a definition in one of the inputs.",
        "syntax": "rule: Caffe's caffe.proto is proto2, so every input must be proto2.",
    }


def _layer_fields(src_file: ProtoFile, rules, problems) -> list:
    lp = src_file.types().get(LAYER)
    if lp is None:
        return []
    if not isinstance(lp, Message):
        problems.append(f"{src_file.where(lp)}: {LAYER} is an enum here. {rules['kind']}")
        return []
    for it in lp.items:
        if not isinstance(it, Field):
            what = type(it).__name__.lower() if not isinstance(it, Statement) else it.kind
            problems.append(f"{src_file.where(it)}: {LAYER} holds a {what}. {rules['only_fields']}")
    return [Src(f, src_file) for f in lp.all_fields()]


def _fdesc(s: Src, msg=LAYER) -> str:
    return f"{s.where}: {msg}.{s.node.name} = {s.node.number}"


def _check_syntax(pf: ProtoFile, rules, problems):
    if pf.syntax != "proto2":
        problems.append(f"{pf.name}: syntax = \"{pf.syntax}\". {rules['syntax']}")


def combine(amct: ProtoFile, custom: ProtoFile | None, names: Names) -> Combined:
    """Step 1: the user's custom.proto with amct_custom.proto; raise :class:`MergeError` on any clash."""
    rules, problems, out = _rules(names), [], Combined()
    _check_syntax(amct, rules, problems)
    out.layer = _layer_fields(amct, rules, problems)
    out.types = [Src(t, amct) for t in amct.items if isinstance(t, (Message, Enum)) and t.name != LAYER]
    out.statements = [Src(s, amct) for s in amct.items if isinstance(s, Statement)
                      and s.kind not in ("syntax", "package")]
    if custom is not None:
        _check_syntax(custom, rules, problems)
        reserved = {s.node.name: s for s in out.types}
        user_types = [Src(t, custom) for t in custom.items
                      if isinstance(t, (Message, Enum)) and t.name != LAYER]
        for s in user_types:
            other = reserved.get(s.node.name)
            if other is not None:
                problems.append(f"{s.where}: {type(s.node).__name__.lower()} {s.node.name} has the name of "
                                f"{other.where}: {type(other.node).__name__.lower()} {other.node.name}. "
                                f"{rules['amct_name']}")
        amct_num = {s.node.number: s for s in out.layer}
        amct_name = {s.node.name: s for s in out.layer}
        user_layer = _layer_fields(custom, rules, problems)
        for s in user_layer:
            f = s.node
            if f.label != "optional":
                what = (f.label if f.label else f"in oneof {f.oneof}" if f.oneof is not None
                        else "a map" if f.type.startswith("map<") else "without a label")
                problems.append(f"{_fdesc(s)} is {what}. {rules['optional']}")
            if f.number in amct_num:
                problems.append(f"{_fdesc(s)} clashes with {_fdesc(amct_num[f.number])}. "
                                f"{rules['amct_number']}")
            elif f.name in amct_name:
                problems.append(f"{_fdesc(s)} has the name of {_fdesc(amct_name[f.name])}. "
                                f"{rules['field_name']}")
            elif f.number >= USER_LIMIT:
                out.notices.append(f"{_fdesc(s)}: custom layers should use numbers below {USER_LIMIT} "
                                   f"(ATC uses [{USER_LIMIT}, {AMCT_START}), AMCT {AMCT_START} and up).")
        out.layer += user_layer
        out.types += user_types
        out.statements += [Src(s, custom) for s in custom.items if isinstance(s, Statement)
                           and s.kind not in ("syntax", "package")]
    if problems:
        raise MergeError(problems)
    return out


class _Merger:
    """Step 2 state: the base, the edits to its text, and what to report."""

    def __init__(self, base: ProtoFile, names: Names):
        self.base, self.names, self.rules = base, names, _rules(names)
        self.edits, self.problems, self.notices, self.added = Edits(), [], [], []

    def is_user(self, s: Src) -> bool:
        return s.file.name == self.names.custom

    def mark(self, why: str, indent: str) -> str:
        return f"{indent}{MARK} {why}"

    # ------------------------------------------------------------------ LayerParameter
    def layer(self, fields: list, appended: list):
        lp = self.base.types().get(LAYER)
        if not fields:
            return
        if lp is None:
            appended.append(("layer", fields))
            return
        if not isinstance(lp, Message):
            self.problems.append(f"{self.base.where(lp)}: {LAYER} is an enum. {self.rules['kind']}")
            return
        bt = self.base.text
        by_num = {f.number: Src(f, self.base) for f in lp.all_fields()}
        by_name = {f.name: Src(f, self.base) for f in lp.all_fields()}
        closed = [Src(it, self.base) for it in lp.items if isinstance(it, Statement)
                  and it.kind in ("reserved", "extensions")]
        new = []
        for s in fields:
            f = s.node
            same = by_name.get(f.name)
            taken = [st for st in closed if (same is None or same.node.number != f.number)
                     and (_in_ranges(f.number, st.node.key[1:])
                          or (st.node.kind == "reserved" and any(t.strip("'\"") == f.name
                                                                 for t in st.node.key[1:] if t[:1] in "'\"")))]
            if taken:  # protoc refuses a field in a reserved or extension range, or of a reserved name
                self.problems.append(f"{_fdesc(s)} falls under {taken[0].where}: {LAYER} "
                                     f"'{' '.join(taken[0].node.key)}'. {self.rules['base_number']}")
                continue
            if same is not None and same.node.number == f.number:
                if not self.same_kind(same, s):
                    continue
                if same.node.key != f.key:
                    self.replace_decl(same, s)
                    self.notices.append(f"{_fdesc(s)} replaces {_fdesc(same)} (same name and number, "
                                        f"different options or label): {s.file.name}'s declaration is used.")
                elif self.is_user(s):
                    self.notices.append(f"{_fdesc(s)} is already in {self.base.name} ({same.where}); kept.")
                continue
            other = by_num.get(f.number)
            if other is not None:
                self.problems.append(f"{_fdesc(s)} clashes with {_fdesc(other)}. {self.rules['base_number']}")
                continue
            if same is not None:
                if self.same_kind(same, s):
                    self.replace_decl(same, s)
                    self.notices.append(
                        f"{_fdesc(s)} renumbers {_fdesc(same)}: {s.file.name}'s number is used (binary "
                        f".caffemodel files that store {f.name} as field {same.node.number} no longer "
                        f"load it).")
                continue
            new.append(s)
        indent = member_indent(bt, lp)
        lines = []
        for origin in dict.fromkeys(s.file.name for s in new):
            lines.append(self.mark(f"added from {origin}", indent))
            for s in new:
                if s.file.name == origin:
                    text, col = s.with_comments()
                    lines.append(reindent(text, col, indent))
                    self.added.append(f"{LAYER}.{s.node.name} = {s.node.number} ({origin})")
        if lines and bt[lp.open + 1:lp.close].strip():
            lines.insert(0, "")
        insert_before_close(self.edits, bt, lp.close, lines)

    def same_kind(self, base_f: Src, user_f: Src, path: str = LAYER) -> bool:
        if field_kind(base_f.node, base_f.file.package) == field_kind(user_f.node, user_f.file.package):
            return True
        self.problems.append(f"{_fdesc(user_f, path)} ({describe_kind(user_f.node)}) redefines "
                             f"{_fdesc(base_f, path)} ({describe_kind(base_f.node)}). "
                             f"{self.rules['base_type']}")
        return False

    def replace_decl(self, base_f: Src, user_f: Src):
        text, col = user_f.decl()
        self.edits.replace(base_f.node.start, base_f.node.tail,
                           reindent(text, col, line_indent(self.base.text, base_f.node.start), first=False))

    # ------------------------------------------------------------------ messages and enums defined in both
    def message(self, user: Src, base: Src, path: str) -> str:
        """``user``'s message text (in its own file's layout) with what only ``base`` declares carried in."""
        u, b, ut = user.node, base.node, user.file.text
        edits, carry = Edits(), []
        ufields = {f.name: f for f in u.all_fields()}
        unums = {f.number: f for f in u.all_fields()}
        uoneofs = {it.name: it for it in u.items if isinstance(it, Oneof)}
        utypes = u.types()
        ukeys = {it.key for it in u.items if isinstance(it, Statement)}
        into_oneof = {}
        for bf in b.all_fields():
            uf = ufields.get(bf.name)
            bs, us = Src(bf, base.file), Src(uf, user.file) if uf else None
            if uf is not None:
                if self.same_kind(bs, us, path) and uf.number != bf.number:
                    self.notices.append(f"{_fdesc(us, path)} renumbers {_fdesc(bs, path)}: "
                                        f"{user.file.name}'s number is used.")
                continue
            if bf.number in unums:
                self.problems.append(f"{_fdesc(Src(unums[bf.number], user.file), path)} takes the number of "
                                     f"{_fdesc(bs, path)}. {self.rules['base_kept']}")
                continue
            if bf.oneof is None:
                carry.append(bs.decl())
            elif bf.oneof in uoneofs:
                into_oneof.setdefault(bf.oneof, []).append(bs.decl())
            else:
                into_oneof.setdefault(("new", bf.oneof), []).append(bs.decl())
        for key, decls in into_oneof.items():
            if isinstance(key, tuple):   # a oneof the user's message lacks: carry it with the missing fields
                body = "".join(f"\n  {reindent(t, c, '  ', first=False)}" for t, c in decls)
                carry.append((f"oneof {key[1]} {{{body}\n}}", 0))
            else:
                one = uoneofs[key]
                ind = member_indent(ut, one)
                insert_before_close(edits, ut, one.close, [self.mark(f"kept from {self.base.name}", ind)]
                                    + [reindent(t, c, ind) for t, c in decls])
        for name, bnode in b.types().items():
            unode = utypes.get(name)
            bsub = Src(bnode, base.file)
            if unode is None:
                carry.append(bsub.decl())
            elif self.same_type_kind(Src(unode, user.file), bsub):
                sub = self.definition(Src(unode, user.file), bsub, f"{path}.{name}")
                edits.replace(unode.start, unode.end, sub)
        for st in b.items:
            if isinstance(st, Statement) and st.key not in ukeys:
                self.carry_statement(Src(st, base.file), set(unums), carry, path)
        self.carry_block(edits, ut, u, carry)
        return edits.apply(ut, u.start, u.end)

    def enum(self, user: Src, base: Src, path: str) -> str:
        u, b, ut = user.node, base.node, user.file.text
        edits, carry = Edits(), []
        unames = {v.name: v for v in u.values}
        unums = {v.number: v for v in u.values}
        ukeys = {it.key for it in u.items if isinstance(it, Statement)}
        for bv in b.values:
            uv = unames.get(bv.name)
            if uv is not None:
                if uv.number != bv.number:
                    self.notices.append(f"{user.file.where(uv)}: {path}.{uv.name} = {uv.number} renumbers "
                                        f"{base.file.where(bv)}: {path}.{bv.name} = {bv.number}; "
                                        f"{user.file.name}'s number is used.")
                continue
            if bv.number in unums and not any("allow_alias" in it.key for it in u.items
                                              if isinstance(it, Statement)):
                o = unums[bv.number]
                self.problems.append(f"{user.file.where(o)}: {path}.{o.name} = {o.number} takes the number "
                                     f"of {base.file.where(bv)}: {path}.{bv.name} = {bv.number}. "
                                     f"{self.rules['base_kept']}")
                continue
            carry.append(Src(bv, base.file).decl())
        for st in b.items:
            if isinstance(st, Statement) and st.key not in ukeys:
                self.carry_statement(Src(st, base.file), set(unums), carry, path)
        self.carry_block(edits, ut, u, carry)
        return edits.apply(ut, u.start, u.end)

    def same_type_kind(self, user: Src, base: Src) -> bool:
        if type(user.node) is type(base.node):
            return True
        self.problems.append(f"{user.where}: {type(user.node).__name__.lower()} {user.node.name} has the "
                             f"name of {base.where}: {type(base.node).__name__.lower()} {base.node.name}. "
                             f"{self.rules['kind']}")
        return False

    def definition(self, user: Src, base: Src, path: str) -> str:
        if isinstance(user.node, Message):
            return self.message(user, base, path)
        return self.enum(user, base, path)

    def carry_statement(self, st: Src, user_numbers: set, carry: list, path: str):
        node = st.node
        if node.kind in ("reserved", "extensions"):
            taken = sorted(n for n in user_numbers if _in_ranges(n, node.key[1:]))
            if taken:
                self.notices.append(f"{st.where}: {path} '{' '.join(node.key)}' is dropped: the user's "
                                    f"definition uses {', '.join(map(str, taken))}.")
                return
        carry.append(st.decl())

    def carry_block(self, edits: Edits, text: str, node, carry: list):
        if not carry:
            return
        ind = member_indent(text, node)
        lines = [self.mark(f"kept from {self.base.name} (the Caffe tree's code may use it)", ind)]
        lines += [reindent(t, c, ind) for t, c in carry]
        insert_before_close(edits, text, node.close, lines)

    # ------------------------------------------------------------------ top level
    def enum_values_clash(self, s: Src, values: dict) -> None:
        """Top-level enum values share the file's scope (C++ rules): a value of enum ``s`` must not have the
        name of another top-level enum's value or of a top-level type."""
        for v in s.node.values:
            other = values.get(v.name)
            if other is not None and other[0] != s.node.name:
                self.problems.append(f"{s.file.where(v)}: enum value {s.node.name}.{v.name} has the name of "
                                     f"{other[1]}. rule: enum values of top-level enums share one scope "
                                     f"with all top-level names; rename the value.")
            values.setdefault(v.name, (s.node.name, f"{s.file.where(v)}: enum value {s.node.name}.{v.name}"))

    def types(self, types: list, appended: list):
        btypes = self.base.types()
        values = {name: (name, f"{self.base.where(t)}: {type(t).__name__.lower()} {name}")
                  for name, t in btypes.items()}
        values.update({v.name: (t.name, f"{self.base.where(v)}: enum value {t.name}.{v.name}")
                       for t in btypes.values() if isinstance(t, Enum) for v in t.values})
        values.update({t.name: (t.name, f"{s.where}: {type(t).__name__.lower()} {t.name}")
                       for s in types for t in [s.node]})
        for s in types:
            if isinstance(s.node, Enum):
                self.enum_values_clash(s, values)
        for s in types:
            b = btypes.get(s.node.name)
            kind = type(s.node).__name__.lower()
            if b is None:
                appended.append(("type", s))
                self.added.append(f"{kind} {s.node.name} ({s.file.name})")
                continue
            bs = Src(b, self.base)
            if not self.same_type_kind(s, bs):
                continue
            if b.key == s.node.key:
                new = self.base.text[b.start:b.end]
            else:
                new = self.definition(s, bs, s.node.name)
                new = reindent(new, column(s.file.text, s.node.start), line_indent(self.base.text, b.start),
                               first=False)
            if new != self.base.text[b.start:b.end]:
                self.edits.replace(b.start, b.end, new)
                self.notices.append(f"{s.where}: {kind} {s.node.name} replaces {bs.where}: the definition in "
                                    f"{s.file.name} is used.")
            elif self.is_user(s):
                self.notices.append(f"{s.where}: {kind} {s.node.name} is also defined in {bs.where}; the "
                                    f"definition in {s.file.name} is used (the two are the same).")

    def statements(self, statements: list, appended: list):
        bkeys = {st.key for st in self.base.items if isinstance(st, Statement)}
        imports = self.base.statements("import")
        for s in statements:
            node = s.node
            if node.key in bkeys:
                continue
            if node.kind == "import":
                anchor = (imports or self.base.statements("package") or self.base.statements("syntax")
                          or [None])[-1]
                text = s.decl()[0]
                if anchor is None:
                    self.edits.insert(0, text + "\n")
                else:
                    self.edits.insert(anchor.tail, "\n" + text)
                self.added.append(f"import \"{node.value}\" ({s.file.name})")
            elif node.kind == "option":
                self.notices.append(f"{s.where}: file option '{' '.join(node.key)}' is not copied; the "
                                    f"output keeps {self.base.name}'s options.")
            else:
                appended.append(("type", s))
                self.added.append(f"{node.kind} {node.value} ({s.file.name})")
            bkeys.add(node.key)

    def append(self, appended: list) -> str:
        if not appended:
            return ""
        out, origin = [], None
        for what, item in appended:
            if what == "layer":
                src = item[0].file.name
                body = "".join("\n" + reindent(*s.with_comments(), "  ") for s in item)
                text = f"message {LAYER} {{{body}\n}}"
                self.added.append(f"message {LAYER} ({src})")
            else:
                src = item.file.name
                text = reindent(*item.with_comments(), "")
            if src != origin:
                out.append(f"\n{MARK} added from {src}\n")
                origin = src
            out.append("\n" + text + "\n")
        return "".join(out)

    def check_types(self, comb: Combined):
        """Every field of what is merged has a type defined by one of the inputs."""
        if any(s.file.statements("import") for s in comb.types) or self.base.statements("import"):
            return
        names = {full for full, _ in walk_types(self.base.items)}
        for s in comb.types:
            names.update(full for full, _ in walk_types([s.node]))
        names.add(LAYER)
        for s in comb.layer:
            if not resolves(s.node.type, LAYER, names, s.file.package):
                self.problems.append(f"{_fdesc(s)} has type {s.node.type}, which no input defines. "
                                     f"{self.rules['undefined']}")
        for s in comb.types:
            for full, node in walk_types([s.node]):
                if isinstance(node, Message):
                    for f in node.all_fields():
                        if f.group is None and not resolves(f.type, full, names, s.file.package):
                            self.problems.append(f"{s.file.where(f)}: {full}.{f.name} = {f.number} has "
                                                 f"type {f.type}, which no input defines. "
                                                 f"{self.rules['undefined']}")


def _in_ranges(number: int, tokens: tuple) -> bool:
    """Whether ``number`` is in a ``reserved``/``extensions`` range list like ``2, 9 to 11, 100 to max``."""
    toks = [t for t in tokens if t not in (",", ";")]
    i = 0
    while i < len(toks):
        if toks[i].startswith(("'", '"')) or not toks[i][:1].isdigit():
            i += 1
            continue
        lo = hi = parse_int(toks[i])
        if i + 2 < len(toks) and toks[i + 1] == "to":
            hi = 2 ** 29 if toks[i + 2] == "max" else parse_int(toks[i + 2])
            i += 2
        if lo <= number <= hi:
            return True
        i += 1
    return False


def merge_into_base(base: ProtoFile, comb: Combined, names: Names) -> tuple[str, list, list]:
    """Step 2: ``comb`` into ``base``; return ``(text, added, notices)`` or raise :class:`MergeError`."""
    m = _Merger(base, names)
    _check_syntax(base, m.rules, m.problems)
    m.notices += comb.notices
    appended = []
    m.layer(comb.layer, appended)
    m.types(comb.types, appended)
    m.statements(comb.statements, appended)
    m.check_types(comb)
    if m.problems:
        raise MergeError(m.problems)
    text = m.edits.apply(base.text)
    tail = m.append(appended)
    if tail:
        text = text if text.endswith("\n") or not text else text + "\n"
        text += tail
    return text, m.added, m.notices
