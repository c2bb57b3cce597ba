"""Normalization and per-channel affine layers: BatchNorm, Scale, Bias, MVN, Normalize (LRN: lrn.py).

Each type has a pure reference function named after it (keyword defaults as in caffe.proto)
that never modifies its input; the layer classes read parameters and learned blobs and call it.
Float32 throughout; reductions accumulate in float64 (Caffe's float32 BLAS sums differ from the
exact value by more than ours do, well inside the 1e-5 agreement).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.io import TEST
from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.runtime.layers.lrn import LRN as LRN  # the family's reference functions, LRN's now in lrn.py
from amct_caffe.ops import register

_F32 = np.float32
_QUIET = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}


def _per_channel(v, ndim: int):
    """Reshape a (C,) vector to broadcast against an (N, C, ...) array of ``ndim`` axes."""
    return np.asarray(v, _F32).reshape((-1,) + (1,) * max(ndim - 2, 0))


# ------------------------------------------------------------------------ BatchNorm
def global_moments(mean, variance, moving_average_factor):
    """Caffe's stored statistics: (mean, variance) = blobs[0:2] / blobs[2][0], or 0 when it is 0.

    Blob 2 accumulates the moving-average normalizer during training
    (``batch_norm_layer.cpp``); a zero factor turns the scale factor to 0, not to inf.
    """
    f = _F32(np.asarray(moving_average_factor, _F32).reshape(-1)[0])
    sf = _F32(0) if f == 0 else _F32(1) / f
    return np.asarray(mean, _F32) * sf, np.asarray(variance, _F32) * sf


def batch_moments(x):
    """Per-channel (axis 1) mean and biased variance of x over all other axes, float32."""
    c = 1 if x.ndim == 1 else x.shape[1]
    x3 = x.reshape(x.shape[0], c, -1)
    mean = x3.sum(axis=(0, 2), dtype=np.float64) / (x3.shape[0] * x3.shape[2])
    centered = x3 - mean.astype(_F32)[None, :, None]
    var = np.einsum("ncs,ncs->c", centered, centered, dtype=np.float64) / (x3.shape[0] * x3.shape[2])
    return mean.astype(_F32), var.astype(_F32)


def _normalize(x, mean, variance, eps):
    """(x - mean) / sqrt(variance + eps), per channel; one subtraction and one multiplication."""
    with np.errstate(**_QUIET):
        inv = _F32(1) / np.sqrt(np.asarray(variance, _F32) + _F32(eps))
    out = np.subtract(x, _per_channel(mean, x.ndim))
    out *= _per_channel(inv, x.ndim)
    return out


def BatchNorm(x, mean, variance, moving_average_factor, eps=1e-5):
    """y = (x - m) / sqrt(v + eps) with the stored statistics (use_global_stats).

    x: (N, C, ...) (or (N,) with C = 1); mean, variance: (C,); moving_average_factor: (1,);
    m, v = mean / factor, variance / factor (see :func:`global_moments`).
    """
    m, v = global_moments(mean, variance, moving_average_factor)
    return _normalize(x, m, v, eps)


def moving_average_update(x, mean, variance, factor, fraction):
    """Caffe BatchNorm's statistics update for batch ``x`` (N, C, ...) (TRAIN / use_global_stats false).

    factor = factor * f + 1; mean = batch_mean + f * mean;
    variance = m / (m - 1) * batch_var + f * variance, m = elements per channel, f = ``fraction``.
    Returns ``(new mean, new variance, new factor, batch_mean, batch_var)`` as new float32 arrays.
    """
    f = _F32(fraction)
    batch_mean, batch_var = batch_moments(np.asarray(x, _F32))
    m = x.size // batch_mean.size
    correction = _F32(m / (m - 1)) if m > 1 else _F32(1)
    return (batch_mean + f * np.asarray(mean, _F32), correction * batch_var + f * np.asarray(variance, _F32),
            np.asarray(factor, _F32) * f + _F32(1), batch_mean, batch_var)


class ChannelStatisticsLayer(Layer):
    """A layer holding BatchNorm's blobs: mean (C,), variance (C,), moving-average factor (1,), where
    C is axis 1 of the bottom (or 1 for a 1-axis bottom)."""

    @staticmethod
    def _channels(shape) -> int:
        return 1 if len(shape) == 1 else int(shape[1])

    def param_shapes(self, bottom_shapes):
        c = self._channels(bottom_shapes[0])
        return [(c,), (c,), (1,)]

    def check_statistics(self, bottom_shapes) -> None:
        c = self._channels(bottom_shapes[0])
        if self.blobs and self.blobs[0].data.size != c:
            raise GraphError(f"layer '{self.name}' ({self.type}): the bottom has {c} channels, the "
                             f"statistics blobs {self.blobs[0].data.size}")


@register("BatchNorm")
class BatchNormLayer(ChannelStatisticsLayer):
    """Caffe's BatchNorm layer.

    Blobs: mean (C,), variance (C,), moving-average factor (1,), all filled with 0.
    ``use_global_stats`` defaults to phase == TEST. Without it the layer normalizes with the
    batch statistics and, as Caffe does, updates its blobs (factor = factor * f + 1,
    mean = batch mean + f * mean, variance = m / (m - 1) * batch variance + f * variance,
    f = moving_average_fraction, m = count / C).
    """

    n_blobs = 3

    def __init__(self, lp, phase: int = TEST):
        super().__init__(lp, phase)
        p = lp.batch_norm_param
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else phase == TEST
        self.eps = p.eps
        self.fraction = _F32(p.moving_average_fraction)

    def reshape(self, bottom_shapes):
        self.check_statistics(bottom_shapes)
        return [tuple(bottom_shapes[0])]

    def _moments(self, x):
        if self.use_global_stats:
            return global_moments(self.blobs[0].data, self.blobs[1].data, self.blobs[2].data)
        new_mean, new_var, new_factor, mean, var = moving_average_update(
            x, self.blobs[0].data, self.blobs[1].data, self.blobs[2].data, self.fraction)
        self.blobs[0].data[...], self.blobs[1].data[...], self.blobs[2].data[...] = new_mean, new_var, new_factor
        return mean, var

    def forward(self, bottoms):
        x = bottoms[0]
        mean, var = self._moments(x)
        return [_normalize(x, mean, var, self.eps)]


@register("BatchNormKyle")
class BatchNormKyleLayer(BatchNormLayer):
    """The fork's BatchNormKyle: BatchNorm, then y = alpha * y + beta when ``use_alpha_beta``.

    Blobs 3 and 4 (alpha, beta; (C,)) exist only with use_alpha_beta; filled 1 and 0.
    """

    def param_shapes(self, bottom_shapes):
        shapes = super().param_shapes(bottom_shapes)
        if self.lp.batch_norm_param.use_alpha_beta:
            shapes += [shapes[0], shapes[0]]
        return shapes

    def param_fillers(self):
        one = type(self.lp.batch_norm_param.weight_filler)(type="constant", value=1.0)
        return [None, None, None, one, None]

    def forward(self, bottoms):
        (out,) = super().forward(bottoms)
        if self.lp.batch_norm_param.use_alpha_beta:
            out *= _per_channel(self.blobs[3].data, out.ndim)
            out += _per_channel(self.blobs[4].data, out.ndim)
        return [out]


# ------------------------------------------------------------------------ Scale / Bias
def _split(shape, pshape, axis: int, who: str, exact: bool):
    """Caffe's (outer, dim, inner) view of ``shape`` for a parameter of shape ``pshape``.

    The parameter covers axes axis..axis+len(pshape)-1 (axis is taken as 0 for a scalar).
    Bias checks those axes' sizes; the fork's Scale only needs the element counts to agree
    (its shape check is commented out), i.e. the data is read as (outer, dim, inner).
    """
    shape, pshape = tuple(shape), tuple(pshape)
    if len(pshape) == 0:
        axis = 0
    else:
        axis = canonical_axis(axis, len(shape), who)
    if len(shape) < axis + len(pshape):
        raise GraphError(f"{who}: a parameter of shape {list(pshape)} applied from axis {axis} extends "
                         f"past the bottom's shape {list(shape)}")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    dim = int(np.prod(pshape, dtype=np.int64))
    inner = int(np.prod(shape[axis + len(pshape):], dtype=np.int64))
    if (exact and shape[axis:axis + len(pshape)] != pshape) or outer * dim * inner != int(np.prod(shape)):
        raise GraphError(f"{who}: parameter shape {list(pshape)} does not match the bottom's shape "
                         f"{list(shape)} from axis {axis}")
    return outer, dim, inner


def _covered(shape, axis: int, num_axes: int, who: str) -> tuple[int, ...]:
    """bottom shape[axis : axis + num_axes] (num_axes -1: to the end): a learned parameter's shape."""
    axis = canonical_axis(axis, len(shape), who)
    if num_axes < -1:
        raise GraphError(f"{who}: num_axes must be >= 0, or -1 to extend to the end, got {num_axes}")
    if num_axes >= 0 and len(shape) < axis + num_axes:
        raise GraphError(f"{who}: axis {axis} + num_axes {num_axes} extends past the bottom's shape "
                         f"{list(shape)}")
    return tuple(shape[axis:]) if num_axes == -1 else tuple(shape[axis:axis + num_axes])


