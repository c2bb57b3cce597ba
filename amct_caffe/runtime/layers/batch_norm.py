"""BatchNorm and the fork's BatchNormKyle (``batch_norm_layer.cpp``, ``batch_norm_kyle_layer.cpp``).

x is (N, C, ...) (or (N,) with C = 1); statistics are per channel (axis 1) over the
``M = count / C`` other elements. With ``use_global_stats`` (default: phase == TEST) the layer
normalizes with the stored statistics; otherwise with the batch's, and updates the stored ones.
Float32 throughout. On batch statistics the layer makes Caffe's own BLAS calls (:mod:`.batch_norm_caffe`, its
bytes); without numpy's OpenBLAS at hand, and for the stored statistics' updates of BatchNormKyle and of the
calibration layers, the reductions accumulate in float64 (closer to the exact value than Caffe's sums).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.io import TEST
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers import batch_norm_caffe
from amct_caffe.runtime.layers.libm_float import powf
from amct_caffe.runtime.layers.channel_sums import batch_norm_backward_batch_stats, channel_sums
from amct_caffe.ops import register

_F32 = np.float32
_QUIET = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}


def per_channel(v, ndim: int):
    """Reshape a (C,) vector to broadcast against an (N, C, ...) array of ``ndim`` axes."""
    return np.asarray(v, _F32).reshape((-1,) + (1,) * max(ndim - 2, 0))


def global_moments(mean, variance, moving_average_factor):
    """Caffe's stored statistics: (mean, variance) = blobs[0:2] / blobs[2][0], or 0 when it is 0.

    Blob 2 accumulates the moving-average normalizer during training; a zero factor turns the
    scale factor to 0, not to inf.
    """
    f = _F32(np.asarray(moving_average_factor, _F32).reshape(-1)[0])
    sf = _F32(0) if f == 0 else _F32(1) / f
    return np.asarray(mean, _F32) * sf, np.asarray(variance, _F32) * sf


def batch_moments(x):
    """Per-channel (axis 1) mean and biased variance E[(x - mean)^2] of x over all other axes, float32."""
    c = 1 if x.ndim == 1 else x.shape[1]
    x3 = x.reshape(x.shape[0], c, -1)
    mean = x3.sum(axis=(0, 2), dtype=np.float64) / (x3.shape[0] * x3.shape[2])
    # Caffe squares the float32 difference x - mean (its top data), then averages
    centered = x3 - mean.astype(_F32)[None, :, None]
    var = np.einsum("ncs,ncs->c", centered, centered, dtype=np.float64) / (x3.shape[0] * x3.shape[2])
    return mean.astype(_F32), var.astype(_F32)


def _std(variance, eps):
    """(variance + eps)^0.5 per channel, float32: Caffe's ``temp_``, kept for the backward.

    Caffe takes the power by ``caffe_powx``, glibc's ``powf(v, 0.5f)``, which is not always the
    correctly rounded square root: an ulp apart in a channel changes every value of it."""
    with np.errstate(**_QUIET):
        return powf(np.asarray(variance, _F32) + _F32(eps), 0.5)


def _normalize(x, mean, std):
    """(x - mean) / std per channel: one subtraction and one division, as Caffe."""
    out = np.subtract(x, per_channel(mean, x.ndim))
    with np.errstate(**_QUIET):
        out /= per_channel(std, x.ndim)
    return out


def BatchNorm(x, mean, variance, moving_average_factor, eps=1e-5):
    """y = (x - m) / sqrt(v + eps) with the stored statistics (use_global_stats).

    x: (N, C, ...) (or (N,) with C = 1); mean, variance: (C,); moving_average_factor: (1,);
    m, v = mean / factor, variance / factor (see :func:`global_moments`).
    """
    m, v = global_moments(mean, variance, moving_average_factor)
    return _normalize(x, m, _std(v, eps))


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


def batch_norm_backward(dy, x_norm, std, use_global_stats: bool):
    """dL/dx of y = (x - mean) / std, shapes (N, C, ...); ``std`` (C,) is sqrt(var + eps).

    use_global_stats (the statistics are constants): dx = dy / std. Batch statistics (mean and
    variance are functions of x):

        dx = (dy - mean(dy) - mean(dy * y) * y) / std

    the means per channel over the M = count / C elements, computed as Caffe does:
    ``dy - (sum(dy) + y * sum(dy * y)) / M``.
    """
    if not use_global_stats:  # the sums and the elementwise pass in C++ where built
        return batch_norm_backward_batch_stats(dy, x_norm, std)
    with np.errstate(**_QUIET):
        return np.divide(dy, per_channel(std, dy.ndim))


class ChannelStatisticsLayer(Layer):
    """A layer holding BatchNorm's blobs: mean (C,), variance (C,), moving-average factor (1,), where
    C is axis 1 of the bottom."""

    def _channels(self, shape) -> int:
        if len(shape) < 2:  # (Caffe's setup takes one channel, then its Reshape checks axis 1, which fails)
            raise GraphError(f"layer '{self.name}' ({self.type}): the bottom {list(shape)} has no channel axis; "
                             "Caffe's Reshape refuses it (Check failed: axis 1 out of range): give it (N, C, ...)")
        return int(shape[1])

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
    batch statistics and, as Caffe does, updates its blobs on every forward (factor = factor * f + 1,
    mean = batch mean + f * mean, variance = m / (m - 1) * batch variance + f * variance,
    f = moving_average_fraction, m = count / C).

    The blobs get no gradient: this fork's LayerSetUp does not force their lr_mult to 0 (newer
    Caffe does), so with the default lr_mult they count as learnable, make the layer need
    backward, and keep a zero diff — a solver's weight decay would still move them, as in the fork.
    """

    n_blobs = 3
    # Backward_cpu writes bottom 0's diff without looking at propagate_down
    writes_unpropagated_diffs = True
    # batch statistics by Caffe's BLAS calls (batch_norm_caffe.py); the fork's BatchNormKyle keeps float64 sums
    caffe_sums = True

    def __init__(self, lp, phase: int = TEST):
        super().__init__(lp, phase)
        p = lp.batch_norm_param
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else phase == TEST
        self.eps = p.eps
        self.fraction = _F32(p.moving_average_fraction)
        self._x_norm = None
        self._std = None
        self._temp = None  # Caffe's temp_ (x-shaped std) when the batch statistics took its BLAS calls

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
        self._temp = None
        if not self.use_global_stats and self.caffe_sums and x.ndim >= 2 and batch_norm_caffe.available():
            blobs = [b.data for b in self.blobs[:3]]
            if all(b.dtype == _F32 and b.flags.c_contiguous and b.flags.writeable for b in blobs):
                self._x_norm, self._temp, self._std = batch_norm_caffe.forward(x, *blobs, self.fraction, self.eps)
                return [self._x_norm]
        mean, var = self._moments(x)
        self._std = _std(var, self.eps)
        # Caffe's x_norm_: the normalized value survives later in-place layers for the backward
        self._x_norm = _normalize(x, mean, self._std)
        return [self._x_norm]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """See :func:`batch_norm_backward`; no gradient for the statistics blobs."""
        if self._temp is not None:
            return [batch_norm_caffe.backward(top_diffs[0], self._x_norm, self._temp)]
        return [batch_norm_backward(top_diffs[0], self._x_norm, self._std, self.use_global_stats)]


