"""Label-free QAT, step 1b: learned weight rounding and bias correction on the retrain graph.

After calibration (step 1) every retrained layer ``L`` computes with ARQ's nearest codes of its
float weight. Here the PTQ network (the retrain graph at its start: clips at PTQ's grid, weights
ARQ-quantized) runs once over the data, and for each Convolution / InnerProduct ``L`` the
statistics of its *quantized* input patches are gathered per group ``g``::

    n_g = number of patches,  S_g = sum x,  P_g = sum x x^T      (x: the K = C/G * kh * kw column
                                                                   of im2col, or the flattened input)
    mu = S_g / n_g,   H_g = P_g / n_g - mu mu^T  (layers with a bias)  or  P_g / n_g  (without)

Convolutions contribute at most ``POSITIONS`` output positions per image (drawn at random with a
fixed seed, whole images when they have fewer): the moments need a few thousand patches, not
every pixel. Then :func:`amct_caffe.quant.rounding.learned_codes` picks each output channel's
codes ``q`` on ARQ's own scales ``s`` (the math is in that module), the trained float weight (the
RetrainWeightQuant's blob 1) becomes ``s q`` and the bias gets ``-(s q - w) . mu``. ARQ of ``s q``
gives back ``q`` and ``s`` (checked: a channel that would not is left at its float weight), so
the retrain layers, the saved record and the fake-quant / deploy models compute these codes with
no change to any layer's semantics: training (step 4) starts there, on grid points.

Skipped (left as they were): Deconvolution, convolutions with more or fewer than two spatial
axes or a channel axis other than 1, and layers whose data give fewer patches than K (too few
to say which rounding is better).

Each layer's target is its own float weight on its quantized input, not the FP32 network's output
(which would also make up for the quantization of the layers before): all layers are rounded from
one pass, so every layer would correct the same upstream error again (tried on UltraFace: the data
loss rose from PTQ's 0.018 to 0.69). Doing that right needs one pass per layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from amct_caffe.ir import Graph, Node
from amct_caffe.passes.retrain import DATA_QUANT, WEIGHT_QUANT
from amct_caffe.quant import arq_quantize_weight
from amct_caffe.quant.rounding import bias_correction, dominant_mask, learned_codes
from amct_caffe.runtime import TEST, Net

_LOG = logging.getLogger(__name__)

POSITIONS = 512          # output positions per image and convolution whose input patches count
SEED = 0


@dataclass
class _Layer:
    """One retrained layer and the moments of its quantized input, per group."""

    node: Node
    weight: Node                     # its RetrainWeightQuant (blob 1: the trained float weight)
    blob: str                        # the quantized input blob (the RetrainDataQuant's top)
    groups: int
    geometry: tuple | None           # (kernel, stride, pad, dilation) of a 2-D convolution; None: InnerProduct
    count: int = 0
    sums: np.ndarray | None = None   # (G, K): sum x
    prods: np.ndarray | None = None  # (G, K, K): sum x x^T
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
        out.append(_Layer(node, weight, data.tops[0], groups, geometry))
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


def _gather(graph: Graph, layers: list[_Layer], inputs: dict, batch: int) -> None:
    """Run the PTQ network over the data once; accumulate each layer's input moments."""
    net = Net.from_graph(graph, TEST)
    rng = np.random.default_rng(SEED)
    n = len(next(iter(inputs.values())))
    for start in range(0, n - batch + 1, batch):
        feed = {name: value[start:start + batch] for name, value in inputs.items()}
        net.forward(**feed)
        for layer in layers:
            x = np.asarray(net.blobs[layer.blob].data, np.float32)
            pos = _positions(x.shape, layer, rng)
            cols = _patches(x, layer, pos)
            tcols = cols.transpose(0, 2, 1)
            layer.prods = _add(layer.prods, np.matmul(tcols, cols).astype(np.float64))  # float32 products
            layer.sums = _add(layer.sums, cols.sum(axis=1, dtype=np.float64))
            layer.count += cols.shape[1]


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
    codes = np.array(arq.quantized, np.float64).reshape(cout, k)
    shift = np.zeros(cout)
    per = cout // layer.groups
    for g in range(layer.groups):
        r = slice(g * per, (g + 1) * per)
        h = layer.prods[g] / layer.count
        if has_bias:  # the bias takes the mean error: centred moments
            h = h - np.outer(mu[g], mu[g])
        codes[r] = learned_codes(rows[r], scale[r], h, wp.num_bits)
        if has_bias:
            shift[r] = bias_correction(rows[r], scale[r], codes[r], mu[g])
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


def round_weights(graph: Graph, inputs: dict, batch: int) -> list[str]:
    """Learned rounding and bias correction of every Convolution / InnerProduct of the retrain
    graph ``graph`` (changed in place) from the data ``inputs`` ({input: (samples, ...)}, run in
    batches of ``batch``); returns the layers changed."""
    layers = _targets(graph)
    if not layers:
        return []
    _gather(graph, layers, inputs, batch)
    changed = []
    for layer in layers:
        if _round_layer(layer):
            changed.append(layer.node.name)
        elif layer.skipped:
            _LOG.debug("layer '%s': nearest rounding kept (%s)", layer.node.name, layer.skipped)
    _LOG.info("label-free QAT: learned rounding of %d of %d layer(s)", len(changed), len(layers))
    return changed
