"""The pycaffe-compatible Net of the embedded executor.

``Net(prototxt, TEST)``, ``Net(prototxt, weights, TEST)`` or ``Net(prototxt, TEST, weights=...)``;
then ``net.blobs[name].data``, ``net.params[layer][i].data``, ``net.forward(**inputs)``,
``net.forward(start=..., end=...)``, ``net.reshape()``, ``net.save(path)`` as in pycaffe.

Blob naming follows Caffe: an in-place layer (top == bottom) overwrites its blob, so after a
forward ``blobs[name]`` holds the value after the last in-place layer. Caffe's automatic Split
layers are not inserted (layers never modify their inputs, so sharing a blob is safe).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import numpy as np

from amct_caffe import io
from amct_caffe.errors import GraphError, WeightsError
from amct_caffe.io.graph_io import graph_to_net
from amct_caffe.ir import check_producers
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.fillers import fill
from amct_caffe.runtime.record_sink import RecordSink
from amct_caffe.runtime.registry import layer_class

_LOG = logging.getLogger(__name__)
TRAIN, TEST = io.TRAIN, io.TEST


class Net:
    """A network ready to run forward on numpy float32 data."""

    def __init__(self, model, *args, weights=None, phase=None, seed: int = 0, records=None):
        weights_arg, phase_arg = None, None
        for a in args:  # pycaffe accepts (model, phase) and (model, weights, phase)
            if isinstance(a, int):
                phase_arg = a
            else:
                weights_arg = a
        weights = weights if weights is not None else weights_arg
        phase = phase if phase is not None else (phase_arg if phase_arg is not None else TEST)
        self.phase = phase
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            net_param, loaded = io.load_model(model, weights, phase)
            self._source = str(model)
        else:  # an in-memory NetParameter (already upgraded and filtered)
            net_param, loaded = model, OrderedDict()
            if weights is not None:
                loaded = weights if isinstance(weights, dict) else io.load_weights(weights)
            self._source = "<NetParameter>"
        self._weights_file = str(weights) if weights is not None and not isinstance(weights, dict) else None
        self.net_param = net_param
        self._rng = np.random.default_rng(seed)
        # record_file_path -> Record filled in memory by the calibration layers (no file is used)
        self._records = {os.path.abspath(p): r for p, r in (records or {}).items()}
        self._record_sinks: dict[str, RecordSink] = {}
        self._input_aliases: dict[str, str] = {}
        self._build(net_param, loaded, weights is not None)

    @classmethod
    def from_graph(cls, graph, phase: int | None = None, records=None, seed: int = 0) -> "Net":
        """A Net running an IR graph in memory (its nodes' params are the weights).

        ``records``: {record_file_path: Record} the calibration layers fill instead of the file.
        Blob names are the graph's (SSA: an in-place chain's intermediate values have their own names).
        """
        net_param, weights = graph_to_net(graph)
        # a graph without any weights is filled by its fillers, as Net(prototxt) would be
        net = cls(net_param, weights=weights or None, phase=phase, seed=seed, records=records)
        net._source = f"graph '{graph.name}'"
        # An input that a later in-place layer overwrites has an SSA name of its own in the graph;
        # forward(data=...) still means the model's input blob.
        net._input_aliases = {original: ssa for node in graph.nodes if node.type == "Input"
                              and node.layer_param is not None
                              for original, ssa in zip(node.layer_param.top, node.tops, strict=False)
                              if original != ssa}
        return net

    # ---------------------------------------------------------------- construction
    def _build(self, net_param, loaded, have_weights: bool) -> None:
        self.layers = []
        self._layer_names: list[str] = []
        self.bottom_names: OrderedDict[str, list[str]] = OrderedDict()
        self.top_names: OrderedDict[str, list[str]] = OrderedDict()
        self.blobs: OrderedDict[str, Blob] = OrderedDict()
        self.params: OrderedDict[str, list[Blob]] = OrderedDict()
        self.inputs: list[str] = []
        available: dict[str, None] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        seen_names: set[str] = set()
        check_producers([(lp.name, list(lp.bottom), list(lp.top)) for lp in net_param.layer], f"{self._source}: ")
        for lp in net_param.layer:
            if lp.name in seen_names:
                raise GraphError(f"{self._source}: two layers are named '{lp.name}'")
            seen_names.add(lp.name)
            cls = layer_class(lp.type, lp.name)
            cls.check_arity(lp)
            layer = cls(lp, self.phase)
            for b in lp.bottom:
                if b not in self.blobs:
                    raise GraphError(f"{self._source}: layer '{lp.name}' reads blob '{b}', which no earlier "
                                     "layer produces")
                available.pop(b, None)
            bottom_shapes = [shapes[b] for b in lp.bottom]
            self._setup_params(layer, bottom_shapes, loaded.get(lp.name), have_weights)
            top_shapes = layer.reshape(bottom_shapes)
            for t, s in zip(lp.top, top_shapes, strict=False):
                shapes[t] = tuple(s)
                if t not in self.blobs:
                    self.blobs[t] = Blob(s)
                available[t] = None
            if lp.type == "Input":
                self.inputs.extend(lp.top)
            self.layers.append(layer)
            self._layer_names.append(lp.name)
            self.bottom_names[lp.name] = list(lp.bottom)
            self.top_names[lp.name] = list(lp.top)
        # Caffe keeps the leftover blobs in a std::set: outputs come out sorted by name.
        self.outputs = sorted(available)
        self._shapes_seen: list = [None] * len(self.layers)
        self._layer_index = {n: i for i, n in enumerate(self._layer_names)}
        for i, layer in enumerate(self.layers):
            layer.on_net_built(self, i)

    def _setup_params(self, layer, bottom_shapes, arrays, have_weights: bool) -> None:
        shapes = (layer.param_shapes(bottom_shapes) if arrays is None
                  else layer.param_shapes_for_weights(bottom_shapes, arrays))
        where = f"{self._weights_file or 'weights'}: layer '{layer.name}' ({layer.type})"
        if arrays is not None:
            if len(arrays) != len(shapes):
                raise WeightsError(f"{where}: the caffemodel has {len(arrays)} blob(s) but the prototxt "
                                   f"needs {len(shapes)}")
            data = [io.conform_blob(a, s, f"{where} blob {i}")
                    for i, (a, s) in enumerate(zip(arrays, shapes, strict=True))]
        elif shapes and have_weights:
            raise WeightsError(f"{where}: the caffemodel has no weights for this layer (it needs "
                               f"{len(shapes)} blob(s) of shapes {[list(s) for s in shapes]}); check that "
                               "the layer names of the prototxt and the caffemodel match")
        else:
            fillers = list(layer.param_fillers()) + [None] * len(shapes)
            data = [fill(f, s, self._rng) for f, s in zip(fillers, shapes, strict=False)]
        # A deploy model's int8 weights / int32 bias run as float32 holding the integers (exact
        # for int8, and for int32 up to 2**24); packed uint64 parameters stay raw for DeQuant.
        layer.integer_params = any(np.issubdtype(np.asarray(d).dtype, np.integer) for d in data)
        # np.array, not ascontiguousarray: 0-axis blobs (PReLU channel_shared) must keep shape ().
        layer.blobs = [Blob(data=np.array(d, dtype=np.uint64 if np.asarray(d).dtype == np.uint64 else np.float32,
                                          order="C")) for d in data]
        if layer.blobs:
            self.params[layer.name] = layer.blobs

    def record_sink(self, path: str) -> RecordSink:
        """The one sink of this net's calibration layers writing the record ``path``."""
        key = os.path.abspath(path)
        if key not in self._record_sinks:
            self._record_sinks[key] = RecordSink(path, self._records.get(key))
        return self._record_sinks[key]

    # ---------------------------------------------------------------- pycaffe API
    @property
    def layer_dict(self):
        return OrderedDict(zip(self._layer_names, self.layers, strict=False))

    def reshape(self) -> None:
        """Propagate the input blobs' shapes through every layer (as ``caffe.Net.reshape``)."""
        for i in range(len(self.layers)):
            self._reshape_layer(i)

    def _reshape_layer(self, i: int) -> None:
        layer = self.layers[i]
        name = self._layer_names[i]
        bottom_shapes = [self.blobs[b].shape for b in self.bottom_names[name]]
        if layer.type == "Input":
            # Input tops keep whatever shape the user gave them (pycaffe's blob.reshape).
            if self._shapes_seen[i] is None:
                self._shapes_seen[i] = True
            return
        key = tuple(bottom_shapes)
        if self._shapes_seen[i] == key:
            return
        top_shapes = layer.reshape(bottom_shapes)
        for t, s in zip(self.top_names[name], top_shapes, strict=False):
            if t not in self.bottom_names[name]:
                self.blobs[t].reshape(s)
        self._shapes_seen[i] = key

    def _range(self, start, end) -> range:
        def index(n, default):
            if n is None:
                return default
            try:
                return self._layer_index[n]
            except KeyError:
                raise GraphError(f"no layer named '{n}' in {self._source}") from None
        return range(index(start, 0), index(end, len(self.layers) - 1) + 1)

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """Run layers ``start``..``end`` (names, inclusive); returns {output name: array}.

        Keyword arguments set input blobs first; an input of a new shape reshapes the net.
        """
        for name, value in kwargs.items():
            name = self._input_aliases.get(name, name)
            if name not in self.blobs:
                raise GraphError(f"forward() got data for '{name}', which is not a blob of {self._source} "
                                 f"(inputs: {self.inputs})")
            value = np.asarray(value, dtype=np.float32)
            blob = self.blobs[name]
            if value.shape != blob.shape:
                blob.reshape(value.shape)
            blob.data[...] = value
        for i in self._range(start, end):
            self._forward_layer(i)
        outs = list(self.outputs) if end is None else list(self.top_names[end])
        outs += list(blobs or [])
        return {o: self.blobs[o].data for o in dict.fromkeys(outs)}

    def _forward_layer(self, i: int) -> None:
        layer = self.layers[i]
        name = self._layer_names[i]
        if layer.type == "Input":
            return
        self._reshape_layer(i)
        bottoms = [self.blobs[b].data for b in self.bottom_names[name]]
        tops = layer.forward(bottoms)
        in_place = self.bottom_names[name]
        for t, arr in zip(self.top_names[name], tops, strict=False):
            blob = self.blobs[t]
            # An in-place top may legitimately change shape (Caffe's MVN reshapes to 4 axes).
            if arr.shape != blob.shape and not (layer.shape_from_forward or t in in_place):
                raise GraphError(f"layer '{name}' produced {t} of shape {arr.shape}, expected {blob.shape}")
            # Blobs are float32, except an INT8 layer's exact float64 accumulator (deploy model), which
            # goes on to its DeQuant unrounded.
            keep = arr.dtype == np.float32 or (layer.integer_params and arr.dtype == np.float64)
            blob.data = arr if keep else arr.astype(np.float32)

    def copy_from(self, weights_file) -> None:
        """Load weights into this net (pycaffe's ``copy_from``); blobs are replaced as at construction."""
        loaded = io.load_weights(weights_file)
        saved_source, self._weights_file = self._weights_file, str(weights_file)
        try:
            for i, layer in enumerate(self.layers):
                arrays = loaded.get(layer.name)
                if arrays is None:
                    continue
                bottom_shapes = [self.blobs[b].shape for b in self.bottom_names[layer.name]]
                self._setup_params(layer, bottom_shapes, arrays, True)
                self._shapes_seen[i] = None
        finally:
            self._weights_file = saved_source

    def save(self, path) -> None:
        """Write the current weights as a .caffemodel (atomically)."""
        weights = {layer.name: [b.data for b in layer.blobs] for layer in self.layers if layer.blobs}
        io.write_caffemodel(io.net_to_caffemodel(self.net_param, weights), path)


def set_mode_cpu() -> None:
    """The executor always runs on the CPU."""


def set_mode_gpu() -> None:
    _LOG.warning("the embedded executor has no GPU mode; running on the CPU")


def set_device(device_id: int) -> None:  # noqa: ARG001 - pycaffe signature
    _LOG.warning("the embedded executor has no GPU mode; set_device(%d) ignored", device_id)