def Scale(x, scale, bias=None, axis=1):
    """y = x * scale (+ bias), the parameters broadcast over x's axes from ``axis`` on.

    x: any shape; scale: x.shape[axis : axis + scale.ndim] (a scalar for shape ());
    bias: same rule, applied independently.
    """
    scale = np.asarray(scale, _F32)
    o, d, i = _split(x.shape, scale.shape, axis, "Scale", exact=False)
    out = np.multiply(x.reshape(o, d, i), scale.reshape(1, d, 1))
    if bias is not None:
        _add_bias(out.reshape(x.shape), bias, axis)
    return out.reshape(x.shape)


def _add_bias(out, bias, axis):
    bias = np.asarray(bias, _F32)
    o, d, i = _split(out.shape, bias.shape, axis, "Bias", exact=True)
    view = out.reshape(o, d, i)  # out is freshly allocated and contiguous: a view
    view += bias.reshape(1, d, 1)


def Bias(x, bias, axis=1):
    """y = x + bias, bias of shape x.shape[axis : axis + bias.ndim] (a scalar for shape ())."""
    bias = np.asarray(bias, _F32)
    o, d, i = _split(x.shape, bias.shape, axis, "Bias", exact=True)
    return np.add(x.reshape(o, d, i), bias.reshape(1, d, 1)).reshape(x.shape)


