"""The values no one reads after a forward, let go during it (nets built with ``observed``).

A Net keeps every blob after a forward, as pycaffe does: a user may read any of them. A Net made by
``Net.from_graph(graph, observed=...)`` promises less: only the observed values, the inputs and the
outputs stay readable. The API's internal nets are such nets (the accuracy report's, the calibration's,
the fallback's candidates, label-free QAT's FP32 pass), and much of their memory is values read once,
soon after they are made: a Quant layer's output, read by its Convolution; the Convolution's
integer-valued output, read by its DeQuant; in a calibration net, every value its IFMR layers have seen.

:class:`Releases` lets such a value go as soon as its last reader has run: the blob then holds a
read-only stand-in of its shape (zeros, no memory of its own), and the array returns to the allocator,
which hands the memory to the values made next. Peak memory falls from the sum of the values to about
the most that are alive at once (measured in docs/performance.md: the embedded calibration of
open_nsfw at batch 8, 462 -> 252 MiB; the accuracy report, 1482 -> 1300 MiB). The bytes of every kept
value are unchanged.

Never let go: observed values, inputs, outputs, blobs Caffe shares with others (Split, Reshape,
Flatten...: a share group is rebound as one), the tops of layers whose shape depends on the data, and
values under :data:`MIN_BYTES` (not worth a step; it also keeps tiny nets' runs of native ops in one
call). An array something else still holds (a worker thread filling an IFMR histogram from it) lives
on until that holder is done: only the blob's reference goes. Only full forwards let values go; a
forward over a range of layers that would read one is refused (:meth:`Releases.check_range`), and so are
``forward(blobs=...)`` asking for one, ``forward(name=array)`` setting one and ``backward()``, whose
gradients would read them (:meth:`Releases.refuse`).
(Keeping the arrays in a pool for the next values of their size did not pay: most layers that make
these values, Quant / DeQuant / AntiQuant / Eltwise, write fresh arrays, so the pool only held memory.)
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.registry import layer_class

# Values smaller than this are kept (64 KiB: 16k float32).
MIN_BYTES = 1 << 16

_ZERO = np.zeros((), np.float32)
_ZERO.flags.writeable = False


def stand_in(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only float32 array of ``shape`` holding zeros, with no memory of its own."""
    return np.broadcast_to(_ZERO, shape)


def is_stand_in(arr: np.ndarray) -> bool:
    return arr.base is _ZERO or (arr.base is not None and arr.base.base is _ZERO)


class Releases:
    """Which values each layer of ``net`` lets go after it runs (module doc).

    ``keep``: the names of the values that must stay readable besides the inputs and outputs.
    """

    def __init__(self, net, keep: set[str]):
        names = net._layer_names  # noqa: SLF001 - the Net's own helper
        fixed = set(keep) | set(net.inputs) | set(net.outputs) | set(net._shared_with)  # noqa: SLF001
        last_reader: dict[str, int] = {}
        dynamic: set[str] = set()  # tops whose shape follows the data
        for i, name in enumerate(names):
            for b in net.bottom_names[name]:
                last_reader[b] = i
            if net.layers[i].shape_from_forward:
                dynamic.update(net.top_names[name])
        self._after: dict[int, list] = {}
        self.names: set[str] = set()  # the values let go
        for blob_name, i in last_reader.items():
            blob = net.blobs[blob_name]
            if blob_name in fixed or blob_name in dynamic or blob.data.nbytes < MIN_BYTES:
                continue
            self._after.setdefault(i, []).append(blob)
            self.names.add(blob_name)
            # the array the build gave it (not yet written) goes too, or the first forward would fill them all
            blob.data = stand_in(blob.shape)

    def __bool__(self) -> bool:
        return bool(self._after)

    def free(self, first: int, last: int) -> None:
        """After layers ``first``..``last`` ran: the values whose last reader is among them are let go."""
        for i in range(first, last + 1):
            for blob in self._after.get(i, ()):
                blob.data = stand_in(blob.shape)

    def steps(self, first: int, last: int, step):
        """``step`` (running layers ``first``..``last``) followed by :meth:`free`, or ``step`` itself when
        there is nothing to let go."""
        if not any(i in self._after for i in range(first, last + 1)):
            return step

        def then_free():
            step()
            self.free(first, last)
        return then_free

    def refuse(self, net, names, what: str) -> None:
        """A GraphError if ``what`` (a pycaffe call) would read or write one of ``names`` that this net lets go."""
        freed = [n for n in names if n in self.names]
        if freed:
            raise GraphError(f"{net._source}: {what} {freed}, which this net does not keep after a forward (built "  # noqa: SLF001
                             "with observed values only); build it without observed, or keeping those values")

    def check_range(self, net, start: int, stop: int) -> None:
        """Refuse a forward over layers ``start``..``stop - 1`` that would read a value an earlier full
        forward let go (it holds zeros now)."""
        names = net._layer_names  # noqa: SLF001
        made = set()
        for i in range(start, stop):
            for b in net.bottom_names[names[i]]:
                if b not in made and is_stand_in(net.blobs[b].data):
                    raise GraphError(f"{net._source}: layer '{names[i]}' reads '{b}', which this net does not "  # noqa: SLF001
                                     "keep after a forward (built with observed values only): run the whole net, "
                                     "or build it keeping that value")
            made.update(net.top_names[names[i]])


def shareable_values(graph) -> set[str]:
    """The tops of the graph's layers that Caffe may make one memory with their bottom or each other
    (ShareData: Split, Flatten, Reshape, a one-bottom Concat, an LSTM of one step...). An in-place layer
    writing over one would change them all (the Net rebinds a share group after such a write), so
    ``from_graph(observed=...)`` never writes over them."""
    values = set()
    for node in graph.nodes:
        cls = layer_class(node.type, node.name)
        if cls.shares_data or cls.shares_bottom_data is not Layer.shares_bottom_data \
                or cls.shared_tops is not Layer.shared_tops:
            values.update(node.tops)
    return values
