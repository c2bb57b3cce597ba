"""The ROI pooling family: py-faster-rcnn's ROIPooling, R-FCN's PSROIPooling, ROIAlign.

Ops are pure functions named after their Caffe type (keyword defaults = caffe.proto's); rois are
rows ``[batch, x1, y1, x2, y2]`` in input-image coordinates, scaled by ``spatial_scale``.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.runtime.layers.detection import OpLayer
from amct_caffe.ops import register

f32, f64 = np.float32, np.float64


def _round_away(x) -> np.ndarray:
    """C's round(): halves away from zero (numpy rounds them to even)."""
    x = np.asarray(x, f64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _rois(x, rois) -> tuple[np.ndarray, np.ndarray]:
    """ROI rows ``[batch, x1, y1, x2, y2]`` (float32) and their checked batch indices."""
    if np.size(rois) % 5:
        raise ValueError("the ROI blob must hold rows [batch, x1, y1, x2, y2]")
    rois = np.asarray(rois, f32).reshape(-1, 5)
    batch = rois[:, 0].astype(np.int64)
    if batch.size and (batch.min() < 0 or batch.max() >= x.shape[0]):
        raise ValueError(f"an ROI names image {int(batch.max())} of a batch of {x.shape[0]}")
    return rois, batch


def _pool_bins(start, size, pooled: int, limit: int):
    """py-faster-rcnn bins: ``[floor(k*b), ceil((k+1)*b)) + start`` clipped, b = size/pooled (float)."""
    b = size.astype(f32)[:, None] / f32(pooled)
    k = np.arange(pooled, dtype=f32)
    lo = np.floor(k * b).astype(np.int64) + start[:, None]
    hi = np.ceil((k + 1) * b).astype(np.int64) + start[:, None]
    return np.clip(lo, 0, limit), np.clip(hi, 0, limit)


def ROIPooling(x, rois, *, pooled_h=0, pooled_w=0, spatial_scale=1.0,  # noqa: N802
               spatial_scale_h=None, spatial_scale_w=None):
    """py-faster-rcnn ROI max pooling: ``(N, C, H, W)``, rois ``(R, 5)`` -> ``(R, C, pooled_h, pooled_w)``.

    The ROI is ``round(coord * scale)`` (inclusive ends, at least 1x1) with ATC's
    spatial_scale_h/_w overriding spatial_scale per axis; bins as ``_pool_bins``; an empty bin
    gives 0. Max over a rectangle is taken as the max over rows of the max over columns.
    """
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError("pooled_h and pooled_w must be > 0")
    rois, batch = _rois(x, rois)
    H, W = x.shape[2:]
    sh = f32(spatial_scale if spatial_scale_h is None else spatial_scale_h)
    sw = f32(spatial_scale if spatial_scale_w is None else spatial_scale_w)
    x0, y0, x1, y1 = (_round_away(rois[:, k] * s).astype(np.int64)
                      for k, s in ((1, sw), (2, sh), (3, sw), (4, sh)))
    hs, he = _pool_bins(y0, np.maximum(y1 - y0 + 1, 1), pooled_h, H)
    ws, we = _pool_bins(x0, np.maximum(x1 - x0 + 1, 1), pooled_w, W)
    out = np.zeros((len(rois), x.shape[1], pooled_h, pooled_w), f32)
    for r in range(len(rois)):
        top, bot = hs[r].min(), he[r].max()
        col_ok = we[r] > ws[r]
        if bot <= top or not col_ok.any():
            continue
        feat = x[batch[r], :, top:bot]
        cols = np.stack([feat[..., a:b].max(-1) if b > a else np.zeros(feat.shape[:2], f32)
                         for a, b in zip(ws[r], we[r], strict=True)], axis=-1)
        for ph in range(pooled_h):
            if he[r, ph] > hs[r, ph]:
                out[r, :, ph] = np.where(col_ok, cols[:, hs[r, ph] - top:he[r, ph] - top].max(1), 0)
    return out


def PSROIPooling(x, rois, *, spatial_scale=None, output_dim=None, group_size=None):  # noqa: N802
    """R-FCN position-sensitive ROI average pooling: ``(N, D*G*G, H, W)``, rois ``(R, 5)`` ->
    ``(R, D, G, G)`` with D = output_dim, G = group_size.

    Output (r, d, i, j) averages channel ``(d*G + i)*G + j`` over bin (i, j) of the ROI
    ``[round(x1), round(x2) + 1) * spatial_scale`` (at least 0.1 wide), bins floored/ceiled
    and clipped; empty bins give 0. The fork has only the CUDA kernel (its CPU forward is
    NOT_IMPLEMENTED); this follows the kernel, summing through a float64 integral image.
    """
    if spatial_scale is None or not output_dim or not group_size or output_dim < 0 or group_size < 0:
        raise ValueError("spatial_scale, output_dim > 0 and group_size > 0 are required")
    G, D = group_size, output_dim
    if x.shape[1] != D * G * G:
        raise ValueError(f"input has {x.shape[1]} channels, output_dim * group_size^2 = {D * G * G}")
    rois, batch = _rois(x, rois)
    n, c, H, W = x.shape
    r = _round_away(rois[:, 1:]).astype(f32)
    s = f32(spatial_scale)
    xs, ys, xe, ye = r[:, 0] * s, r[:, 1] * s, (r[:, 2] + f32(1)) * s, (r[:, 3] + f32(1)) * s
    bw = (np.maximum(xe - xs, f32(0.1)) / f32(G))[:, None]
    bh = (np.maximum(ye - ys, f32(0.1)) / f32(G))[:, None]
    k = np.arange(G, dtype=f32)
    h0 = np.clip(np.floor(k * bh + ys[:, None]), 0, H).astype(np.int64)[:, None, :, None]
    h1 = np.clip(np.ceil((k + 1) * bh + ys[:, None]), 0, H).astype(np.int64)[:, None, :, None]
    w0 = np.clip(np.floor(k * bw + xs[:, None]), 0, W).astype(np.int64)[:, None, None, :]
    w1 = np.clip(np.ceil((k + 1) * bw + xs[:, None]), 0, W).astype(np.int64)[:, None, None, :]
    integral = np.zeros((n, c, H + 1, W + 1))
    integral[:, :, 1:, 1:] = x.astype(f64).cumsum(2).cumsum(3)
    ch = (np.arange(D)[:, None, None] * G + np.arange(G)[:, None]) * G + np.arange(G)  # (D, G, G)
    b = batch[:, None, None, None]
    total = (integral[b, ch, h1, w1] - integral[b, ch, h0, w1]
             - integral[b, ch, h1, w0] + integral[b, ch, h0, w0])
    area = ((h1 - h0) * (w1 - w0)).astype(f32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((h1 > h0) & (w1 > w0), total.astype(f32) / area, f32(0)).astype(f32)


def _align_weights(start, end, pooled: int, ratio: int, size: int) -> np.ndarray:
    """(pooled, size): each bin's mean bilinear weight on each pixel along one axis."""
    length = max(end - start, f32(1))
    bin_size = f32(length / f32(pooled))
    grid = ratio if ratio > 0 else int(np.ceil(length / f32(pooled)))
    k = np.arange(pooled, dtype=f32)[:, None]
    pos = (start + k * bin_size + (np.arange(grid, dtype=f32) + f32(0.5)) * bin_size / f32(grid)).reshape(-1)
    inside = (pos >= -1) & (pos <= size)
    pos = np.maximum(pos, f32(0))
    low = pos.astype(np.int64)
    last = low >= size - 1
    low = np.where(last, size - 1, low)
    frac = np.where(last, f32(0), pos - low.astype(f32))
    weights = np.zeros((pooled * grid, size), f32)
    rows = np.arange(pooled * grid)
    np.add.at(weights, (rows, low), np.where(inside, f32(1) - frac, f32(0)))
    np.add.at(weights, (rows, np.where(last, low, low + 1)), np.where(inside, frac, f32(0)))
    return weights.reshape(pooled, grid, size).sum(1) / f32(grid)


def ROIAlign(x, rois, *, pooled_h=0, pooled_w=0, spatial_scale=1.0, sampling_ratio=-1,  # noqa: N802
             roi_end_mode=0):
    """ROIAlign as Detectron/Caffe2 computes it (average, not pixel-aligned), with ATC's fields:
    ``(N, C, H, W)``, rois ``(R, 5)`` -> ``(R, C, pooled_h, pooled_w)``.

    The ROI is ``[x1, x2] * spatial_scale`` (``roi_end_mode=1`` first adds one pixel to the
    end, as ATC/MindSpore document), at least 1x1. Each bin averages a grid of
    ``sampling_ratio`` (<= 0: ceil(bin size)) points per axis at the grid-cell centres,
    sampled bilinearly; a point outside ``[-1, H] x [-1, W]`` counts as 0, coordinates below
    0 clamp to 0 and the last row/column repeats. The weights are separable, so each ROI
    is ``Ay @ x[b] @ Ax.T``.
    """
    if pooled_h <= 0 or pooled_w <= 0 or roi_end_mode not in (0, 1):
        raise ValueError("need pooled_h, pooled_w > 0 and roi_end_mode 0 or 1")
    rois, batch = _rois(x, rois)
    H, W = x.shape[2:]
    s, end = f32(spatial_scale), f32(roi_end_mode)
    out = np.empty((len(rois), x.shape[1], pooled_h, pooled_w), f32)
    for r, roi in enumerate(rois):
        ay = _align_weights(roi[2] * s, (roi[4] + end) * s, pooled_h, sampling_ratio, H)
        ax = _align_weights(roi[1] * s, (roi[3] + end) * s, pooled_w, sampling_ratio, W)
        out[r] = ay @ x[batch[r]] @ ax.T
    return out


class _ROILayer(OpLayer):
    num_bottoms = 2

    def reshape(self, bottom_shapes):
        out = self._call([np.zeros(bottom_shapes[0][:2] + (1, 1), f32), np.zeros((0, 5), f32)])
        return [(int(np.prod(bottom_shapes[1])) // 5,) + out.shape[1:]]


@register("ROIPooling")
class ROIPoolingLayer(_ROILayer):
    op = staticmethod(ROIPooling)
    param = "roi_pooling_param"
    keys = ("pooled_h", "pooled_w", "spatial_scale", "spatial_scale_h", "spatial_scale_w")


@register("PSROIPooling")
class PSROIPoolingLayer(_ROILayer):
    op = staticmethod(PSROIPooling)
    param = "psroi_pooling_param"
    keys = ("spatial_scale", "output_dim", "group_size")


@register("ROIAlign")
class ROIAlignLayer(_ROILayer):
    op = staticmethod(ROIAlign)
    param = "roi_align_param"
    keys = ("pooled_h", "pooled_w", "spatial_scale", "sampling_ratio", "roi_end_mode")