@register("Scale")
class ScaleLayer(Layer):
    """Caffe's Scale layer: top = bottom[0] * scale (+ bias).

    The scale is bottom[1] when given (no learned scale blob), else blob 0 of shape
    bottom[0].shape[axis : axis + num_axes] (filler default: constant 1). With ``bias_term`` the
    next blob is a bias of shape bottom[0].shape[axis : axis + n], n = num_axes (or bottom[1]'s
    number of axes), filled by ``bias_filler`` (default constant 0).
    """

    num_bottoms = (1, 2)

    def param_shapes(self, bottom_shapes):
        p = self.lp.scale_param
        shape0 = bottom_shapes[0]
        who = f"layer '{self.name}' (Scale)"
        shapes = [] if len(bottom_shapes) > 1 else [_covered(shape0, p.axis, p.num_axes, who)]
        if p.bias_term:
            n = len(bottom_shapes[1]) if len(bottom_shapes) > 1 else p.num_axes
            shapes.append(_covered(shape0, p.axis, n, who))
        return shapes

    def param_fillers(self):
        p = self.lp.scale_param
        fillers = []
        if len(self.lp.bottom) == 1:
            fillers.append(p.filler if p.HasField("filler") else type(p.filler)(type="constant", value=1.0))
        return fillers + [p.bias_filler]

    def _params(self, bottoms: list, shapes: bool):
        """(scale, bias or None) as arrays, or as shapes; ``bottoms`` may be bottom shapes."""
        two = len(self.lp.bottom) > 1
        scale = bottoms[1] if two else (self.blobs[0].data.shape if shapes else self.blobs[0].data)
        bias = None
        if self.lp.scale_param.bias_term:
            b = self.blobs[0 if two else 1].data  # the bias blob follows the learned scale, if any
            bias = b.shape if shapes else b
        return scale, bias

    def reshape(self, bottom_shapes):
        who = f"layer '{self.name}' (Scale)"
        scale_shape, bias_shape = self._params(bottom_shapes, shapes=True)
        _split(bottom_shapes[0], scale_shape, self.lp.scale_param.axis, who, exact=False)
        if bias_shape is not None:
            _split(bottom_shapes[0], bias_shape, self.lp.scale_param.axis, who, exact=True)
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        scale, bias = self._params(bottoms, shapes=False)
        return [Scale(bottoms[0], scale, bias, self.lp.scale_param.axis)]


@register("Bias")
class BiasLayer(Layer):
    """Caffe's Bias layer: top = bottom[0] + bias, the bias being bottom[1] or blob 0 of shape
    bottom[0].shape[axis : axis + num_axes] (filler default: constant 0)."""

    num_bottoms = (1, 2)

    def param_shapes(self, bottom_shapes):
        if len(bottom_shapes) > 1:
            return []
        p = self.lp.bias_param
        return [_covered(bottom_shapes[0], p.axis, p.num_axes, f"layer '{self.name}' (Bias)")]

    def param_fillers(self):
        return [self.lp.bias_param.filler]

    def reshape(self, bottom_shapes):
        bias_shape = bottom_shapes[1] if len(bottom_shapes) > 1 else self.blobs[0].data.shape
        _split(bottom_shapes[0], bias_shape, self.lp.bias_param.axis, f"layer '{self.name}' (Bias)", True)
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        bias = bottoms[1] if len(bottoms) > 1 else self.blobs[0].data
        return [Bias(bottoms[0], bias, self.lp.bias_param.axis)]


