"""compare_model: where a quantized model loses accuracy, blob by blob (the accuracy report).

Both models run in the executor on the same batches, as IR graphs: in SSA form every value a layer
writes has a name of its own (an in-place chain's intermediate values too), and the quantized
models amct_caffe saves keep the names of the float model's SSA graph (a fused Conv+BN+Scale writes
the Scale's value, a DeQuant / AntiQuant writes the value its layer used to write). A blob name in
both models is therefore the same quantity, FP32 and quantized; the blobs only one model has (the
inputs of the folded layers, a Quant layer's codes) are not compared.

Per blob (``x`` FP32, ``y`` quantized, per sample ``s``; sums over all compared samples):

* ``cosine``: mean over samples of ``<x_s, y_s> / (|x_s| |y_s|)`` (1 where both are zero);
* ``max_abs_error``: ``max |x - y|``; ``relative_error``: ``|x - y| / |x|`` (Euclidean norms);
* ``sqnr_db``: ``10 log10(|x|^2 / |x - y|^2)`` (inf when equal);
* ``top1_agreement`` for an output of shape (N, C) or (N, C, 1, 1): the share of samples whose
  argmax over C is the same.

``error_added`` ranks the layers that hurt most: ``(1 - cosine of the output) - (1 - cosine of the
worst input)``, the error a layer adds to what it receives.

A blob whose shape depends on the data (a DetectionOutput's list, and what is computed from it) is
not compared: its length differs between the models; the blobs it is computed from count as the
outputs in its place (:mod:`amct_caffe.api.compared_outputs`; the summary's ``compared_instead``).
A blob computed after a Python layer is compared while both models give it one item per sample (the layer's
code decides: a custom activation does, a selection of rows does not), and left out with a warning from the
first batch where they do not; ``error_added`` is then measured against its inputs still compared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from amct_caffe import io, ops
from amct_caffe.api.compared_outputs import dynamic_shape_blobs, graph_layers, stand_in_outputs
from amct_caffe.errors import AmctError, GraphError
from amct_caffe.io.graph_io import graph_from_net
from amct_caffe.ir import Graph
from amct_caffe.runtime import TEST, Net, threads

try:  # csrc/src/blob_stats.cpp
    from amct_caffe._kernels import blob_stats as BLOB_STATS_KERNEL
except ImportError:
    BLOB_STATS_KERNEL = None

THREADED_VALUES = 1 << 18  # below this many values the C++ loop runs on one thread

_LOG = logging.getLogger(__name__)
Feed = Mapping[str, np.ndarray]


@dataclass
class BlobReport:
    name: str
    layer: str            # the float model's layer that writes it
    type: str
    quant_layer: str      # the quantized model's layer that computes it (before its DeQuant / AntiQuant)
    output: bool
    cosine: float
    max_abs_error: float
    relative_error: float
    sqnr_db: float
    error_added: float
    shape: list[int]
    top1_agreement: float | None = None


@dataclass
class _Accumulator:
    cosines: list[np.ndarray] = field(default_factory=list)
    max_abs: float = 0.0
    ref_sq: float = 0.0
    diff_sq: float = 0.0
    top1_same: int = 0
    top1_total: int = 0
    shape: tuple[int, ...] = ()


def time_major_values(graph: Graph) -> frozenset[str]:
    """The values of ``graph`` (SSA names) with the batch on axis 1: a recurrent layer's inputs and outputs and
    what keeps their first two axes (ops.time_major_blobs)."""
    layers = []
    for node in graph.nodes:
        if node.layer_param is None:
            continue
        lp = type(node.layer_param)()
        lp.CopyFrom(node.layer_param)
        del lp.bottom[:], lp.top[:]
        lp.bottom.extend(node.bottoms)
        lp.top.extend(node.tops)
        layers.append(lp)
    return frozenset(ops.time_major_blobs(layers, downstream=True))


def batch_samples(feed: Mapping[str, np.ndarray], time_major: frozenset = frozenset()) -> int:
    """The samples in a batch: the second axis of the inputs read time-major (a recurrent layer's), else the
    first axis of the input with the most axes, the first of those in the feed.

    The data an image net runs on has the most axes (N, C, H, W); its other inputs may hold one row per batch
    (an image-info (1, 3)), rows that are not samples (Fast R-CNN's (R, 5) regions of one image) or a constant
    broadcast over the batch (a (C, H, W) Bias operand), whose first axis says nothing of the batch."""
    timed = {k: v for k, v in feed.items() if k in time_major and np.ndim(v) > 1}
    if timed:  # a recurrent layer's (T, N, ...) inputs say N; others may be time-major through layers unseen
        return max(np.shape(v)[1] for v in timed.values())
    _, value = max(feed.items(), key=lambda item: np.ndim(item[1]))  # (max keeps the first of equals)
    return np.shape(value)[0] if np.ndim(value) else 1


def samples_first(a: np.ndarray, name: str, time_major: frozenset) -> np.ndarray:
    """``a`` with its samples on axis 0 (a time-major value's axes 0 and 1 swapped)."""
    return np.ascontiguousarray(np.swapaxes(a, 0, 1)) if name in time_major and np.ndim(a) > 1 else a


def sample_rows(a: np.ndarray, n: int) -> np.ndarray:
    """(samples, D) float64 rows of a blob whose first axis is the batch (else one row)."""
    a = np.asarray(a, np.float64)
    return a.reshape(n if a.ndim and a.shape[0] == n else 1, -1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of the rows of two (N, D) arrays in float64; 1 where both rows are zero, 0 where one is."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return _cosine(np.einsum("ij,ij->i", a, b), np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b))


def _cosine(dot: np.ndarray, aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    """cos = dot / (|a| |b|) per row from the sums; 1 where both rows are zero, 0 where one is."""
    na, nb = np.sqrt(aa), np.sqrt(bb)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))


def blob_error_sums(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                     float]:
    """``(dot, aa, bb, dd, max_abs)`` of an FP32 blob ``x`` and its quantized ``y`` over the rows of
    :func:`sample_rows` (float64, one per row: sum a*b, a*a, b*b, (a-b)^2; max |a - b| over all).

    float32 blobs go through one pass of a C++ loop (``csrc/src/blob_stats.cpp``, fixed summation order);
    other dtypes (a deploy model's float64 accumulators) through the NumPy expressions, the reference.
    """
    rows = n if x.ndim and x.shape[0] == n else 1
    if (BLOB_STATS_KERNEL is not None and x.dtype == np.float32 and y.dtype == np.float32 and x.size
            and x.flags.c_contiguous and y.flags.c_contiguous):
        workers = threads.workers() if x.size >= THREADED_VALUES else 1
        return BLOB_STATS_KERNEL(x, y, rows, workers)
    a, b = sample_rows(x, n), sample_rows(y, n)
    d = a - b
    return (np.einsum("ij,ij->i", a, b), np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b),
            np.einsum("ij,ij->i", d, d), float(np.max(np.abs(d))) if d.size else 0.0)


def _sqnr_db(ref_sq: float, diff_sq: float) -> float:
    """``10 log10(|x|^2 / |x - y|^2)``: inf for no error, -inf for an error on a zero (or far smaller)
    reference, NaN when a blob held NaN or both sums are infinite."""
    if math.isnan(ref_sq) or math.isnan(diff_sq):
        return math.nan
    if not diff_sq:
        return math.inf
    ratio = ref_sq / diff_sq
    if math.isnan(ratio):  # inf / inf: an infinite float blob against a finite quantized one
        return math.nan
    return 10 * math.log10(ratio) if ratio > 0 else -math.inf


def _is_classifier(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and shape[1] > 1 and all(d == 1 for d in shape[2:])


def load_ssa_graph(model_file, weights_file) -> Graph:
    """The SSA graph of a model (every intermediate value has a name of its own)."""
    net_param, weights = io.load_model(model_file, weights_file)
    return graph_from_net(net_param, weights)


def _real_layer(graph: Graph, blob: str) -> tuple[str, str]:
    """(name, type) of the layer computing ``blob`` in ``graph``, looking through DeQuant / AntiQuant."""
    node = graph.producer(blob)
    while node is not None and node.type in ("DeQuant", "AntiQuant") and node.bottoms:
        node = graph.producer(node.bottoms[0])
    return (node.name, node.type) if node is not None else ("", "")


class BlobComparison:
    """FP32 vs quantized, every shared blob, accumulated over batches (module doc)."""

    def __init__(self, fp32_graph: Graph, quant_graph: Graph, every_blob: bool = False,
                 files: tuple[str, str] = ("the float model", "the quantized model")):
        """``every_blob``: keep every value of both models readable after a forward (for a dump of all
        blobs); otherwise only the compared blobs, the inputs and the outputs are (:meth:`_net`). ``files``: the
        two models' prototxts, for messages."""
        self.fp32_graph, self.quant_graph = fp32_graph, quant_graph
        self.files = files
        inputs = set(self.fp32_graph.inputs)
        layers = graph_layers(self.fp32_graph)
        # a detection list (and anything computed from it) changes length with the rounding: its
        # inputs stand for it (compared_outputs)
        # blobs after a Python layer are compared while the two models give them one item per sample (its code decides)
        dynamic = dynamic_shape_blobs(layers)
        self.shape_may_differ = {b for b, through_python in dynamic.items() if through_python}
        uncompared = {b for b, through_python in dynamic.items() if not through_python}
        quant_values = set(quant_graph.inputs) | {t for node in quant_graph.nodes for t in node.tops}
        shared = [t for node in self.fp32_graph.nodes for t in node.tops if t not in inputs and t in quant_values]
        self.names = [t for t in shared if t not in uncompared]
        if not shared:
            raise AmctError("the float and the quantized model share no blob name: was the quantized model made "
                            "from this float model by amct_caffe?")
        if not self.names:
            raise AmctError("every blob the two models share has a shape that depends on the data (it is computed "
                            "after a detection output): nothing can be compared value by value")
        self.net_outputs = set(self.fp32_graph.outputs)
        stand_ins, self.replaced = stand_in_outputs(layers, sorted(self.net_outputs))
        self.outputs = set(stand_ins)
        self.acc = {name: _Accumulator() for name in self.names}
        self.time_major = time_major_values(fp32_graph)  # (a recurrent model's sequences: samples on axis 1)
        # the outputs whose top-1 agreement is meaningful: where some come from a Softmax, those (MTCNN's prob1, not
        # its box and landmark regressions); else every output of one row of scores per sample (logits)
        softmax = {t for node in fp32_graph.nodes if node.type == "Softmax" for t in node.tops} & self.net_outputs
        self.classifier_outputs = softmax or self.net_outputs
        self.samples = 0
        self.fp32_net = self._net(fp32_graph, every_blob)
        self.quant_net = self._net(quant_graph, every_blob)

    def _net(self, graph: Graph, every_blob: bool) -> Net:
        """A Net of ``graph`` in which the layers the model's prototxt computes in place write over the
        values nobody reads after a forward (a Convolution's output before its BatchNorm and Scale): the
        float open_nsfw at batch 8 holds 420 MiB of blobs instead of 767 MiB, and its Convolution,
        BatchNorm and Scale run as one step. The quantized models amct_caffe saves have no in-place
        layers, so their nets keep every value. EXACT folding: the bytes of the layers run one by one."""
        observed = None if every_blob else set(self.names) | set(graph.outputs)
        return Net.from_graph(graph, TEST, observed=observed)

    def add(self, feed: Feed) -> None:
        self.fp32_net.forward(**feed)
        try:
            self.quant_net.forward(**feed)
        except GraphError as e:  # (the float model ran on this data: the quantized one is another model's)
            raise GraphError(f"{self.files[1]}: {e}; give the quantized model made from {self.files[0]}") from None
        n = batch_samples(feed, self.time_major)
        self.samples += n
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # a blob of inf / NaN: NaN figures
            self._add_sums(n)

    def _add_sums(self, n: int) -> None:
        for name in list(self.names):
            x = samples_first(self.fp32_net.blobs[name].data, name, self.time_major)
            y = samples_first(self.quant_net.blobs[name].data, name, self.time_major)
            if name in self.shape_may_differ and (x.shape != y.shape or not x.ndim or x.shape[0] != n):
                # after a Python layer a blob is compared only while it holds one item per sample in both models:
                # two selections of the same size may still hold different items (the rows a threshold keeps)
                _LOG.warning("blob '%s' (after a Python layer) has shape %s in the quantized model and %s in the float "
                             "model for a batch of %d: from this batch on it is not compared", name, list(y.shape),
                             list(x.shape), n)
                self.names.remove(name)
                del self.acc[name]
                continue
            if x.shape != y.shape:
                raise AmctError(f"blob '{name}' has shape {list(y.shape)} in the quantized model and "
                                f"{list(x.shape)} in the float model")
            acc = self.acc[name]
            acc.shape = tuple(x.shape)
            dot, aa, bb, dd, max_abs = blob_error_sums(x, y, n)
            acc.cosines.append(_cosine(dot, aa, bb))
            acc.max_abs = max(acc.max_abs, max_abs) if not math.isnan(max_abs) else math.nan
            acc.ref_sq += float(np.sum(aa))
            acc.diff_sq += float(np.sum(dd))
            if name in self.classifier_outputs and _is_classifier(x.shape) and x.size:  # (not a stand-in)
                a, b = sample_rows(x, n), sample_rows(y, n)
                acc.top1_same += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
                acc.top1_total += a.shape[0]

    def reports(self) -> list[BlobReport]:
        if not self.samples:
            raise AmctError("compare needs at least one batch of data")
        cosine = {n: float(np.concatenate(a.cosines).mean()) for n, a in self.acc.items()}
        out = []
        for name in self.names:
            acc = self.acc[name]
            producer = self.fp32_graph.producer(name)
            worst_in = worst_cosine(self._input_cosines(producer, cosine), default=1.0)
            rel = math.sqrt(acc.diff_sq / acc.ref_sq) if acc.ref_sq else (0.0 if not acc.diff_sq else math.inf)
            sqnr = _sqnr_db(acc.ref_sq, acc.diff_sq)
            quant_layer, _ = _real_layer(self.quant_graph, name)
            out.append(BlobReport(
                name, producer.name, producer.type, quant_layer, name in self.outputs, cosine[name], acc.max_abs,
                rel, sqnr, (1 - cosine[name]) - (1 - worst_in), list(acc.shape),
                acc.top1_same / acc.top1_total if acc.top1_total else None))
        return out

    def _input_cosines(self, producer, cosine: dict[str, float]) -> list[float]:
        """The cosines of the compared blobs ``producer`` reads, directly or through blobs not compared.

        A blob the quantized model folds away (a BatchNorm's output inside a Convolution + BatchNorm + Scale
        chain, the convolution's own output) has no cosine: the error a layer adds is measured from the
        compared blobs its chain starts from, not from a perfect input. A net input counts as exact."""
        found: list[float] = []
        seen: set[str] = set()
        todo = list(producer.bottoms)
        while todo:
            blob = todo.pop()
            if blob in seen:
                continue
            seen.add(blob)
            if blob in cosine:
                found.append(cosine[blob])
                continue
            source = self.fp32_graph.producer(blob)
            if source is not None:
                todo.extend(source.bottoms)
        return found


def quantized_layers(quant_graph: Graph) -> dict[str, dict]:
    """Per quantized layer of a saved model: its inputs' clip ranges and its weights' step.

    ``{layer: {"inputs": {index: (lo, hi)}, "scale_w": array or None}}`` from the Quant layers
    (``scale = 1 / scale_d``, ``offset``, ``num_bits_d``) and the fake-quant DeQuant blobs
    (``deq = scale_w * scale_d``).
    """
    layers: dict[str, dict] = {}
    scale_d: dict[str, float] = {}
    for node in quant_graph.nodes:
        if node.type == "Quant":
            qp = node.layer_param.quant_param
            bits = int(qp.num_bits_d) if qp.HasField("num_bits_d") else 8
            sd = float(np.float32(1.0) / np.float32(qp.scale))
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            entry = layers.setdefault(qp.object_layer, {"inputs": {}, "scale_w": None})
            entry["inputs"][int(qp.index)] = ((lo - qp.offset) * sd, (hi - qp.offset) * sd)
            if int(qp.index) == 0:
                scale_d[qp.object_layer] = sd
    for node in quant_graph.nodes:
        if node.type == "DeQuant" and len(node.params) == 3:
            target = node.layer_param.dequant_param.object_layer
            if target in scale_d:
                layers[target]["scale_w"] = np.asarray(node.params[0], np.float64).ravel() / scale_d[target]
    return layers


def nan_first(cosine: float) -> tuple[bool, float]:
    """A sort key on cosines, ascending, with NaN (a blob that went non-finite) before every number."""
    return (not math.isnan(cosine), cosine)


def worst_cosine(values, default=None):
    """The smallest of ``values``, NaN counting as the worst whatever its place (:func:`nan_first`)."""
    return min(values, key=nan_first, default=default)


def by_error_added(reports: list[BlobReport]) -> list[BlobReport]:
    """``reports`` by the error each layer adds, largest first; NaN (non-finite values) ranks first."""
    return sorted(reports, key=lambda r: -math.inf if math.isnan(r.error_added) else -r.error_added)


def summary(reports: list[BlobReport], samples: int, worst: int = 10,
            compared_instead: dict[str, list[str]] | None = None) -> dict:
    outputs = [r for r in reports if r.output]
    ranked, seen = [], set()
    for r in by_error_added(reports):  # a layer of several tops (an LSTM's y, h_T, c_T) once, at its largest
        if (r.quant_layer or r.layer) not in seen:
            seen.add(r.quant_layer or r.layer)
            ranked.append(r)
    top1 = [r.top1_agreement for r in outputs if r.top1_agreement is not None]
    return {
        "samples": samples,
        "blobs_compared": len(reports),
        "outputs": {r.name: {"cosine": r.cosine, "sqnr_db": r.sqnr_db, "top1_agreement": r.top1_agreement}
                    for r in outputs},
        "worst_output_cosine": worst_cosine([r.cosine for r in outputs], default=None),
        "top1_agreement": min(top1) if top1 else None,
        "most_sensitive_layers": [{"layer": r.quant_layer or r.layer, "blob": r.name, "error_added": r.error_added,
                                   "cosine": r.cosine} for r in ranked[:worst]],
        "compared_instead": dict(compared_instead or {}),
    }


def compare_batches(model_file, weights_file, quant_model_file, quant_weights_file,
                    batches: Iterable[Feed], every_blob: bool = False) -> tuple[list[BlobReport], dict,
                                                                                BlobComparison]:
    """Run both models on ``batches``; (per-blob reports in network order, summary, the comparison).
    ``every_blob``: see :class:`BlobComparison`."""
    comparison = BlobComparison(load_ssa_graph(model_file, weights_file),
                                load_ssa_graph(quant_model_file, quant_weights_file), every_blob,
                                (str(model_file), str(quant_model_file)))
    for feed in batches:
        comparison.add(feed)
    reports = comparison.reports()
    return reports, summary(reports, comparison.samples, compared_instead=comparison.replaced), comparison


def json_safe(v):
    """JSON has no infinity nor NaN: such a value is written as the string "inf" (an SQNR of identical blobs),
    "-inf" (an SQNR where the FP32 blob is all zeros and the other is not) or "nan"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_safe(x) for x in v]
    return v


def report_dict(reports: list[BlobReport], summary_: dict) -> dict:
    """The content of report.json (non-finite values as strings: :func:`json_safe`)."""
    return json_safe({"blobs": [asdict(r) for r in reports], "summary": summary_})

