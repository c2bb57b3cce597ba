"""BN fusion (the guide's 工具实现的融合功能): fold BatchNorm, then Scale, then Bias into the layer before.

Patterns, the first layer being the one that keeps the folded weights::

    Convolution (DepthwiseConv is a Convolution with group) | Deconvolution | InnerProduct
        -> BatchNorm [-> Scale] [-> Bias]

The guide describes a sequence: BatchNorm is folded into the adjacent layer and deleted, "then
Scale and Bias are treated the same way in turn". So a chain starts with a BatchNorm (this is BN
fusion; a Scale or Bias right after a convolution with no BatchNorm is left alone, as is a chain in
another order), and it stops at the first layer that cannot be folded:

* BatchNorm must use the stored statistics: ``use_global_stats: true``, or unset in the TEST phase;
* Scale and Bias must act on the channel axis only: one bottom (a learned parameter), ``axis`` 1
  (or -3 on a 4-D blob) and ``num_axes`` 1;
* every blob that disappears (the first layer's output and each intermediate output) must have
  exactly one reader, the next layer of the chain. A blob read elsewhere ends the chain before
  its reader: with Conv -> BN -> {Scale, Pooling} only Conv + BN fuse, and with the convolution's
  own output read twice nothing fuses.

The first layer must have its weights, one bottom and one top, must not share parameters with
another layer (``param { name: ... }``), and must not be named in ``skip_fusion_layers``, which
names that first layer (the guide's example lists "conv1").

Blob names: the fused layer writes the name of the chain's *last* blob (the Scale's or Bias's
output), and the intermediate blobs vanish. Every blob name left in the graph thus holds the same
values as before the pass, so readers, net outputs and anyone comparing blobs by name are
unaffected; the name that goes away (the convolution's raw output) denotes a value that no longer
exists. The fused node keeps the convolution's name and gets ``origin`` = its own origin + the
folded layers', in order. A layer without a bias gets one (``bias_term: true``).

The weight math is in :mod:`amct_caffe.passes.fold_math`; this module only matches and rewires.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from amct_caffe import ops
from amct_caffe.errors import GraphError, WeightsError
from amct_caffe.ir import Graph, Node
from amct_caffe.ops import FOLDED_ORDER
from amct_caffe.passes import fold_math

_LOG = logging.getLogger(__name__)

_TRAIN = 0  # caffe.proto: enum Phase { TRAIN = 0; TEST = 1; }


@dataclass
class Fusion:
    """One planned fusion: ``folded`` (BatchNorm [, Scale] [, Bias]) go into ``target``."""

    target: Node
    folded: list[Node] = field(default_factory=list)

    def names(self) -> list[str]:
        return [self.target.name, *(n.name for n in self.folded)]


# ------------------------------------------------------------------------ layer conditions
def weight_layout(node: Node) -> tuple[int, int] | None:
    """``(out_axis, group)`` of a fusable layer's weight (:func:`amct_caffe.ops.weight_layout`), or
    None if BN fusion cannot fold into its type."""
    layout = ops.weight_layout(node.type, node.layer_param)
    return None if layout is None else (layout.out_axis, layout.group)


def _weight(node: Node) -> np.ndarray:
    """The weight blob; an old InnerProduct weight stored 4-D as (1, 1, O, K) is viewed as (O, K)."""
    w = node.params[0]
    if node.type == "InnerProduct" and w.ndim > 2:
        w = w.reshape(w.shape[-2:])
    return w


def _has_bias(node: Node) -> bool:
    lp = node.layer_param
    param = lp.inner_product_param if node.type == "InnerProduct" else lp.convolution_param
    return bool(param.bias_term) and len(node.params) > 1


def target_problem(node: Node, skip: frozenset[str] | set[str] = frozenset(), graph: Graph | None = None) -> str | None:
    """Why ``node`` cannot receive a fusion (None if it can); ``graph`` gives its bottom's rank."""
    if weight_layout(node) is None:
        return f"type {node.type} is not one of {', '.join(ops.types_where('weighted'))}"
    if node.name in skip:
        return "it is listed in skip_fusion_layers"
    if len(node.bottoms) != 1 or len(node.tops) != 1:
        return "it has several bottoms or tops"
    if not node.params:
        return "it has no weights"
    if any(spec.name for spec in node.layer_param.param):
        return "it shares parameters with another layer (param { name })"
    if node.type == "InnerProduct" and int(node.layer_param.inner_product_param.axis) != 1:
        return "its inner_product_param.axis is not 1, so its outputs are not the channel axis"
    bottom = graph.blobs.get(node.bottoms[0]) if graph is not None else None
    return ops.off_channel_axis(node.type, node.layer_param,
                                None if bottom is None or bottom.shape is None else len(bottom.shape))