@register("BatchNormKyle")
class BatchNormKyleLayer(BatchNormLayer):
    """The fork's BatchNormKyle: BatchNorm, then y = alpha * y + beta when ``use_alpha_beta``.

    Blobs 3 and 4 (alpha, beta; (C,)) exist only with use_alpha_beta; filled 1 and 0.
    """

    caffe_sums = False

    def param_shapes(self, bottom_shapes):
        shapes = super().param_shapes(bottom_shapes)
        if self.lp.batch_norm_param.use_alpha_beta:
            shapes += [shapes[0], shapes[0]]
        return shapes

    def param_fillers(self):
        one = type(self.lp.batch_norm_param.weight_filler)(type="constant", value=1.0)
        return [None, None, None, one, None]

    def forward(self, bottoms):
        (x_norm,) = super().forward(bottoms)
        if not self.lp.batch_norm_param.use_alpha_beta:
            return [x_norm]
        out = np.multiply(x_norm, per_channel(self.blobs[3].data, x_norm.ndim))
        out += per_channel(self.blobs[4].data, out.ndim)
        return [out]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dx as BatchNorm's for the top diff ``dy * alpha``; with use_alpha_beta and batch statistics
        d alpha = sum(dy * x_norm), d beta = sum(dy) per channel.

        As the fork: the alpha / beta diffs are *assigned* (its gemv has beta 0) whatever
        param_propagate_down says, and not computed at all with use_global_stats (it returns early).
        """
        dy = top_diffs[0]
        alpha_beta = self.lp.batch_norm_param.use_alpha_beta
        d_norm = np.multiply(dy, per_channel(self.blobs[3].data, dy.ndim)) if alpha_beta else dy
        dx = batch_norm_backward(d_norm, self._x_norm, self._std, self.use_global_stats)
        if alpha_beta and not self.use_global_stats:
            s_dy, s_dyx = channel_sums(dy, self._x_norm)
            self.blobs[3].diff = s_dyx.astype(_F32).reshape(self.blobs[3].shape)
            self.blobs[4].diff = s_dy.astype(_F32).reshape(self.blobs[4].shape)
        return [dx]
