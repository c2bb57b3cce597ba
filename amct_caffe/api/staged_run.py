"""Running one graph over the same batches again and again, each time a little further.

The learned rounding (:mod:`amct_caffe.api.label_free_rounding`) measures the layers of a network
level by level: pass ``p`` needs every batch's activations up to the inputs of level ``p``, with
the layers of the lower levels already changed. Running the whole prefix again for every level
costs about ``levels^2 / 2`` layer forwards per batch (ResNet-50: some 25 whole forwards). A
:class:`StagedRun` runs each node once per batch instead: at the end of a pass it keeps, per batch,
the blobs that are *live* at the next pass's first node (made before it and read from it on), and
the next pass starts there with those blobs as its inputs.

That is only right when nothing before the next start changes afterwards: the caller names as the
next start a node no later than the first node any later change touches.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.io.schema import caffe_pb
from amct_caffe.ir import Graph, Node
from amct_caffe.runtime import TEST, Net


def live_blobs(graph: Graph, start: int) -> list[str]:
    """Blobs made by ``graph.nodes[:start]`` and read by ``graph.nodes[start:]``, in the order made."""
    read = {b for node in graph.nodes[start:] for b in node.bottoms}
    made = [t for node in graph.nodes[:start] for t in node.tops]
    return [b for b in dict.fromkeys(made) if b in read]


class StagedRun:
    """``graph`` (built by ``make_graph()`` at every pass: its weights may have changed, never its
    nodes) over a fixed list of batches, in passes that each run from ``start`` (a node index).

    Per pass: :meth:`open`; per batch :meth:`begin`, then :meth:`advance` to each node whose output
    is wanted and :meth:`blob`, then :meth:`finish`; then :meth:`close`.
    """

    def __init__(self, make_graph):
        self._make_graph = make_graph
        self.start = 0
        self._live: list[dict[str, np.ndarray]] = []  # per batch: the blobs live at ``start``

    def open(self, last: int, keep: int | None) -> None:
        """Build the net of nodes ``start..last``; ``keep``: the next pass's start (>= ``start``; its
        live blobs are kept as the pass runs), None: there is none."""
        graph = self._make_graph()
        self._names = [node.name for node in graph.nodes]
        last = max(last, keep - 1) if keep is not None else last
        nodes = list(graph.nodes[self.start:last + 1])
        prefix = []
        if self.start > 0:
            taken = set(self._names)
            for blob, value in self._live[0].items():
                name = blob + "_live"
                while name in taken:
                    name += "_"
                taken.add(name)
                lp = caffe_pb().LayerParameter(name=name, type="Input", top=[blob])
                lp.input_param.shape.add().dim.extend(value.shape)
                prefix.append(Node(name, "Input", [], [blob], [], lp, origin=[]))
        self._net = Net.from_graph(Graph(graph.name, [*prefix, *nodes]), TEST)
        self._first = prefix[0].name if prefix else None
        self._keep = keep
        self._keep_names = live_blobs(graph, keep) if keep is not None and keep > self.start else None
        self._kept: list[dict[str, np.ndarray]] = []

    def begin(self, batch: int, feed: dict[str, np.ndarray]) -> None:
        """Start batch number ``batch``: the blobs kept by the last pass, and those of the model's
        inputs ``feed`` whose Input layers this pass holds (a prototxt may declare an input after
        other layers: its Input then falls in a later pass)."""
        inputs = {k: v for k, v in feed.items() if k in self._net.blobs}
        if self.start == 0:
            self._net.forward(start=self._names[0], end=self._names[0], **inputs)  # an Input: sets the data
            self._pos = 1
        else:
            if self._first is not None:
                self._net.forward(start=self._first, end=self._first, **{**inputs, **self._live[batch]})
            else:
                for name, value in inputs.items():  # set as forward(**inputs) would, running no layer
                    value = np.asarray(value, np.float32)
                    if value.shape != self._net.blobs[name].shape:
                        self._net.blobs[name].reshape(value.shape)
                    self._net.blobs[name].data[...] = value
            self._pos = self.start
        self._pending = self._keep_names is not None

    def advance(self, index: int) -> None:
        """Run the nodes up to ``index`` (inclusive) that this batch has not run yet."""
        if self._pending and index >= self._keep - 1:
            self._run(self._keep - 1)
            self._kept.append({b: np.array(self._net.blobs[b].data) for b in self._keep_names})
            self._pending = False
        self._run(index)

    def blob(self, name: str) -> np.ndarray:
        return np.asarray(self._net.blobs[name].data, np.float32)

    def finish(self) -> None:
        """End the batch (running on to the next pass's start if no read went that far)."""
        if self._pending:
            self.advance(self._keep - 1)

    def close(self) -> None:
        if self._keep_names is not None:
            self._live, self.start = self._kept, self._keep
        self._net = None

    def _run(self, index: int) -> None:
        if index >= self._pos:
            self._net.forward(start=self._names[self._pos], end=self._names[index])
            self._pos = index + 1