# ------------------------------------------------------------------------ MVN
def _legacy4(shape) -> tuple[int, int, int, int]:
    """Caffe's (num, channels, height, width) of a blob of <= 4 axes (missing trailing axes are 1)."""
    if len(shape) > 4:
        raise ValueError(f"a blob of {len(shape)} axes has no (num, channels, height, width) view")
    return tuple(int(d) for d in shape) + (1,) * (4 - len(shape))


def MVN(x, normalize_variance=True, across_channels=False, eps=1e-9):
    """Mean-variance normalization; y has Caffe's legacy 4-D shape (num, channels, height, width).

    Per sample (across_channels) or per (sample, channel): y = x - mean, and with
    normalize_variance y = (x - mean) / (sqrt(E[(x - mean)^2]) + eps) (eps is added to the
    standard deviation, not to the variance).
    """
    shape = _legacy4(x.shape)
    groups = shape[0] if across_channels else shape[0] * shape[1]
    x2 = x.reshape(groups, -1)
    dim = x2.shape[1]
    mean = (x2.sum(axis=1, dtype=np.float64) / dim).astype(_F32) if dim else np.zeros(groups, _F32)
    out = np.subtract(x2, mean[:, None])
    if normalize_variance and dim:
        var = np.einsum("gd,gd->g", out, out, dtype=np.float64) / dim
        std = np.sqrt(var).astype(_F32) + _F32(eps)
        with np.errstate(**_QUIET):
            out /= std[:, None]
    return out.reshape(shape)


@register("MVN")
class MVNLayer(Layer):
    """Caffe's MVN layer (see :func:`MVN`); its top is reshaped to 4 axes, as Caffe does."""

    def reshape(self, bottom_shapes):
        try:
            return [_legacy4(bottom_shapes[0])]
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' (MVN): {e}") from None

    def forward(self, bottoms):
        p = self.lp.mvn_param
        return [MVN(bottoms[0], p.normalize_variance, p.across_channels, p.eps)]


# ------------------------------------------------------------------------ Normalize (SSD)
def Normalize(x, scale, across_spatial=True, channel_shared=True, eps=1e-10):
    """SSD's L2 normalization of x (N, C, ...) followed by a learned scale.

    across_spatial: y = x / sqrt(sum_{c,h,w} x^2 + eps) per sample; otherwise
    y = x / sqrt(sum_c x^2 + eps) per (sample, position). Then y *= scale (one value when
    channel_shared, else per channel).
    """
    if x.ndim < 2:
        raise ValueError(f"Normalize needs a bottom of >= 2 axes, got shape {list(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    x3 = x.reshape(n, c, -1)
    if across_spatial:
        flat = x3.reshape(n, -1)
        sumsq = np.einsum("nd,nd->n", flat, flat, dtype=np.float64)
        norm = np.sqrt((sumsq + _F32(eps)).astype(_F32))
        # Caffe scales by Dtype(1.0 / norm), the reciprocal taken in double
        out = np.multiply(x3, (1.0 / norm.astype(np.float64)).astype(_F32)[:, None, None])
    else:
        sumsq = np.einsum("ncs,ncs->ns", x3, x3, dtype=np.float64)
        norm = np.sqrt((sumsq + _F32(eps)).astype(_F32))
        with np.errstate(**_QUIET):
            out = np.divide(x3, norm[:, None, :])
    scale = np.asarray(scale, _F32)
    if channel_shared:
        out *= scale.reshape(-1)[0]
    else:
        out *= scale.reshape(1, c, 1)
    return out.reshape(x.shape)


@register("Normalize")
class NormalizeLayer(Layer):
    """SSD's Normalize layer. Blob 0: scale, shape () if channel_shared else (C,);
    filled by ``norm_param.scale_filler``, default constant 1."""

    def _channels(self, shape) -> int:
        if not 2 <= len(shape) <= 4:
            raise GraphError(f"layer '{self.name}' (Normalize): the bottom needs 2 to 4 axes, it has shape "
                             f"{list(shape)}")
        return int(shape[1])

    def param_shapes(self, bottom_shapes):
        c = self._channels(bottom_shapes[0])
        return [() if self.lp.norm_param.channel_shared else (c,)]

    def param_fillers(self):
        p = self.lp.norm_param
        if p.HasField("scale_filler"):
            return [p.scale_filler]
        return [type(p.scale_filler)(type="constant", value=1.0)]

    def reshape(self, bottom_shapes):
        c = self._channels(bottom_shapes[0])
        want = 1 if self.lp.norm_param.channel_shared else c
        if self.blobs and self.blobs[0].data.size != want:
            raise GraphError(f"layer '{self.name}' (Normalize): {self.blobs[0].data.size} scale values "
                             f"for a bottom with {c} channels")
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms):
        p = self.lp.norm_param
        return [Normalize(bottoms[0], self.blobs[0].data, p.across_spatial, p.channel_shared, p.eps)]
