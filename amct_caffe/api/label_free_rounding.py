"""Label-free QAT, step 1b: learned weight rounding and bias correction on the retrain graph.

After calibration (step 1) every retrained layer ``L`` computes with ARQ's nearest codes of its
float weight. Here the layers are rounded anew, level by level (:func:`_levels`: a layer's level
is the number of retrained layers on its longest path from the inputs). For each level, the
retrain graph (clips at PTQ's grid, the lower levels already at their new codes) and the float
graph it was made from run over the data side by side, up to the level's layers, and for each
Convolution / InnerProduct ``L`` of the level the statistics of its *quantized* input patches
``x`` and of the upstream error ``d = x_fp32 - x`` (the float network's patch at the same place
minus it) are gathered per group ``g``::

    n_g = number of patches,  S_g = sum x,  P_g = sum x x^T,  D_g = sum d,  X_g = sum x d^T
          (x, d: the K = C/G * kh * kw column of im2col, or the flattened input)
    mu = S_g / n_g,  mu_d = D_g / n_g
    H_g = P_g / n_g - mu mu^T,  C_g = X_g / n_g - mu mu_d^T   (layers with a bias; else uncentred)

Convolutions contribute at most ``POSITIONS`` output positions per image (drawn at random with a
fixed seed, whole images when they have fewer; the same positions for ``x`` and ``x_fp32``): the
moments need a few thousand patches, not every pixel. Then
:func:`amct_caffe.quant.rounding.learned_codes` picks each output channel's codes ``q`` on ARQ's
own scales ``s`` so that ``s q . x`` comes closest to the FP32 network's ``w . x_fp32`` (linear
term ``c = C_g w``; the math is in that module), the trained float weight (the
RetrainWeightQuant's blob 1) becomes ``s q`` and the bias gets ``-(s q - w) . mu + w . mu_d``.
ARQ of ``s q`` gives back ``q`` and ``s`` (checked: a channel that would not is left at its float
weight), so the retrain layers, the saved record and the fake-quant / deploy models compute these
codes with no change to any layer's semantics: training (step 4) starts there, on grid points.

Why level by level: a layer aiming at the FP32 output also makes up for the error of the layers
before it, so it must see them as they will be. Rounding every layer from one pass of the PTQ
network made each one cancel the same upstream error again (UltraFace: data loss 0.018 -> 0.69).
Without ``reference`` (:func:`round_weights`) each layer aims at its own float weight on its
quantized input instead, all from that one pass: UltraFace's boxes cosine (20 unseen photos)
0.99847 that way, 0.99862 level by level.

Skipped (left as they were): Deconvolution, convolutions with more or fewer than two spatial
axes or a channel axis other than 1, and layers whose data give fewer patches than K (too few
to say which rounding is better).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from amct_caffe.api.staged_run import StagedRun
from amct_caffe.ir import Graph, Node
from amct_caffe.passes.retrain import DATA_QUANT, WEIGHT_QUANT
from amct_caffe.quant import arq_quantize_weight
from amct_caffe.quant.rounding import bias_correction, dominant_mask, learned_codes

_LOG = logging.getLogger(__name__)

POSITIONS = 512          # output positions per image and convolution whose input patches count
SEED = 0
BATCH = 8                # samples per forward of the statistics passes (more, when the model's batch is larger)


@dataclass
class _Layer:
    """One retrained layer and the moments of its quantized input, per group."""

    node: Node
    weight: Node                     # its RetrainWeightQuant (blob 1: the trained float weight)
    data: Node                       # its RetrainDataQuant (top: the quantized input)
    groups: int
    geometry: tuple | None           # (kernel, stride, pad, dilation) of a 2-D convolution; None: InnerProduct
    count: int = 0
    sums: np.ndarray | None = None   # (G, K): sum x
    prods: np.ndarray | None = None  # (G, K, K): sum x x^T
    cross: np.ndarray | None = None      # (G, K, K): sum x (x_fp32 - x)^T
    diff_sums: np.ndarray | None = None  # (G, K): sum (x_fp32 - x)
    level: int = 0
    skipped: str = field(default="")


def _pair(values, h: int, w: int, has_hw: bool, default: int) -> tuple[int, int]:
    if has_hw:
        return int(h), int(w)
    values = list(values)
    if not values:
        return default, default
    return (int(values[0]), int(values[0])) if len(values) == 1 else (int(values[0]), int(values[1]))


def _conv_geometry(node: Node) -> tuple | None:
    """(kernel, stride, pad, dilation) pairs of a 2-D Convolution on axis 1, else None."""
    cp = node.layer_param.convolution_param
    if cp.axis != 1 or node.params[0].ndim != 4:
        return None
    kernel = tuple(int(k) for k in node.params[0].shape[2:])
    stride = _pair(cp.stride, cp.stride_h, cp.stride_w, cp.HasField("stride_h"), 1)
    pad = _pair(cp.pad, cp.pad_h, cp.pad_w, cp.HasField("pad_h"), 0)
    dilation = _pair(cp.dilation, 0, 0, False, 1)
    return kernel, stride, pad, dilation


def _targets(graph: Graph) -> list[_Layer]:
    out = []
    for weight in graph.nodes:
        if weight.type != WEIGHT_QUANT:
            continue
        data = graph.producer(weight.bottoms[0])
        node = graph.consumers(weight.tops[0])[0]
        if data is None or data.type != DATA_QUANT:
            continue
        if node.type == "Convolution":
            geometry = _conv_geometry(node)
            if geometry is None:
                continue
            groups = int(node.layer_param.convolution_param.group)
        elif node.type == "InnerProduct":
            if node.layer_param.inner_product_param.axis != 1 or node.layer_param.inner_product_param.transpose:
                continue
            geometry, groups = None, 1
        else:
            continue
        out.append(_Layer(node, weight, data, groups, geometry))
    return out


def _positions(shape, layer: _Layer, rng: np.random.Generator) -> np.ndarray | None:
    """The output positions (flat indices) whose patches count, for an input of ``shape``."""
    if layer.geometry is None:
        return None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.geometry
    oh = (shape[2] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (shape[3] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if oh * ow <= POSITIONS:
        return np.arange(oh * ow)
    return np.sort(rng.choice(oh * ow, POSITIONS, replace=False))


def _patches(x: np.ndarray, layer: _Layer, pos: np.ndarray | None) -> np.ndarray:
    """(G, patches, K) columns of the input ``x`` (N, C, ...) that ``layer``'s output channels
    multiply, at output positions ``pos`` (None: an InnerProduct's flattened input)."""
    n = x.shape[0]
    if layer.geometry is None:
        return x.reshape(1, n, -1)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.geometry
    c, w = x.shape[1], x.shape[3]
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    rows = (pos // ow)[:, None] * sh + np.arange(kh) * dh            # (P, kh)
    cols = (pos % ow)[:, None] * sw + np.arange(kw) * dw             # (P, kw)
    cols_ = xp[:, :, rows[:, :, None], cols[:, None, :]]             # (N, C, P, kh, kw)
    g = layer.groups
    cols_ = cols_.reshape(n, g, c // g, len(pos), kh, kw).transpose(1, 0, 3, 2, 4, 5)
    return cols_.reshape(g, n * len(pos), (c // g) * kh * kw)


def _add(total: np.ndarray | None, value: np.ndarray) -> np.ndarray:
    return value if total is None else total + value


def any_batch(graph: Graph, model_batch: int) -> Graph:
    """A copy of ``graph`` that runs at any batch size: a Reshape whose first dim fixes the batch
    axis at ``model_batch`` (deploy prototxts often write ``dim: 1``) copies it instead (``0``)."""
    out = graph.copy()
    for node in out.nodes:
        rp = node.layer_param.reshape_param if node.type == "Reshape" else None
        if rp is not None and rp.axis == 0 and len(rp.shape.dim) and rp.shape.dim[0] == model_batch:
            rp.shape.dim[0] = 0
    return out


def _levels(graph: Graph, layers: list[_Layer]) -> None:
    """Each layer's ``level``: how many retrained layers lie on its longest path from the inputs.

    The layers of one level read nothing any layer of that level or later computes, so once every
    lower level holds its final codes they can all be measured in one pass and rounded together.
    """
    by_node = {id(layer.node): layer for layer in layers}
    blob_level: dict[str, int] = {}
    for node in graph.nodes:
        level = max((blob_level.get(b, 0) for b in node.bottoms), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            layer.level = level
            level += 1
        for top in node.tops:
            blob_level[top] = level


def _accumulate(layer: _Layer, xq: np.ndarray, xf: np.ndarray | None, rng: np.random.Generator) -> None:
    pos = _positions(xq.shape, layer, rng)
    cols = _patches(xq, layer, pos)
    tcols = cols.transpose(0, 2, 1)
    layer.prods = _add(layer.prods, np.matmul(tcols, cols).astype(np.float64))  # float32 products
    layer.sums = _add(layer.sums, cols.sum(axis=1, dtype=np.float64))
    layer.count += cols.shape[1]
    if xf is not None:
        diff = _patches(xf, layer, pos) - cols
        layer.cross = _add(layer.cross, np.matmul(tcols, diff).astype(np.float64))
        layer.diff_sums = _add(layer.diff_sums, diff.sum(axis=1, dtype=np.float64))


def _gather(runs: tuple[StagedRun, StagedRun | None], graph: Graph, reference: Graph | None,
            layers: list[_Layer], later: list[_Layer], inputs: dict, batch: int, seed: int) -> None:
    """Run the retrain network (and the float ``reference``) over the data, in batches of
    ``batch`` (the last one may be smaller), up to ``layers``' inputs; accumulate each layer's
    input moments (and their cross moments with the upstream error ``x_fp32 - x``).

    ``later``: the layers still to be rounded after these. The retrain graph's run keeps the blobs
    live where the first RetrainDataQuant of ``layers`` or ``later`` sits (these layers change once
    measured, so the next pass must run them again), the float graph's where the first of
    ``later`` sits; the next pass starts there.
    """
    qrun, frun = runs
    # per layer: where its quantized input is made (the RetrainDataQuant) and, in the float graph,
    # the node before it and the blob it reads there
    reads = []
    for layer in layers:
        fnode = reference.node(layer.node.name) if reference is not None else None
        reads.append((graph.index(layer.data), reference.index(fnode) - 1 if fnode else -1,
                      fnode.bottoms[0] if fnode else "", layer))
    reads.sort(key=lambda t: t[0])
    qrun.open(reads[-1][0], min(graph.index(x.data) for x in (*layers, *later)) if later else None)
    if frun is not None:
        frun.open(max(r[1] for r in reads), min((reference.index(reference.node(x.node.name)) for x in later),
                                                default=None))
    active = [run for run in runs if run is not None]
    rng = np.random.default_rng(seed)
    n = len(next(iter(inputs.values())))
    for number, start in enumerate(range(0, n, batch)):
        feed = {name: value[start:start + batch] for name, value in inputs.items()}
        for run in active:
            run.begin(number, feed)
        for qstop, fstop, fblob, layer in reads:
            qrun.advance(qstop)
            xf = None
            if frun is not None:
                frun.advance(fstop)
                xf = frun.blob(fblob)
            _accumulate(layer, qrun.blob(layer.data.tops[0]), xf, rng)
        for run in active:
            run.finish()
    for run in active:
        run.close()


def _round_layer(layer: _Layer) -> bool:
    """Learned codes and bias correction for one layer (module doc); whether anything changed."""
    wp = layer.weight.layer_param.retrain_weight_quant_param
    w = np.asarray(layer.weight.params[1], np.float32)
    cout, k = w.shape[0], int(np.prod(w.shape[1:]))
    if layer.count < k:
        layer.skipped = f"{layer.count} input patches for K = {k}"
        return False
    arq = arq_quantize_weight(w, wp.layer_type, wp.channel_wise, wp.num_bits, layer.groups)
    scale = np.broadcast_to(arq.scale.astype(np.float64), (cout,))
    rows = w.reshape(cout, k).astype(np.float64)
    has_bias = len(layer.node.params) > 1
    mu = layer.sums / layer.count                                    # (G, K)
    upstream = layer.cross is not None
    mu_d = layer.diff_sums / layer.count if upstream else None
    codes = np.array(arq.quantized, np.float64).reshape(cout, k)
    shift = np.zeros(cout)
    per = cout // layer.groups
    for g in range(layer.groups):
        r = slice(g * per, (g + 1) * per)
        h = layer.prods[g] / layer.count
        if has_bias:  # the bias takes the mean error: centred moments
            h = h - np.outer(mu[g], mu[g])
        linear = None
        if upstream:  # c = Cov(x, d) w per row (quant/rounding.py, "Upstream error")
            cross = layer.cross[g] / layer.count
            if has_bias:
                cross = cross - np.outer(mu[g], mu_d[g])
            linear = rows[r] @ cross.T
        codes[r] = learned_codes(rows[r], scale[r], h, wp.num_bits, linear=linear)
        if has_bias:
            shift[r] = bias_correction(rows[r], scale[r], codes[r], mu[g], mu_d[g] if upstream else None)
    new = (codes * scale[:, None]).astype(np.float32)
    keep = dominant_mask(rows)
    new[keep] = w.reshape(cout, k)[keep]  # ARQ's scale comes from it: the very value gives the very scale
    new = new.reshape(w.shape)
    check = arq_quantize_weight(new, wp.layer_type, wp.channel_wise, wp.num_bits, layer.groups)
    same = (np.asarray(check.quantized, np.float64).reshape(cout, k) == codes).all(axis=1)
    same &= np.broadcast_to(check.scale == arq.scale, (cout,))
    if not same.all():  # ARQ would not give these codes back (cannot happen by construction): keep the float rows
        _LOG.debug("layer '%s': %d channel(s) keep nearest rounding", layer.node.name, int((~same).sum()))
        new.reshape(cout, k)[~same] = w.reshape(cout, k)[~same]
        shift[~same] = 0.0
    if np.array_equal(new, arq.fake) and not shift.any():
        return False
    layer.weight.params[1] = new
    layer.weight.params[0] = new.copy()
    if has_bias:
        b = layer.node.params[1]
        layer.node.params[1] = (b.astype(np.float64) + shift.reshape(b.shape)).astype(b.dtype)
    return True


def round_weights(graph: Graph, inputs: dict, model_batch: int, reference: Graph | None = None) -> list[str]:
    """Learned rounding and bias correction of every Convolution / InnerProduct of the retrain
    graph ``graph`` (changed in place) from the data ``inputs`` ({input: (samples, ...)}, run in
    batches of at least ``BATCH`` samples; ``model_batch``: the batch the model's prototxt
    fixes); returns the layers changed.

    ``reference``: the float graph ``graph`` was made from (same layer names). Given, each layer
    aims at the FP32 network's output (quant/rounding.py, "Upstream error") and the layers are
    rounded level by level (:func:`_levels`), one pass over the data per level, each pass through
    the layers already rounded. Without it, every layer aims at its own float weight on its
    quantized input, all from one pass of the PTQ network.
    """
    layers = _targets(graph)
    if not layers:
        return []
    if reference is None:
        groups = [layers]
    else:
        _levels(graph, layers)
        groups = [[layer for layer in layers if layer.level == lv] for lv in range(max(x.level for x in layers) + 1)]
    groups = [group for group in groups if group]
    float_graph = any_batch(reference, model_batch) if reference is not None else None  # never changes
    runs = (StagedRun(lambda: any_batch(graph, model_batch)),  # rebuilt per pass: the rounding changes its weights
            StagedRun(lambda: float_graph) if reference is not None else None)
    changed = []
    for i, group in enumerate(groups):
        later = [layer for g in groups[i + 1:] for layer in g]
        _gather(runs, graph, reference, group, later, inputs, max(BATCH, model_batch), SEED + i)
        for layer in group:
            if _round_layer(layer):
                changed.append(layer.node.name)
            elif layer.skipped:
                _LOG.debug("layer '%s': nearest rounding kept (%s)", layer.node.name, layer.skipped)
            layer.prods = layer.cross = None  # the moments of a level are not needed after it
    _LOG.info("label-free QAT: learned rounding of %d of %d layer(s) in %d pass(es)", len(changed), len(layers),
              len(groups))
    return changed
