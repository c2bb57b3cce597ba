"""Normalization layers: MVN, Normalize; LRN, BatchNorm, Scale and Bias live in their own modules.

Each type has a pure reference function named after it (keyword defaults as in caffe.proto)
that never modifies its input; the layer classes read parameters and learned blobs and call it.
Float32 throughout; reductions accumulate in float64 (Caffe's float32 BLAS sums differ from the
exact value by more than ours do, well inside the 1e-5 agreement).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer
from amct_caffe.ops import register

# the per-channel affine family, re-exported: this module is where the reference functions of every
# normalization type are looked up
from amct_caffe.runtime.layers.batch_norm import BatchNorm  # noqa: F401
from amct_caffe.runtime.layers.lrn import LRN  # noqa: F401
from amct_caffe.runtime.layers.scale_bias import Bias, Scale  # noqa: F401

_F32 = np.float32
_QUIET = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}


# ------------------------------------------------------------------------ MVN
def _legacy4(shape) -> tuple[int, int, int, int]:
    """Caffe's (num, channels, height, width) of a blob of <= 4 axes (missing trailing axes are 1)."""
    if len(shape) > 4:
        raise ValueError(f"a blob of {len(shape)} axes has no (num, channels, height, width) view")
    return tuple(int(d) for d in shape) + (1,) * (4 - len(shape))


def _mvn(x, normalize_variance, across_channels, eps):
    """MVN's top and its per-group divisor sqrt(E[(x - mean)^2]) + eps (None without normalize_variance)."""
    shape = _legacy4(x.shape)
    groups = shape[0] if across_channels else shape[0] * shape[1]
    x2 = x.reshape(groups, -1)
    dim = x2.shape[1]
    mean = (x2.sum(axis=1, dtype=np.float64) / dim).astype(_F32) if dim else np.zeros(groups, _F32)
    out = np.subtract(x2, mean[:, None])
    std = None
    if normalize_variance and dim:
        var = np.einsum("gd,gd->g", out, out, dtype=np.float64) / dim
        std = np.sqrt(var).astype(_F32) + _F32(eps)
        with np.errstate(**_QUIET):
            out /= std[:, None]
    return out.reshape(shape), std


def MVN(x, normalize_variance=True, across_channels=False, eps=1e-9):
    """Mean-variance normalization; y has Caffe's legacy 4-D shape (num, channels, height, width).

    Per sample (across_channels) or per (sample, channel): y = x - mean, and with
    normalize_variance y = (x - mean) / (sqrt(E[(x - mean)^2]) + eps) (eps is added to the
    standard deviation, not to the variance).
    """
    return _mvn(x, normalize_variance, across_channels, eps)[0]


def mvn_backward(dy, y, std, across_channels: bool, in_place: bool = False):
    """dL/dx of :func:`MVN` for top diff ``dy`` and top ``y`` (both 4-D), per group of ``dim`` elements.

    Without variance normalization (``std`` None): dx = dy - mean(dy). With it, ``std`` (groups,)
    being the forward's sqrt(var) + eps:

        dx = (dy - (sum(dy) + y * sum(dy * y)) / dim) / std

    In place (``in_place``, with variance normalization), Caffe's Backward_cpu builds the bottom
    diff in the memory of the top diff it is still reading: ``sum(dy)`` is taken after that memory
    holds ``y * s`` (s = sum(dy * y)), and the final ``caffe_cpu_axpby(1, top_diff, -1/dim, diff)``
    (``diff *= -1/dim`` then ``diff += top_diff``) reads the diff itself, already scaled, so Caffe
    computes

        dx = -2/dim * s * (y + sum(y * s) / s) / std  =  -2/dim * (y * s + sum(y * s)) / std

    which the executor reproduces (it is not the gradient; an in-place MVN trains wrongly in Caffe).
    """
    groups = y.shape[0] if across_channels else y.shape[0] * y.shape[1]
    dy2 = dy.reshape(groups, -1)
    dim = dy2.shape[1]
    if std is None:
        return (dy2 - (dy2.sum(axis=1, dtype=np.float64) / dim).astype(_F32)[:, None]).reshape(dy.shape)
    y2 = y.reshape(groups, -1)
    if in_place:
        s = np.einsum("gd,gd->g", dy2, y2, dtype=np.float64).astype(_F32)[:, None]
        aliased = y2 * s
        aliased += (aliased.sum(axis=1, dtype=np.float64)).astype(_F32)[:, None]
        aliased *= _F32(-1.0 / dim)
        aliased += aliased
        with np.errstate(**_QUIET):
            aliased /= std[:, None]
        return aliased.reshape(dy.shape)
    acc = y2 * np.einsum("gd,gd->g", dy2, y2, dtype=np.float64).astype(_F32)[:, None]
    acc += dy2.sum(axis=1, dtype=np.float64).astype(_F32)[:, None]
    dx = dy2 - acc * _F32(1.0 / dim)
    with np.errstate(**_QUIET):
        dx /= std[:, None]
    return dx.reshape(dy.shape)


