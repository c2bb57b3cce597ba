"""A proto2 parser that keeps where each definition sits in the source text.

The merge copies definitions from one .proto into another, so every node records its character span
(``start``..``end``, from its first keyword to its ``;`` or ``}``) and the span of the comments that belong
to it (``lead`` for the comment block directly above it, ``tail`` for a comment on its last line). ``key`` is
the definition's token sequence without comments or layout, so two definitions that differ only in formatting
compare equal.

Grammar covered (protobuf language guide, proto2): ``syntax``, ``package``, ``import [public|weak]``,
``option`` (file, message, enum, field options, aggregate values), ``message`` with nested messages, enums,
``oneof``, ``map<,>`` fields, groups, ``reserved``, ``extensions``, ``extend``; ``service`` is kept as an
opaque block. Comments are ``//`` and ``/* */``; a ``#`` is rejected because protoc rejects it too.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

__all__ = ["ProtoSyntaxError", "Field", "EnumValue", "Enum", "Oneof", "Message", "Statement", "ProtoFile",
           "parse", "LABELS"]

LABELS = ("optional", "required", "repeated")

_TOKEN = re.compile(r"""
    (?P<ws>[\s\ufeff]+)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<num>0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<sym>[{}\[\]()<>;=,.:+\-/])
""", re.VERBOSE | re.DOTALL)


# Field numbers protoc accepts: 1 to 2^29 - 1, without the range it keeps for itself.
MAX_FIELD_NUMBER = (1 << 29) - 1
RESERVED_FIELD_NUMBERS = (19000, 19999)


class ProtoSyntaxError(ValueError):
    """A .proto text the parser (and protoc) cannot read; the message starts with ``file:line:col``."""


@dataclass
class Tok:
    kind: str
    text: str
    start: int
    end: int


@dataclass
class Node:
    """Common part of every definition: source span, comment span, line, canonical token key."""
    start: int = 0
    end: int = 0
    lead: int = 0   # start of the comment block directly above (== start when there is none)
    tail: int = 0   # end of a comment on the definition's last line (== end when there is none)
    line: int = 0
    key: tuple = ()


@dataclass
class Field(Node):
    label: str = ""          # optional / required / repeated, "" inside a oneof or for map fields
    type: str = ""           # as written: "float", "FillerParameter", ".caffe.Foo", "map<string,int32>"
    name: str = ""
    number: int = 0
    options: str = ""        # the text between [ and ], "" when absent
    oneof: str | None = None
    group: Message | None = None


@dataclass
class EnumValue(Node):
    name: str = ""
    number: int = 0


@dataclass
class Statement(Node):
    kind: str = ""           # syntax package import option reserved extensions extend service
    value: str = ""          # syntax/package/import: the value; others: the statement's canonical text
    fields: list = field(default_factory=list)   # extend blocks: the fields they add


@dataclass
class Enum(Node):
    name: str = ""
    open: int = 0            # offsets of "{" and "}"
    close: int = 0
    values: list = field(default_factory=list)
    items: list = field(default_factory=list)    # values and statements, in source order


@dataclass
class Oneof(Node):
    name: str = ""
    open: int = 0
    close: int = 0
    fields: list = field(default_factory=list)
    items: list = field(default_factory=list)


@dataclass
class Message(Node):
    name: str = ""
    open: int = 0
    close: int = 0
    items: list = field(default_factory=list)    # Field, Message, Enum, Oneof, Statement in source order

    def all_fields(self):
        """Fields declared directly in this message, oneof members included."""
        out = []
        for it in self.items:
            if isinstance(it, Field):
                out.append(it)
            elif isinstance(it, Oneof):
                out.extend(it.fields)
        return out

    def types(self):
        return {it.name: it for it in self.items if isinstance(it, (Message, Enum))}


@dataclass
class ProtoFile:
    name: str
    text: str
    syntax: str = "proto2"
    package: str = ""
    items: list = field(default_factory=list)    # top-level Message, Enum, Statement in source order

    def types(self):
        return {it.name: it for it in self.items if isinstance(it, (Message, Enum))}

    def statements(self, kind):
        return [it for it in self.items if isinstance(it, Statement) and it.kind == kind]

    def where(self, node) -> str:
        return f"{self.name}:{node.line}"


def tokenize(text: str, name: str):
    """Split ``text`` into tokens; comments are returned apart as (start, end) pairs."""
    toks, comments, pos = [], [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            line, col = _line_col(text, pos)
            what = ("'#' comments are not proto syntax (protoc rejects them); use //"
                    if text[pos] == "#" else f"unexpected character {text[pos]!r}")
            if text.startswith("/*", pos):
                what = "unterminated /* comment"
            elif text[pos] in "'\"":
                what = "unterminated string"
            raise ProtoSyntaxError(f"{name}:{line}:{col}: {what}")
        kind = m.lastgroup
        if kind == "comment":
            comments.append((m.start(), m.end()))
        elif kind != "ws":
            toks.append(Tok(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return toks, comments


def _line_col(text, pos):
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def parse_int(text: str) -> int:
    if text.lower().startswith("0x"):
        return int(text, 16)
    if len(text) > 1 and text.startswith("0") and text.isdigit():
        return int(text, 8)
    return int(text)


class _Parser:
    def __init__(self, text: str, name: str):
        self.text, self.name = text, name
        self.toks, self.comments = tokenize(text, name)
        self.cstarts = [c[0] for c in self.comments]
        self.i = 0

    # ---------------------------------------------------------------- token helpers
    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def error(self, msg, tok=None):
        tok = tok or self.peek()
        pos = tok.start if tok else len(self.text)
        line, col = _line_col(self.text, pos)
        got = f" (found {tok.text!r})" if tok else " (found end of file)"
        raise ProtoSyntaxError(f"{self.name}:{line}:{col}: {msg}{got}")

    def next(self):
        tok = self.peek()
        if tok is None:
            self.error("unexpected end of file")
        self.i += 1
        return tok

    def accept(self, text):
        tok = self.peek()
        if tok is not None and tok.text == text and tok.kind != "str":
            self.i += 1
            return tok
        return None

    def expect(self, text, what=None):
        tok = self.accept(text)
        if tok is None:
            self.error(f"expected {what or repr(text)}")
        return tok

    def ident(self, what="a name"):
        tok = self.peek()
        if tok is None or tok.kind != "ident":
            self.error(f"expected {what}")
        self.i += 1
        return tok.text

    def full_ident(self, what="a type name"):
        parts = ["."] if self.accept(".") else []
        parts.append(self.ident(what))
        while self.accept("."):
            parts += [".", self.ident(what)]
        return "".join(parts)

    def integer(self, what):
        neg = bool(self.accept("-"))
        tok = self.peek()
        if tok is None or tok.kind != "num" or not re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", tok.text):
            self.error(f"expected {what} (an integer)")
        self.i += 1
        value = parse_int(tok.text)
        return -value if neg else value

    def skip_balanced(self, open_, close):
        depth = 0
        while True:
            tok = self.next()
            if tok.kind == "sym" and tok.text == open_:
                depth += 1
            elif tok.kind == "sym" and tok.text == close:
                depth -= 1
                if depth == 0:
                    return tok

    def until_semicolon(self):
        while True:
            tok = self.next()
            if tok.kind == "sym" and tok.text == ";":
                return tok
            if tok.kind == "sym" and tok.text in "{}":
                self.error("expected ';'", tok)

    # ---------------------------------------------------------------- node bookkeeping
    def finish(self, node, first_tok_index, end):
        first = self.toks[first_tok_index]
        node.start, node.end = first.start, end
        node.line = _line_col(self.text, first.start)[0]
        node.key = tuple(t.text for t in self.toks[first_tok_index:self.i])
        node.lead = self._lead(first_tok_index)
        node.tail = self._tail(end)
        return node

    def _lead(self, tok_index):
        """Start of the comments directly above token ``tok_index``: no blank line in between, and none that
        trails something else on its own line (that one belongs to the previous definition)."""
        start = self.toks[tok_index].start
        floor = self.toks[tok_index - 1].end if tok_index else 0
        j = bisect.bisect_left(self.cstarts, start) - 1
        lead = start
        while j >= 0 and self.comments[j][0] >= floor:
            c0, c1 = self.comments[j]
            gap = self.text[c1:lead]
            if gap.strip() or gap.count("\n") > 1:
                break
            if self.text[self.text.rfind("\n", 0, c0) + 1:c0].strip():
                break
            lead = c0
            j -= 1
        return lead

    def _tail(self, end):
        j = bisect.bisect_left(self.cstarts, end)
        if j < len(self.comments):
            c0, c1 = self.comments[j]
            between = self.text[end:c0]
            if not between.strip() and "\n" not in between and "\n" not in self.text[c0:c1]:
                return c1
        return end

    # ---------------------------------------------------------------- grammar
    def parse_file(self) -> ProtoFile:
        pf = ProtoFile(self.name, self.text)
        while self.peek() is not None:
            if self.accept(";"):
                continue
            node = self.top_level()
            if isinstance(node, Statement) and node.kind == "syntax":
                pf.syntax = node.value
            elif isinstance(node, Statement) and node.kind == "package":
                pf.package = node.value
            pf.items.append(node)
        return pf

    def top_level(self):
        tok = self.peek()
        word = tok.text if tok.kind == "ident" else None
        if word == "message":
            return self.message()
        if word == "enum":
            return self.enum()
        if word == "extend":
            return self.extend()
        if word in ("syntax", "package", "option", "service"):
            return getattr(self, word)()
        if word == "import":
            return self.import_()
        self.error("expected message, enum, extend, service, option, import, package or syntax")

    def simple(self, kind, value_fn):
        first = self.i
        self.next()
        value = value_fn()
        end = self.expect(";").end
        return self.finish(Statement(kind=kind, value=value), first, end)

    def syntax(self):
        def value():
            self.expect("=")
            tok = self.next()
            if tok.kind != "str":
                self.error("expected a string", tok)
            return tok.text[1:-1]
        return self.simple("syntax", value)

    def package(self):
        return self.simple("package", lambda: self.full_ident("a package name"))

    def import_(self):
        def value():
            if self.peek().text in ("public", "weak") and self.peek().kind == "ident":
                self.next()
            tok = self.next()
            if tok.kind != "str":
                self.error("expected the imported file name as a string", tok)
            return tok.text[1:-1]
        return self.simple("import", value)

    def option(self):
        first = self.i
        self.next()
        self.option_body()
        end = self.expect(";").end
        st = self.finish(Statement(kind="option"), first, end)
        st.value = " ".join(st.key)
        return st

    def option_body(self):
        """``name = constant`` (also used inside ``[...]``); aggregate ``{...}`` values are skipped whole."""
        if self.accept("("):
            self.full_ident("an option name")
            self.expect(")")
        else:
            self.ident("an option name")
        while self.accept("."):
            self.ident("an option name")
        self.expect("=")
        tok = self.peek()
        if tok is not None and tok.text == "{" and tok.kind == "sym":
            self.skip_balanced("{", "}")
            return
        self.accept("-") or self.accept("+")
        tok = self.next()
        if tok.kind == "str":
            while self.peek() is not None and self.peek().kind == "str":   # "a" "b" concatenation
                self.next()
        elif tok.kind not in ("num", "ident"):
            self.error("expected an option value", tok)

    def service(self):
        first = self.i
        self.next()
        name = self.ident("a service name")
        end = self.skip_balanced("{", "}").end
        return self.finish(Statement(kind="service", value=name), first, end)

    def reserved_or_extensions(self):
        first = self.i
        kind = self.next().text
        end = self.until_semicolon().end
        st = self.finish(Statement(kind=kind), first, end)
        st.value = " ".join(st.key)
        return st

    def extend(self):
        first = self.i
        self.next()
        target = self.full_ident("the extended message")
        self.expect("{")
        fields = []
        while not self.accept("}"):
            if self.accept(";"):
                continue
            fields.append(self.field())
        end = self.toks[self.i - 1].end
        return self.finish(Statement(kind="extend", value=target, fields=fields), first, end)

    def message(self):
        first = self.i
        self.next()
        msg = Message(name=self.ident("a message name"))
        self.body(msg)
        return self.finish(msg, first, msg.close + 1)

    def body(self, msg):
        msg.open = self.expect("{").start
        while True:
            tok = self.peek()
            if tok is None:
                self.error("missing '}'")
            if tok.kind == "sym" and tok.text == "}":
                msg.close = self.next().start
                return
            if self.accept(";"):
                continue
            word = tok.text if tok.kind == "ident" else None
            if word == "message":
                msg.items.append(self.message())
            elif word == "enum":
                msg.items.append(self.enum())
            elif word == "oneof" and self.peek(2) is not None and self.peek(2).text == "{":
                msg.items.append(self.oneof())
            elif word == "option" and self.peek(1) is not None and self.peek(1).text != "=":
                msg.items.append(self.option())
            elif word in ("reserved", "extensions") and self.peek(1) is not None and self.peek(1).text != "=":
                msg.items.append(self.reserved_or_extensions())
            elif word == "extend" and self.peek(2) is not None and self.peek(2).text != "=":
                msg.items.append(self.extend())
            else:
                msg.items.append(self.field())

    def oneof(self):
        first = self.i
        self.next()
        one = Oneof(name=self.ident("a oneof name"))
        one.open = self.expect("{").start
        while not (self.peek() is not None and self.peek().text == "}" and self.peek().kind == "sym"):
            if self.accept(";"):
                continue
            if self.peek() is not None and self.peek().text == "option" and self.peek(1).text != "=":
                one.items.append(self.option())
                continue
            f = self.field(in_oneof=one.name)
            one.fields.append(f)
            one.items.append(f)
        one.close = self.next().start
        return self.finish(one, first, one.close + 1)

    def field(self, in_oneof=None):
        first = self.i
        f = Field(oneof=in_oneof)
        tok = self.peek()
        if tok is not None and tok.kind == "ident" and tok.text in LABELS and self.peek(1) is not None \
                and self.peek(1).text != "=":
            f.label = self.next().text
        if self.peek() is not None and self.peek().text == "map" and self.peek(1) is not None \
                and self.peek(1).text == "<":
            self.next()
            self.expect("<")
            key = self.ident("a map key type")
            self.expect(",")
            val = self.full_ident("a map value type")
            self.expect(">")
            f.type = f"map<{key},{val}>"
        elif self.peek() is not None and self.peek().text == "group" and self.peek(1) is not None \
                and self.peek(1).kind == "ident" and self.peek(1).text[:1].isupper():
            self.next()
            f.type = "group"
        else:
            f.type = self.full_ident("a field type")
        f.name = self.ident("a field name")
        self.expect("=", "'=' and the field number")
        number_tok = self.peek()
        f.number = self.integer("the field number")
        if not 1 <= f.number <= MAX_FIELD_NUMBER or RESERVED_FIELD_NUMBERS[0] <= f.number <= RESERVED_FIELD_NUMBERS[1]:
            self.error(f"field number {f.number} of '{f.name}' is not allowed (protoc takes 1 to {MAX_FIELD_NUMBER}, "
                       f"but not {RESERVED_FIELD_NUMBERS[0]} to {RESERVED_FIELD_NUMBERS[1]})", number_tok)
        if self.peek() is not None and self.peek().text == "[":
            open_ = self.next()
            self.option_body()
            while self.accept(","):
                self.option_body()
            close = self.expect("]", "',' or ']'")
            f.options = self.text[open_.end:close.start].strip()
        if f.type == "group":
            grp = Message(name=f.name)
            self.body(grp)
            f.type, f.name = f.name, f.name.lower()
            f.group = grp
            return self.finish(f, first, grp.close + 1)
        end = self.expect(";").end
        return self.finish(f, first, end)

    def enum(self):
        first = self.i
        self.next()
        en = Enum(name=self.ident("an enum name"))
        en.open = self.expect("{").start
        while True:
            tok = self.peek()
            if tok is None:
                self.error("missing '}'")
            if tok.kind == "sym" and tok.text == "}":
                en.close = self.next().start
                break
            if self.accept(";"):
                continue
            if tok.text == "option" and self.peek(1).text != "=":
                en.items.append(self.option())
            elif tok.text == "reserved" and self.peek(1).text != "=":
                en.items.append(self.reserved_or_extensions())
            else:
                vfirst = self.i
                val = EnumValue(name=self.ident("an enum value name"))
                self.expect("=")
                val.number = self.integer("the enum value number")
                if self.peek() is not None and self.peek().text == "[":
                    self.skip_balanced("[", "]")
                end = self.expect(";").end
                en.values.append(self.finish(val, vfirst, end))
                en.items.append(en.values[-1])
        return self.finish(en, first, en.close + 1)


def parse(text: str, name: str = "<proto>") -> ProtoFile:
    """Parse proto2 text into a :class:`ProtoFile`; raise :class:`ProtoSyntaxError` on bad syntax."""
    try:
        return _Parser(text, name).parse_file()
    except RecursionError:  # the parser descends once per nested message / enum / option brace
        raise ProtoSyntaxError(f"{name}: definitions nested too deeply to read") from None
