"""Text surgery for the merge: edits on a source string, and copying a definition to a new indentation."""

from __future__ import annotations

__all__ = ["Edits", "column", "line_indent", "member_indent", "reindent", "insert_before_close"]


class Edits:
    """Non-overlapping replacements ``(start, end, text)`` on one string, applied in one pass.

    Insertions at the same offset keep the order in which they were added.
    """

    def __init__(self):
        self._edits = []

    def __bool__(self):
        return bool(self._edits)

    def replace(self, start: int, end: int, text: str):
        self._edits.append((start, end, len(self._edits), text))

    def insert(self, pos: int, text: str):
        self.replace(pos, pos, text)

    def apply(self, source: str, start: int = 0, end: int | None = None) -> str:
        """``source[start:end]`` with the edits that fall inside it applied (offsets are into ``source``)."""
        end = len(source) if end is None else end
        out, pos = [], start
        for a, b, _, text in sorted(self._edits, key=lambda e: (e[0], e[1], e[2])):
            if a < start or b > end:
                continue
            if a < pos:
                raise ValueError(f"overlapping edits at offset {a}")
            out += [source[pos:a], text]
            pos = b
        out.append(source[pos:end])
        return "".join(out)


def column(text: str, pos: int) -> int:
    return pos - (text.rfind("\n", 0, pos) + 1)


def line_indent(text: str, pos: int) -> str:
    """The whitespace that starts the line holding ``pos``."""
    start = text.rfind("\n", 0, pos) + 1
    end = start
    while end < len(text) and text[end] in " \t":
        end += 1
    return text[start:end]


def member_indent(text: str, node) -> str:
    """Indentation of the members of a message/enum/oneof ``node`` (its first member's, else its own + 2)."""
    items = [it for it in getattr(node, "items", ()) if it.start > node.open]
    if items:
        first = items[0].lead
        if "\n" in text[node.open:first]:
            return line_indent(text, first)
    return line_indent(text, node.start) + "  "


def reindent(snippet: str, from_col: int, indent: str, first: bool = True) -> str:
    """Move a snippet whose lines are indented by ``from_col`` to ``indent``: later lines lose up to
    ``from_col`` leading blanks and gain ``indent``; the first line (which starts at the definition) gains
    ``indent`` only when ``first``. Blank lines stay empty."""
    lines = snippet.split("\n")
    out = [(indent if first else "") + lines[0]]
    for line in lines[1:]:
        k = 0
        while k < from_col and k < len(line) and line[k] in " \t":
            k += 1
        rest = line[k:]
        out.append(indent + rest if rest.strip() else "")
    return "\n".join(out)


def insert_before_close(edits: Edits, text: str, close: int, block_lines: list[str]):
    """Insert whole lines before the ``}`` at ``close``, keeping that brace where it is on its own line."""
    if not block_lines:
        return
    block = "\n".join(block_lines)
    start_of_line = text.rfind("\n", 0, close) + 1
    if not text[start_of_line:close].strip():
        edits.insert(start_of_line, block + "\n")
    else:
        edits.insert(close, "\n" + block + "\n" + line_indent(text, close))