@register("MVN")
class MVNLayer(Layer):
    """Caffe's MVN layer (see :func:`MVN`); its top is reshaped to 4 axes, as Caffe does."""

    writes_unpropagated_diffs = True  # Backward_cpu ignores propagate_down
    _std = None

    def reshape(self, bottom_shapes):
        try:
            return [_legacy4(bottom_shapes[0])]
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' (MVN): {e}") from None

    def forward(self, bottoms):
        p = self.lp.mvn_param
        out, self._std = _mvn(bottoms[0], p.normalize_variance, p.across_channels, p.eps)
        return [out]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """See :func:`mvn_backward` (the top as Caffe holds it at backward time)."""
        dy = top_diffs[0]
        y = tops[0].reshape(dy.shape)
        return [mvn_backward(dy, y, self._std, self.lp.mvn_param.across_channels, self.in_place)]


# ------------------------------------------------------------------------ Normalize (SSD)
def _l2_normalize(x, across_spatial, eps):
    """x / norm and norm: (N,) across_spatial, else (N, S) over the channels; x viewed as (N, C, S)."""
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
    return out, norm


def _scale_view(scale, channel_shared: bool, c: int):
    scale = np.asarray(scale, _F32)
    return scale.reshape(-1)[0] if channel_shared else scale.reshape(1, c, 1)


def Normalize(x, scale, across_spatial=True, channel_shared=True, eps=1e-10):
    """SSD's L2 normalization of x (N, C, ...) followed by a learned scale.

    across_spatial: y = x / sqrt(sum_{c,h,w} x^2 + eps) per sample; otherwise
    y = x / sqrt(sum_c x^2 + eps) per (sample, position). Then y *= scale (one value when
    channel_shared, else per channel).
    """
    if x.ndim < 2:
        raise ValueError(f"Normalize needs a bottom of >= 2 axes, got shape {list(x.shape)}")
    out, _ = _l2_normalize(x, across_spatial, eps)
    out *= _scale_view(scale, channel_shared, x.shape[1])
    return out.reshape(x.shape)


def normalize_backward(dy, x, y, norm, scale, across_spatial: bool, channel_shared: bool):
    """Gradients of :func:`Normalize`, x / y / dy viewed as (N, C, S), ``norm`` from the forward.

    Returns (dx, d scale). With s the scale:

        dx = s * (dy - x * <x, dy> / norm^2) / norm
        d scale = sum(y * dy) / s        (per channel unless channel_shared)

    the dot product <x, dy> per sample (across_spatial) or per (sample, position). As the fork,
    d scale divides y * dy by the scale instead of using x / norm, and reads x and y as Caffe
    holds them at backward time.
    """
    n, c = x.shape[0], x.shape[1]
    x3, y3, dy3 = (a.reshape(n, c, -1) for a in (x, y, dy))
    s = _scale_view(scale, channel_shared, c)
    with np.errstate(**_QUIET):
        if channel_shared:
            dscale = np.asarray(np.float64(np.einsum("ncs,ncs->", y3, dy3, dtype=np.float64)) / np.float64(s),
                                _F32)
        else:
            per = np.einsum("ncs,ncs->nc", y3, dy3, dtype=np.float64).astype(_F32)
            dscale = (per / s.reshape(1, c)).sum(axis=0, dtype=np.float64).astype(_F32)
        if across_spatial:
            a = np.einsum("ncs,ncs->n", x3, dy3, dtype=np.float64).astype(_F32)
            dx = dy3 - x3 * (a / norm / norm)[:, None, None]
            dx *= (1.0 / norm.astype(np.float64)).astype(_F32)[:, None, None]
        else:
            a = np.einsum("ncs,ncs->ns", x3, dy3, dtype=np.float64).astype(_F32)
            dx = dy3 - x3 * a[:, None, :] / np.square(norm)[:, None, :]
            dx /= norm[:, None, :]
    dx *= s
    return dx.reshape(x.shape), dscale


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
        x = bottoms[0]
        if x.ndim < 2:
            raise ValueError(f"Normalize needs a bottom of >= 2 axes, got shape {list(x.shape)}")
        out, self._norm = _l2_normalize(x, p.across_spatial, p.eps)
        out *= _scale_view(self.blobs[0].data, p.channel_shared, x.shape[1])
        return [out.reshape(x.shape)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """See :func:`normalize_backward`; the scale's diff accumulates."""
        p = self.lp.norm_param
        dx, dscale = normalize_backward(top_diffs[0], bottoms[0], tops[0], self._norm, self.blobs[0].data,
                                        p.across_spatial, p.channel_shared)
        if self.param_propagate_down[0]:  # (Caffe computes it first, from the top diff: right in place too)
            self.blobs[0].diff += dscale.reshape(self.blobs[0].shape)
        if self.in_place and propagate_down[0]:
            return [self.in_place_zero_diff(bottoms[0], "writes the bottom diff over the top diff it shares "
                                                        "before subtracting it")]
        return [dx if propagate_down[0] else None]
