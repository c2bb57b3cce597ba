"""Which blobs of a Net are one memory in Caffe.

Caffe's ShareData makes a top the very memory of its bottom (Flatten, Reshape, Split, a one-bottom
Concat, a one-top Slice, an identity Permute), and some layers give two tops one memory (an LSTM's
exposed hidden state at T = 1): an in-place write into any of them is seen through all. The Net
joins such blobs as it builds and rebinds every member of a group to an in-place result.
"""

from __future__ import annotations


class ShareGroups:
    """A union-find over blob names: :meth:`join` two blobs, then :meth:`members` of every group."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def _root(self, name: str) -> str:
        while self._parent.get(name, name) != name:
            name = self._parent[name]
        return name

    def join(self, a: str, b: str) -> None:
        """Put ``a`` and ``b`` (and their groups) in one group."""
        self._parent.setdefault(a, a)
        self._parent.setdefault(b, b)
        ra, rb = self._root(a), self._root(b)
        if ra != rb:
            self._parent[ra] = rb

    def members(self) -> dict[str, list[str]]:
        """{blob: every blob of its group, itself included, in the order they were first joined}, for the
        blobs joined at least once."""
        groups: dict[str, list[str]] = {}
        for name in self._parent:
            groups.setdefault(self._root(name), []).append(name)
        return {name: members for members in groups.values() for name in members}
