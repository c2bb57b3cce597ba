"""The pycaffe-compatible Net of the embedded executor.

``Net(prototxt, TEST)``, ``Net(prototxt, weights, TEST)`` or ``Net(prototxt, TEST, weights=...)``;
then ``net.blobs[name].data``, ``net.params[layer][i].data``, ``net.forward(**inputs)``,
``net.forward(start=..., end=...)``, ``net.reshape()``, ``net.save(path)`` as in pycaffe.

Blob naming follows Caffe: an in-place layer (top == bottom) overwrites its blob, so after a
forward ``blobs[name]`` holds the value after the last in-place layer. Caffe's automatic Split
layers are not inserted (layers never modify their inputs, so sharing a blob is safe); the
backward pass reproduces them where they matter, in the diffs (:mod:`.backward`).

Where Caffe makes a top the very memory of its bottom (ShareData: Flatten, Reshape, Split, a
one-bottom Concat, a one-top Slice, an identity Permute), an in-place layer on one of those
blobs changes all of them; the Net rebinds every blob of such a group to the in-place result.

``ifmr`` chooses the observer of the IFMR calibration layers: ``"stream"`` (the default) keeps a
fine histogram per layer and the exact search's values for small layers
(:mod:`amct_caffe.quant.ifmr_stream`), ``"exact"`` keeps every value and runs the exact search,
as the vendor's Caffe layer and caffe_patch's do (the parity tests against patched Caffe use it).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Collection

import numpy as np

from amct_caffe import io
from amct_caffe.errors import GraphError, WeightsError, out_of_memory
from amct_caffe.io.graph_io import graph_to_net
from amct_caffe.ir import check_producers
from amct_caffe.runtime import fold as folding
from amct_caffe.runtime import forward, memory
from amct_caffe.runtime.backward import DiffStore, as_shape, blob_loss_weights, own_diffs, plan_backward
from amct_caffe.runtime.batches import WholeSetCalls
from amct_caffe.runtime.blob import AS_CAFFE, Blob, check_not_empty_at_build, check_param_shapes, check_top_shape
from amct_caffe.runtime.param_sharing import ParamSharing, share_trained_layers
from amct_caffe.runtime.record_sink import RecordSink
from amct_caffe.runtime.registry import layer_class
from amct_caffe.runtime.release import Releases, shareable_values
from amct_caffe.runtime.seed import random_seed
from amct_caffe.runtime.share_groups import ShareGroups
from amct_caffe.runtime.threads import adapt as adapt_threads

_LOG = logging.getLogger(__name__)
IFMR_MODES = ("stream", "exact")
TRAIN, TEST = io.TRAIN, io.TEST


class Net(WholeSetCalls):
    """A network ready to run forward on numpy float32 data."""

    def __init__(self, model, *args, weights=None, phase=None, level: int = 0, stages=None, seed: int | None = None,
                 records=None, fold: str = "auto", ifmr: str = "stream"):
        # pycaffe's two forms: (model, phase, level=0, stages=None, weights=None) and (model, weights, phase)
        form = (("weights", "phase") if args and not isinstance(args[0], (int, np.integer))
                else ("phase", "level", "stages", "weights"))
        if len(args) > len(form):
            raise GraphError(f"Net: {len(args)} positional arguments; pycaffe takes (model, {', '.join(form)})")
        named = dict(zip(form, args, strict=False))
        weights = weights if weights is not None else named.get("weights")
        phase = phase if phase is not None else named.get("phase", TEST)
        level = named.get("level", level)
        stages = named.get("stages", stages)
        if phase not in (TRAIN, TEST):
            raise GraphError(f"Net: phase must be TRAIN ({TRAIN}) or TEST ({TEST}), got {phase!r}")
        self.phase = phase
        stages = [stages] if isinstance(stages, str) else list(stages or ())
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or \
                not all(isinstance(s, str) for s in stages):
            raise GraphError(f"Net: level must be an integer and stages strings, got {level!r} and {stages!r}")
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            net_param, loaded = io.load_model(model, weights, phase, level=int(level), stages=stages, finite=False)
            io.clear_batchnorm_param_specs(net_param, str(model))  # as Caffe's reading of a net file
            self._source = str(model)
        else:  # an in-memory NetParameter (already upgraded and filtered)
            net_param, loaded = model, OrderedDict()
            if weights is not None:
                loaded = weights if isinstance(weights, dict) else io.load_weights(weights, finite=False)
            self._source = "<NetParameter>"
        self._weights_file = str(weights) if weights is not None and not isinstance(weights, dict) else None
        self.net_param = net_param
        self._rng = np.random.default_rng(random_seed() if seed is None else seed)  # fillers (runtime/seed.py)
        # record_file_path -> Record filled in memory by the calibration layers (no file is used)
        self._records = {os.path.abspath(p): r for p, r in (records or {}).items()}
        self._record_sinks: dict[str, RecordSink] = {}
        self._input_aliases: dict[str, str] = {}
        self.after_forward: list = []  # called at the end of every forward (layers/calibration_overlap.py)
        self._releases = None  # from_graph(observed=...): the values a full forward frees (runtime/release.py)
        # in-place chains after convolutions: "auto", "exact", "fast", "calibration", "off" (runtime/fold.py)
        self._fold = fold
        if ifmr not in IFMR_MODES:
            raise GraphError(f"Net: ifmr must be one of {IFMR_MODES}, got {ifmr!r}")
        self.ifmr = ifmr  # the calibration layers' IFMR observer (runtime/layers/calibration.py)
        try:
            with np.errstate(**AS_CAFFE):  # the layers' setup computes like their forward (a PriorBox's sizes)
                self._build(net_param, loaded, weights is not None)
        except MemoryError as e:
            raise out_of_memory(e, f"building the net of {self._source}") from None

    @classmethod
    def from_graph(cls, graph, phase: int | None = None, records=None, seed: int = 0, ifmr: str = "stream",
                   observed: Collection[str] | None = None, fold: str | None = None) -> "Net":
        """A Net running an IR graph in memory (its nodes' params are the weights), blobs named as the graph's
        (SSA). ``records``: {record_file_path: Record} the calibration layers fill instead of the file.
        ``observed``: only these values (and the inputs) need to be readable after a forward; the layers the
        source computed in place write over the others again (io.graph_io.in_place_names), so their values
        share memory and the chains fold as in a Net of the source's prototxt; ``fold`` (see ``Net``) then
        defaults to ``"exact"``, so that the observed values keep the SSA net's bytes, else to ``"auto"``."""
        if fold is None:
            fold = "auto" if observed is None else "exact"
        keep = None if observed is None else set(observed) | set(graph.inputs) | shareable_values(graph)
        net_param, weights = graph_to_net(graph, in_place=keep is not None, keep=keep or ())
        # a graph without any weights is filled by its fillers, as Net(prototxt) would be
        net = cls(net_param, weights=weights or None, phase=phase, seed=seed, records=records, ifmr=ifmr,
                  fold=fold)
        net._source = f"graph '{graph.name}'"
        net._memory_kept = []  # the API's own nets: no script holds their arrays
        if keep is not None:
            net._releases = Releases(net, keep) or None
        # an input a later in-place layer overwrites has an SSA name in the graph; forward(data=...) means the input
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
        self._sharing = ParamSharing(self._source)  # the learnable blobs, Caffe's param sharing
        shared = ShareGroups()  # the blobs Caffe makes one memory (ShareData)
        available: dict[str, None] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        seen_names: set[str] = set()
        # Caffe's CopyTrainedLayersFrom copies the layers the caffemodel names and leaves the others as their
        # fillers made them (fine-tuning a renamed or new layer); a caffemodel naming none of them is refused
        self._some_weights_loaded = have_weights and any(lp.name in loaded for lp in net_param.layer)
        check_producers([(lp.name, list(lp.bottom), list(lp.top), list(lp.loss_weight)) for lp in net_param.layer],
                        f"{self._source}: ")
        for lp in net_param.layer:
            if lp.name in seen_names:
                raise GraphError(f"{self._source}: two layers are named '{lp.name}' (Caffe runs it): rename one")
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
            self._setup_params(layer, bottom_shapes, io.layer_blobs(loaded, lp.name), have_weights)
            where = f"{self._source}: layer '{lp.name}' ({lp.type})"
            top_shapes = [check_top_shape(where, t, s) for t, s in zip(lp.top, layer.reshape(bottom_shapes),
                                                                         strict=False)]
            if lp.type != "Input" and not layer.shape_from_forward:
                for t, s in zip(lp.top, top_shapes, strict=False):
                    check_not_empty_at_build(where, t, s)
            if lp.bottom and layer.shares_bottom_data(bottom_shapes):
                for t in lp.top:
                    shared.join(t, lp.bottom[0])
            for i, j in layer.shared_tops(bottom_shapes):
                shared.join(lp.top[i], lp.top[j])
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
        self._reshapes = 0  # layer reshapes so far: a partial forward or reshape() that made any drops the steps
        self._layer_index = {n: i for i, n in enumerate(self._layer_names)}
        self._shared_with = shared.members()
        # the blobs whose arrays stay theirs across forwards, as pycaffe's (forward.keep_memory): the outputs but
        # the inputs and those Caffe shares with another blob; none in the nets the API builds from graphs
        sources = {t for layer, tops in zip(self.layers, self.top_names.values(), strict=True) if not layer.lp.bottom
                   for t in tops}  # a data layer's tops may be views of the user's arrays (MemoryData): theirs
        self._memory_kept = [n for n in self.outputs if n not in self._shared_with and n not in sources]
        self._plan = plan_backward(self.layers, list(self.bottom_names.values()), list(self.top_names.values()),
                                   bool(net_param.force_backward))
        for layer, flags in zip(self.layers, self._plan.param_propagate_down, strict=True):
            layer.param_propagate_down = flags
        self._diffs = DiffStore(self.blobs)
        self._held_top_diff: dict[int, int] = {}  # layer -> the diff memory its top had at its forward
        self._chains = folding.plan(self.layers, list(self.bottom_names.values()), list(self.top_names.values()),
                                    folding.resolve_mode(self._fold, [lp.type for lp in net_param.layer], self.ifmr),
                                    any(s.need_backward for s in self._plan.steps), self._plan.loss_weights,
                                    set(self._shared_with))
        self._bounded_run = any(layer.bounded_run for layer in self.layers)  # a calibration net (runtime/memory.py)
        self._loss_tops = [(self.blobs[t], w) for name, seeds in zip(self._layer_names, self._plan.diff_seeds,
                                                                      strict=True)
                           for t, w in zip(self.top_names[name], seeds, strict=False) if w]
        self._seed_loss_diffs()
        for i in range(len(self.layers)):  # Caffe's Net::Init runs every layer's Reshape once
            self._share_diffs(i, "reshape")
        self._loss, self._forwarded = 0.0, None  # the inputs' shapes at the last forward (backward's check)
        self._steps, self._steps_key = None, None  # forward.prepare's, for these input shapes
        for i, layer in enumerate(self.layers):
            layer.on_net_built(self, i)

    def _setup_params(self, layer, bottom_shapes, arrays, have_weights: bool) -> None:
        shapes = (layer.param_shapes(bottom_shapes) if arrays is None
                  else layer.param_shapes_for_weights(bottom_shapes, arrays))
        check_param_shapes(f"layer '{layer.name}' ({layer.type})", shapes)
        where = f"{self._weights_file or 'weights'}: layer '{layer.name}' ({layer.type})"
        arrays_given = arrays is not None
        if arrays_given:
            if len(arrays) != len(shapes):
                raise WeightsError(f"{where}: the caffemodel has {len(arrays)} blob(s) but the prototxt "
                                   f"needs {len(shapes)} (Caffe: Incompatible number of blobs)")
            data = [io.conform_blob(a, s, f"{where} blob {i}")
                    for i, (a, s) in enumerate(zip(arrays, shapes, strict=True))]
        else:
            if shapes and have_weights and not layer.weights_optional \
                    and not self._sharing.all_shared(layer.lp.param, len(shapes)):
                if not self._some_weights_loaded:
                    raise WeightsError(f"{where}: the caffemodel has no weights for this layer (it needs "
                                       f"{len(shapes)} blob(s) of shapes {[list(s) for s in shapes]}), nor for any "
                                       "other layer of the net; check that the layer names of the prototxt and the "
                                       "caffemodel match")
                _LOG.warning("%s: the caffemodel has no weights for this layer; its blobs come from its fillers, "
                             "as Caffe leaves a layer the caffemodel does not name (a new layer to train)", where)
            data = layer.initial_params(shapes, self._rng)
        # a deploy model's int8 weights / int32 bias run as float32 (exact to 2**24), packed uint64 stays for DeQuant
        layer.integer_params = any(np.issubdtype(np.asarray(d).dtype, np.integer) for d in data)
        # np.array, not ascontiguousarray: 0-axis blobs (PReLU channel_shared) must keep shape ().
        arrays = [np.array(d, dtype=np.uint64 if np.asarray(d).dtype == np.uint64 else np.float32, order="C")
                  for d in data]
        if layer.blobs and len(layer.blobs) == len(arrays):
            # copy_from: keep the Blob objects, which other layers (param sharing) and nets
            # (share_with) may hold; write in place when the shape allows, as Caffe copies
            for blob, arr in zip(layer.blobs, arrays, strict=True):
                if blob.data.shape == arr.shape and blob.data.dtype == arr.dtype:
                    blob.data[...] = arr
                else:
                    blob.data = arr
            return
        layer.blobs = layer.make_param_blobs(arrays)
        self._sharing.add(layer, loaded=arrays_given)
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
        before = self._reshapes
        for i, layer in enumerate(self.layers):
            if layer.runs_user_code:  # a Python layer's own reshape, on the blobs' data, as Caffe's Net::Reshape
                layer.reshape_on([self.blobs[b].data for b in self.bottom_names[self._layer_names[i]]])
                self._shapes_seen[i] = None  # its tops take the shapes it gave
            self._reshape_layer(i)
        if self._reshapes != before:
            self._steps, self._forwarded = None, None  # prepared for other shapes (forward.prepare); no forward yet

    def set_input_arrays(self, data, labels) -> None:
        """pycaffe's ``set_input_arrays``: give the first layer, a MemoryData, its arrays ``data`` float32 (M, C,
        H, W), ``labels`` float32 (M,) or (M, 1, 1, 1); pycaffe's checks (:class:`.layers.array_data.MemoryData`)."""
        if not self.layers or self.layers[0].type != "MemoryData":
            raise GraphError(f"{self._source}: set_input_arrays may only be called if the first layer is a "
                             "MemoryData layer")
        self.layers[0].set_input_arrays(data, labels)

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
        # the memo holds its tops' shapes too: prepared steps may have changed them since a partial forward
        seen = self._shapes_seen[i]
        if seen is not None and seen[0] == key and all(self.blobs[t].shape == s for t, s in seen[1]):
            return
        top_shapes = layer.reshape(bottom_shapes)
        self._reshapes += 1
        own = [t for t in self.top_names[name] if t not in self.bottom_names[name]]
        for t, s in zip(self.top_names[name], top_shapes, strict=False):
            if t in own:
                self.blobs[t].reshape(s)
        # (bottom shapes, own tops' shapes, every top's shape as the layer gave it: its backward's view)
        self._shapes_seen[i] = (key, tuple((t, self.blobs[t].shape) for t in own), tuple(map(tuple, top_shapes)))

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
        """Run layers ``start``..``end`` (names, inclusive); returns {output name: array}. Keyword arguments
        set input blobs first; an input of a new shape reshapes the net."""
        try:
            if self._bounded_run:  # a calibration net: no huge-page hint, a core for its IFMR worker (memory.py)
                with np.errstate(**AS_CAFFE), memory.calibration_forward(self.layers):
                    return self._forward(blobs, start, end, kwargs)
            with np.errstate(**AS_CAFFE):  # (alone: a small net's forward takes some 15 microseconds)
                return self._forward(blobs, start, end, kwargs)
        except MemoryError as e:
            raise out_of_memory(e, f"running {self._source}") from None

    def _forward(self, blobs, start, end, kwargs: dict):
        if self._releases is not None:
            self._releases.refuse(self, [self._input_aliases.get(n, n) for n in kwargs], "forward() was given data for")
            self._releases.refuse(self, list(blobs or []), "forward(blobs=...) asks for")
        span = None if start is None and end is None else self._range(start, end)  # None: every layer
        forward.set_inputs(self, kwargs, span)
        adapt_threads()  # BLAS threads follow the machine's load (runtime/threads.py)
        held = forward.held_arrays(self)
        self._loss = 0.0
        if span is None or len(span) == len(self.layers):
            key = tuple([self.blobs[t].data.shape for t in self.inputs])
            if self._steps is not None and self._steps_key == key:
                for step in self._steps:  # the prepared steps of forward.py: same shapes as last time
                    step()
            else:
                produced = [None] * len(self.layers)
                forward.run(self, 0, len(self.layers), produced, self._releases)
                self._steps, self._steps_key = forward.prepare(self, produced), key
        else:
            if self._releases is not None:
                self._releases.check_range(self, span.start, span.stop)
            before = self._reshapes
            forward.run(self, span.start, span.stop)
            if self._reshapes != before:  # blobs of other shapes than the prepared steps were made for
                self._steps = None
        self._forwarded = tuple(self.blobs[t].data.shape for t in self.inputs)  # what backward() may follow
        for done in self.after_forward:
            done()
        forward.keep_memory(self, held)
        del held
        if self._loss_tops:
            self._seed_loss_diffs(stale_only=True)  # before anyone reads a diff that no longer fits
        if end is None and not blobs:  # (self.outputs has no repeats)
            return {o: self.blobs[o].data for o in self.outputs}
        outs = list(self.outputs) if end is None else list(self.top_names[end])
        outs += list(blobs or [])
        missing = [o for o in outs if o not in self.blobs]
        if missing:
            raise GraphError(f"forward(blobs=...): {missing} are not blobs of {self._source}")
        return {o: self.blobs[o].data for o in dict.fromkeys(outs)}

    # ---------------------------------------------------------------- training
    @property
    def loss(self) -> float:
        """Weighted loss of the layers the last ``forward`` ran (Caffe's ForwardFromTo value)."""
        return self._loss

    def _seed_loss_diffs(self, stale_only: bool = False) -> None:
        """Caffe's SetLossWeights: a loss top's diff holds its weight, the backward's seed. ``stale_only`` (after
        each forward): only the loss tops whose shape changed (a new batch size, a Filter's item count), whose
        diff no longer fits: Caffe keeps the weights in the diff's memory when a top shrinks. (When it grows,
        Caffe reallocates the diff as zeros, and its loss and gradients vanish; the executor keeps the weights.)"""
        for blob, w in self._loss_tops:
            if stale_only and blob._diff is not None and blob._diff.shape == blob.shape:  # noqa: SLF001
                continue
            blob.diff = np.full(blob.shape, w, np.float32)

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """Back-propagate from layer ``start`` down to layer ``end`` (names, inclusive), as pycaffe; the sums of
        the blobs the layer below ``end`` writes that several layers read (Caffe's Split layers) end the range.
        Keyword arguments set the diffs of the net's outputs first (all of them, as pycaffe requires). Returns
        {name: diff} for the inputs (or ``end``'s bottoms) and ``diffs``.
        Gradients of learned blobs accumulate in ``params[layer][i].diff`` until cleared."""
        try:
            with np.errstate(**AS_CAFFE):
                return self._backward(diffs, start, end, kwargs)
        except MemoryError as e:
            raise out_of_memory(e, f"back-propagating through {self._source}") from None

    def _backward(self, diffs, start, end, kwargs: dict):
        if self._forwarded != tuple(self.blobs[t].data.shape for t in self.inputs):  # (a loss's softmax, a mask...)
            raise GraphError(f"{self._source}: backward() needs a forward() at the net's current input shapes first: "
                             "the layers' backward reads what their forward left")
        if self._releases is not None:
            self._releases.refuse(self, sorted(self._releases.names), "backward() would read")
        missing = [d for d in diffs or () if d not in self.blobs]
        if missing:
            raise GraphError(f"backward(diffs=...): {missing} are not blobs of {self._source}")
        if kwargs:
            if set(kwargs) != set(self.outputs):
                raise GraphError(f"backward() got top diffs for {sorted(kwargs)}; give one for each output of "
                                 f"{self._source}: {self.outputs}")
            for top, diff in kwargs.items():
                blob = self.blobs[top]
                diff = np.asarray(diff, dtype=np.float32)
                if diff.shape[:1] != blob.shape[:1] or diff.size != int(np.prod(blob.shape)):
                    raise GraphError(f"backward(): the diff of '{top}' has shape {list(diff.shape)}, the blob "
                                     f"{list(blob.shape)}")
                self._diffs.set(top, diff.reshape(blob.shape))
        elif start is None:
            # diffs set through net.blobs[o].diff land in memory other blobs may share (Caffe's ShareDiff)
            for top in self.outputs:
                self._diffs.set(top, self.blobs[top].diff)
        steps = self._plan.steps
        first = len(steps) - 1 if start is None else self._plan.step_of_layer[self._range(start, None)[0]]
        last = 0 if end is None else self._plan.step_of_layer[self._range(end, None)[0]]
        while end is not None and last > 0 and steps[last - 1].layer is None:
            last -= 1  # the splits just below end (Caffe's are layers stepped by name; ours run at the end of a range)
        for s in range(first, last - 1, -1):
            if steps[s].need_backward:
                self._backward_step(steps[s])
        outs = (list(self.bottom_names[end]) if end is not None else list(self.inputs)) + list(diffs or [])
        return {o: self.blobs[o].diff for o in dict.fromkeys(outs)}

    def _backward_step(self, step) -> None:
        if step.layer is None:  # Caffe's SplitLayer::Backward_cpu: the readers' diffs add up
            if not step.bottom_need_backward[0]:
                return
            parts = [self._diffs.get(key) for key in step.top_keys]
            # ((d0 + d1) + d2) ...: caffe_add, then caffe_axpy; one new array for the sum
            total = np.add(parts[0], parts[1], dtype=np.float32) if len(parts) > 1 else parts[0].copy()
            for part in parts[2:]:
                np.add(total, part, out=total)
            if step.split_loss_weight:
                total += np.float32(step.split_loss_weight)
            self._diffs.set(step.bottom_keys[0], total)
            return
        layer = self.layers[step.layer]
        name = self._layer_names[step.layer]
        self._share_diffs(step.layer, "backward")
        if not any(step.bottom_need_backward) and not any(layer.param_propagate_down):
            return  # Caffe's layers without a backward (Input, Accuracy...) only fail when asked for one
        if not layer.has_backward():
            raise GraphError(f"{self._source}: layer '{name}' ({layer.type}) needs a backward pass, which the "
                             "embedded runtime does not have for this type; set propagate_down: false or "
                             "lr_mult: 0 so no gradient has to cross it (force_backward overrides propagate_down)")
        bottom_names = self.bottom_names[name]
        # blobs in the shapes the layer gave them (a later in-place MVN or Unsqueeze reshapes them: backward.as_shape)
        seen = self._shapes_seen[step.layer]
        top_shapes, bottom_shapes = (seen[2], seen[0]) if isinstance(seen, tuple) else ((), ())
        tops = [as_shape(self.blobs[t].data, top_shapes, k) for k, t in enumerate(self.top_names[name])]
        top_diffs = [as_shape(self.blobs[t].diff, top_shapes, k) for k, t in enumerate(self.top_names[name])]
        if step.layer in self._held_top_diff:
            top_diffs[0] = self._diffs.held(self._held_top_diff[step.layer], top_diffs[0].shape)
        bottoms = [as_shape(self.blobs[b].data, bottom_shapes, k) for k, b in enumerate(bottom_names)]
        grads = layer.backward(top_diffs, list(step.bottom_need_backward), bottoms, tops)
        if len(grads) != len(bottoms):
            raise GraphError(f"layer '{name}' ({layer.type}) returned {len(grads)} bottom diffs for "
                             f"{len(bottoms)} bottoms")
        if layer.diff_sharing([b.shape for b in bottoms]) == "reshape":
            return  # Caffe's backward is empty: the bottom's diff is the top's memory (or detached from it)
        grads = own_diffs(grads, top_diffs, bottom_names, self.top_names[name])
        for k, (key, grad) in enumerate(zip(step.bottom_keys, grads, strict=True)):
            if grad is None or not (step.bottom_need_backward[k] or layer.writes_unpropagated_diffs):
                continue
            self._diffs.set(key, np.asarray(grad, dtype=np.float32).reshape(self.blobs[bottom_names[k]].shape))

    def _share_diffs(self, i: int, when: str) -> None:
        """Replay the ShareDiff that layer ``i`` makes at ``when`` (see :meth:`Layer.diff_sharing`)."""
        layer = self.layers[i]
        name = self._layer_names[i]
        if not self.bottom_names[name] or not self.top_names[name]:
            return
        if layer.diff_sharing([self.blobs[b].shape for b in self.bottom_names[name]]) != when:
            return
        bottom = self._plan.steps[self._plan.step_of_layer[i]].bottom_keys[0]  # a virtual split's top
        top = self.top_names[name][0]
        if when == "reshape":
            self._diffs.share(top, bottom)
        else:
            self._diffs.share(bottom, top)

    def clear_param_diffs(self) -> None:
        """Zero every learned blob's diff in place (Caffe's Net::ClearParamDiffs, a memset)."""
        for blob, _, _ in self._sharing.learnable:
            blob.diff.fill(0.0)

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        """pycaffe's {blob: the loss weight a layer gives it as its top} (0.0 for every other blob)."""
        return blob_loss_weights(self.blobs, self.layers, self.top_names.values())

    def learnable_params(self) -> list[tuple[Blob, float, float]]:
        """(blob, lr_mult, decay_mult) for each blob a solver updates; a shared param once."""
        return list(self._sharing.learnable)

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s learned blobs (by layer name) as this net's, as Caffe's ShareTrainedLayersWith: the
        data arrays are shared, a solver updating ``other`` updates this net (``share_trained_layers``)."""
        share_trained_layers(self.layers, other.params)

    def copy_from(self, weights_file) -> None:
        """Load weights into this net (pycaffe's ``copy_from``); blobs are replaced as at construction."""
        loaded = io.load_weights(weights_file, finite=False)
        saved_source, self._weights_file = self._weights_file, str(weights_file)
        try:
            for i, layer in enumerate(self.layers):
                arrays = io.layer_blobs(loaded, layer.name)
                if arrays is None:
                    continue
                bottom_shapes = [self.blobs[b].shape for b in self.bottom_names[layer.name]]
                self._setup_params(layer, bottom_shapes, arrays, True)
                self._shapes_seen[i] = None
        finally:
            self._steps = None  # the prepared forward may hold what the new weights change
            self._weights_file = saved_source

    def save(self, path) -> None:
        """Write the current weights as a .caffemodel, atomically; as in pycaffe it may replace the file the
        net was loaded from (a script that edits weights and saves them back asks for exactly that)."""
        weights = {layer.name: [b.data for b in layer.blobs] for layer in self.layers if layer.blobs}
        io.write_caffemodel(io.net_to_caffemodel(self.net_param, weights), path)