def output_rank(node: Node) -> int | None:
    """Number of axes of a fusable layer's output: the weight's for (de)convolution, 2 for InnerProduct."""
    if node.type == "InnerProduct":
        return 2
    return int(node.params[0].ndim) if node.params else None


def _uses_global_stats(node: Node) -> bool:
    lp = node.layer_param
    p = lp.batch_norm_param
    if p.HasField("use_global_stats"):
        return bool(p.use_global_stats)
    # Caffe's default is phase == TEST; models are loaded for TEST unless a layer says otherwise.
    return not (lp.HasField("phase") and lp.phase == _TRAIN)


def _channel_axis_problem(param, rank: int | None) -> str | None:
    axis, num_axes = int(param.axis), int(param.num_axes)
    canonical = axis if axis >= 0 else (axis + rank if rank is not None else None)
    if canonical != 1 or num_axes != 1:
        return f"axis {axis}, num_axes {num_axes} is not the channel axis (axis 1 or -3 on 4-D, num_axes 1)"
    return None


def folded_problem(node: Node, channels: int, rank: int | None) -> str | None:
    """Why ``node`` (BatchNorm / Scale / Bias) cannot be folded into a layer with ``channels`` outputs
    whose output has ``rank`` axes (None if unknown). None if it can."""
    if node.type not in FOLDED_ORDER:
        return f"type {node.type} is not BatchNorm, Scale or Bias"
    if node.layer_param is None:
        return "it has no layer parameters"
    if len(node.bottoms) != 1 or len(node.tops) != 1:
        return "it does not have exactly one bottom and one top (a second bottom is not a learned parameter)"
    if node.type == "BatchNorm":
        if not _uses_global_stats(node):
            return "use_global_stats is false (batch statistics cannot be folded)"
        if len(node.params) < 3:
            return "it lacks its mean / variance / moving-average factor blobs"
    else:
        param = node.layer_param.scale_param if node.type == "Scale" else node.layer_param.bias_param
        problem = _channel_axis_problem(param, rank)
        if problem:
            return problem
        need = 2 if node.type == "Scale" and param.bias_term else 1
        if len(node.params) < need:
            return "it lacks its learned blobs"
    if node.params[0].size != channels:
        return f"its parameters have {node.params[0].size} channels, the layer before has {channels}"
    return None


def blob_readers(graph: Graph) -> dict[str, list[Node]]:
    readers: dict[str, list[Node]] = defaultdict(list)
    for n in graph.nodes:
        for b in n.bottoms:
            readers[b].append(n)
    return readers


def follow_chain(start_blob: str, first_types: tuple[str, ...], channels: int, rank: int | None,
                 readers: dict[str, list[Node]]) -> tuple[list[Node], str]:
    """The longest BatchNorm -> Scale -> Bias run reading ``start_blob``, and why it ended.

    The first layer must be one of ``first_types``; each later one must come after the previous in
    FOLDED_ORDER. A blob read by more than one layer (or read twice by one) ends the run.
    """
    chain: list[Node] = []
    allowed, blob = first_types, start_blob
    while True:
        rs = readers.get(blob, [])
        if len(rs) != 1 or rs[0].bottoms.count(blob) != 1:
            return chain, (f"blob '{blob}' has {len(rs)} readers" if rs else f"blob '{blob}' is not read")
        nxt = rs[0]
        if nxt.type not in allowed:
            return chain, f"'{nxt.name}' ({nxt.type}) follows"
        problem = folded_problem(nxt, channels, rank)
        if problem:
            return chain, f"'{nxt.name}' cannot be folded: {problem}"
        chain.append(nxt)
        allowed, blob = FOLDED_ORDER[FOLDED_ORDER.index(nxt.type) + 1:], nxt.tops[0]


# ------------------------------------------------------------------------ collect, check, apply
def find_fusions(graph: Graph, skip_fusion_layers=()) -> list[Fusion]:
    """Every Conv / Deconv / InnerProduct + BatchNorm [+ Scale] [+ Bias] fusion the rules allow."""
    skip = frozenset([skip_fusion_layers] if isinstance(skip_fusion_layers, str) else skip_fusion_layers)
    readers = blob_readers(graph)
    found = []
    for node in graph.nodes:
        if weight_layout(node) is None:
            continue
        problem = target_problem(node, skip, graph)
        if problem:
            _LOG.debug("BN fusion: '%s' is not a fusion target: %s", node.name, problem)
            continue
        channels = ops.out_channels(node.type, node.layer_param, node.params[0].shape)
        chain, why = follow_chain(node.tops[0], ("BatchNorm",), channels, output_rank(node), readers)
        if chain:
            found.append(Fusion(node, chain))
        else:
            _LOG.debug("BN fusion: nothing to fold into '%s': %s", node.name, why)
    return found


def check_fusions(graph: Graph, fusions: list[Fusion]) -> None:
    """Confirm the plan is safe before touching the graph: each node is planned once, and every blob
    that disappears is read only by the next folded layer. Raises GraphError otherwise."""
    readers = blob_readers(graph)
    seen: set[int] = set()
    for f in fusions:
        chain = [f.target, *f.folded]
        for n in chain:
            if id(n) in seen:
                raise GraphError(f"BN fusion: layer '{n.name}' is planned into two fusions")
            seen.add(id(n))
        for prev, nxt in zip(chain[:-1], chain[1:], strict=True):
            blob = prev.tops[0]
            if len(prev.tops) != 1 or [r.name for r in readers.get(blob, [])] != [nxt.name] or \
                    nxt.bottoms != [blob]:
                raise GraphError(f"BN fusion of {f.names()}: blob '{blob}' would be removed but is read by "
                                 f"{[r.name for r in readers.get(blob, [])]}")


def fold_chain(target: Node, folded: list[Node]) -> None:
    """Fold ``folded`` (BatchNorm / Scale / Bias, in order) into ``target``'s weights and bias.

    Sets ``target.params`` to [weight, bias], switches its ``bias_term`` on (on a copy of its
    layer_param), makes it write the last folded blob and appends the folded layers' origin.
    The graph is not touched: the caller removes the folded nodes.
    """
    out_axis, group = weight_layout(target)
    w = _weight(target)
    b = target.params[1] if _has_bias(target) else None
    for node in folded:
        p = node.params
        if node.type == "BatchNorm":
            # Caffe quirk: blobs 0 and 1 hold mean * f and var * f, blob 2 holds f (fold_math).
            try:
                w, b = fold_math.fold_batchnorm(w, b, p[0], p[1], p[2], node.layer_param.batch_norm_param.eps,
                                                out_axis, group)
            except ValueError as e:
                raise WeightsError(f"layer '{node.name}' (BatchNorm): {e}: its fusion into '{target.name}' "
                                   "would give NaN or infinite weights; fix the model's statistics") from None
        elif node.type == "Scale":
            beta = p[1] if node.layer_param.scale_param.bias_term else None
            w, b = fold_math.fold_scale(w, b, p[0], beta, out_axis, group)
        else:
            b = fold_math.fold_bias(b, p[0]).astype(w.dtype)
    lp = type(target.layer_param)()
    lp.CopyFrom(target.layer_param)
    (lp.inner_product_param if target.type == "InnerProduct" else lp.convolution_param).bias_term = True
    target.layer_param = lp
    target.params = [np.ascontiguousarray(w), np.ascontiguousarray(b)]
    target.tops = [folded[-1].tops[0]]
    for node in folded:
        target.origin.extend(node.origin)


def apply_fusion(graph: Graph, fusion: Fusion) -> None:
    fold_chain(fusion.target, fusion.folded)
    for node in fusion.folded:
        graph.remove(node)


def fuse_bn_scale(graph: Graph, do_fusion: bool = True, skip_fusion_layers=()) -> bool:
    """BN fusion over the whole graph (module doc); returns whether anything changed.

    ``do_fusion`` False leaves the graph alone. ``skip_fusion_layers`` names Convolution /
    Deconvolution / InnerProduct layers to keep out of fusion.
    """
    if not do_fusion:
        _LOG.info("BN fusion is off (do_fusion: false)")
        return False
    fusions = find_fusions(graph, skip_fusion_layers)
    check_fusions(graph, fusions)
    for f in fusions:
        apply_fusion(graph, f)
        _LOG.debug("BN fusion: %s -> '%s' (writes '%s')", " + ".join(f.names()), f.target.name,
                   f.target.tops[0])
    if fusions:
        graph.prune_blobs()
        graph.check()
    _LOG.info("BN fusion: %d layer chain(s) fused, %d layer(s) removed", len(fusions),
              sum(len(f.folded) for f in fusions))
    return bool(fusions)
