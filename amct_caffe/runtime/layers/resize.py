"""Resampling layers: Upsample, Interp, BilinearInterpolate, Resize.

All work on ``(N, C, H, W)`` blobs. The bilinear ones are separable, so each is computed as
``y = A_h @ x @ A_w.T`` with per-axis interpolation matrices ``A (out, in)`` whose rows hold
the two weights of the source cells; the coordinates and weights are computed in float32
exactly as the C++ does, so the cell choice (floor / truncation) matches bit for bit.

* Upsample (the brocolli fork's ``upsample_layer.cpp``): nearest neighbour by an integer
  factor, ``y[..., h, w] = x[..., h // s, w // s]``; ``scale`` applies to the last two axes
  (``dims_num: 4``) or the last one (``dims_num: 3``). ATC's fields ``stride``/``stride_h``/
  ``stride_w`` give the factors when set explicitly. With two bottoms it is SegNet's
  Upsample: ``x`` is scattered to the flat plane indices of a MAX-pooling mask, into a
  ``(upsample_h, upsample_w)`` plane (or ``(H*scale, W*scale)``).
* Interp (PSPNet / DeepLab ``interp_layer.cpp`` + ``caffe_cpu_interp2``): align-corners
  bilinear, ``r = (in-1)/(out-1)``, ``src = r*i``, ``i0 = int(src)``; the input is first
  cropped by ``-pad_beg`` / ``-pad_end`` (only non-positive pads). Output size from
  ``height``/``width``, ``zoom_factor`` (``in + (in-1)*(z-1)``), ``shrink_factor``
  (``(in-1)//s + 1``), both (shrink then zoom), or a second bottom's H, W.
* BilinearInterpolate (fork): ``src = (in/out)*(i+0.5) - 0.5`` (or ``(in-1)/(out-1)*i`` with
  align_corners), clamped to ``[0, in-1]``, ``i0 = clamp(floor(src), 0, in-2)``. Its output
  size is fixed when the layer is set up (Caffe computes it in LayerSetUp).
* Resize (fork, ``util_img.cpp``): ``src = i * (in/out)``, ``i0 = floor(src)``; the weight
  of cell ``i0+1`` is dropped (not renormalised) when it lies outside the input.

Backward: Resize has one (the transpose of its forward, as the fork's Backward_cpu). The fork's
Upsample and BilinearInterpolate have an empty Backward_cpu (their bottoms keep a zero diff):
reproduced, with a warning (:class:`~amct_caffe.runtime.layer.EmptyBackward`). Interp is not in
this fork; its backward follows the PSPNet/DeepLab fork's (the transpose of its forward).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import EmptyBackward, Layer
from amct_caffe.runtime.layers.pooling import MaxUnPool
from amct_caffe.ops import register

_F = np.float32


def _matrix(n_in: int, i0, w0, i1, w1) -> np.ndarray:
    """(len(i0), n_in) matrix with w0 at column i0 and w1 at i1 in each row; cells outside
    ``[0, n_in)`` are dropped (their C++ weight multiplies nothing)."""
    a = np.zeros((len(i0), n_in), np.float64)
    rows = np.arange(len(i0))
    for idx, w in ((i0, w0), (i1, w1)):
        ok = (idx >= 0) & (idx < n_in)
        np.add.at(a, (rows[ok], idx[ok]), np.asarray(w, np.float64)[ok])
    return a.astype(np.float32)


def _separable(x: np.ndarray, ah: np.ndarray, aw: np.ndarray) -> np.ndarray:
    """``ah @ x @ aw.T`` over the last two axes of ``x`` (N, C, H, W)."""
    n, c, h, w = x.shape
    t = np.ascontiguousarray(x, np.float32).reshape(-1, w) @ aw.T  # (N*C*H, Wo)
    t = t.reshape(n * c, h, -1)
    return np.matmul(ah, t).reshape(n, c, ah.shape[0], aw.shape[0])


def _check4(layer, shape):
    if len(shape) != 4:
        raise GraphError(f"layer '{layer.name}' ({layer.type}): input must have 4 axes (N, C, H, W), "
                         f"got shape {list(shape)}")


# ------------------------------------------------------------------------ Upsample
def Upsample(x, *, factor_h=2, factor_w=2):  # noqa: N802 - Caffe type name
    """Nearest-neighbour upsampling of the last two axes by integer factors."""
    x = np.asarray(x, np.float32)
    if factor_h > 1:
        x = np.repeat(x, factor_h, axis=-2)
    if factor_w > 1:
        x = np.repeat(x, factor_w, axis=-1)
    return np.ascontiguousarray(x)


@register("Upsample")
class UpsampleLayer(EmptyBackward, Layer):
    """Nearest upsampling (1 bottom) or SegNet's mask unpooling (2 bottoms); see the module doc."""

    num_bottoms = (1, 2)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        up = lp.upsample_param
        has = {f.name for f, _ in up.ListFields()}
        self.dims = up.dims_num
        if self.dims not in (3, 4):
            self._fail(f"dims_num must be 3 or 4, got {self.dims}")
        if "stride_h" in has or "stride_w" in has or "stride" in has:  # ATC's fields
            if "scale" in has:
                self._fail("give scale or stride/stride_h/stride_w, not both")
            if "stride" in has and ("stride_h" in has or "stride_w" in has):
                self._fail("give stride or stride_h/stride_w, not both")
            self.factors = (up.stride, up.stride) if "stride" in has else (up.stride_h, up.stride_w)
        else:
            self.factors = (up.scale, up.scale)
        self.size = None
        if "upsample_h" in has or "upsample_w" in has:
            if not ("upsample_h" in has and "upsample_w" in has) or len(lp.bottom) != 2:
                self._fail("upsample_h and upsample_w go together and need a second (mask) bottom")
            self.size = (up.upsample_h, up.upsample_w)
        if min(self.factors) <= 0:
            self._fail(f"upsampling factors must be positive, got {self.factors}")
        if len(lp.bottom) == 2 and self.dims != 4:
            self._fail("the two-bottom (mask) form needs dims_num 4")

    def _fail(self, msg):
        raise GraphError(f"layer '{self.name}' (Upsample): {msg}")

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != self.dims:
            self._fail(f"dims_num {self.dims} needs a {self.dims}-D bottom, got shape {list(shape)}")
        if len(bottom_shapes) == 2:
            if tuple(bottom_shapes[1]) != shape:
                self._fail(f"the mask {list(bottom_shapes[1])} must have the data's shape {list(shape)}")
            out = self.size or (shape[2] * self.factors[0], shape[3] * self.factors[1])
            return [shape[:2] + tuple(out)]
        if self.dims == 3:
            return [shape[:-1] + (shape[-1] * self.factors[1],)]
        return [shape[:-2] + (shape[-2] * self.factors[0], shape[-1] * self.factors[1])]

    def forward(self, bottoms):
        x = bottoms[0]
        if len(bottoms) == 2:
            out = self.size or (x.shape[2] * self.factors[0], x.shape[3] * self.factors[1])
            return [MaxUnPool(x, bottoms[1], out_h=out[0], out_w=out[1])]
        if self.dims == 3:
            return [Upsample(x, factor_h=1, factor_w=self.factors[1])]
        return [Upsample(x, factor_h=self.factors[0], factor_w=self.factors[1])]


# ------------------------------------------------------------------------ Interp
def _interp2_axis(n_in: int, n_out: int) -> np.ndarray:
    """caffe_cpu_interp2's weights along one axis (align corners, float32 coordinates)."""
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    r = _F(n_in - 1) / _F(n_out - 1) if n_out > 1 else _F(0)
    src = r * np.arange(n_out, dtype=np.float32)
    i0 = src.astype(np.int64)  # C++ int conversion truncates
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    lam0 = _F(1) - lam1
    i1 = i0 + (i0 < n_in - 1)
    return _matrix(n_in, i0, lam0, i1, lam1)


def Interp(x, *, height, width, pad_beg=0, pad_end=0):  # noqa: N802 - Caffe type name
    """PSPNet/DeepLab bilinear (align corners) resize of ``x`` cropped by the non-positive pads."""
    x = np.asarray(x, np.float32)
    h, w = x.shape[2:]
    crop = x[:, :, -pad_beg:h + pad_end, -pad_beg:w + pad_end]
    hi, wi = crop.shape[2:]
    if (hi, wi) == (height, width):
        return np.ascontiguousarray(crop)
    return _separable(crop, _interp2_axis(hi, height), _interp2_axis(wi, width))


@register("Interp")
class InterpLayer(Layer):
    """PSPNet/DeepLab Interp (needs ``interp_param`` in the schema); see :func:`Interp`."""

    num_bottoms = (1, 2)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        if "interp_param" not in lp.DESCRIPTOR.fields_by_name:
            self._fail("this caffe.proto has no interp_param")
        ip = lp.interp_param
        if ip.pad_beg > 0 or ip.pad_end > 0:
            self._fail("only non-positive pad_beg / pad_end (cropping) are supported")
        sized = ip.HasField("height") or ip.HasField("width")
        if len(lp.bottom) == 2 and (sized or ip.HasField("zoom_factor") or ip.HasField("shrink_factor")):
            self._fail("with a second bottom no height/width/zoom_factor/shrink_factor may be given")

    def _fail(self, msg):
        raise GraphError(f"layer '{self.name}' (Interp): {msg}")

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        _check4(self, shape)
        ip = self.lp.interp_param
        hi, wi = shape[2] + ip.pad_beg + ip.pad_end, shape[3] + ip.pad_beg + ip.pad_end
        zoom, shrink = ip.HasField("zoom_factor"), ip.HasField("shrink_factor")
        if len(bottom_shapes) == 2:
            _check4(self, bottom_shapes[1])
            out = tuple(bottom_shapes[1][2:])
        elif shrink or zoom:
            if (shrink and ip.shrink_factor < 1) or (zoom and ip.zoom_factor < 1):
                self._fail("zoom_factor and shrink_factor must be >= 1")
            out = (hi, wi)
            if shrink:
                out = tuple((v - 1) // ip.shrink_factor + 1 for v in out)
            if zoom:
                out = tuple(v + (v - 1) * (ip.zoom_factor - 1) for v in out)
        elif ip.HasField("height") and ip.HasField("width"):
            out = (ip.height, ip.width)
        else:
            self._fail("give height and width, zoom_factor and/or shrink_factor, or a second bottom")
        if hi <= 0 or wi <= 0 or min(out) <= 0:
            self._fail(f"empty input after cropping ({hi}x{wi}) or output ({out[0]}x{out[1]})")
        self.out = out
        return [shape[:2] + out]

    def forward(self, bottoms):
        ip = self.lp.interp_param
        return [Interp(bottoms[0], height=self.out[0], width=self.out[1], pad_beg=ip.pad_beg,
                       pad_end=ip.pad_end)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """The PSPNet/DeepLab fork's caffe_cpu_interp2_backward: each output's diff goes back to its
        (up to four) source cells with the forward's weights, ``dx_crop = A_h^T @ dy @ A_w``; the
        cells the pads crop away get 0, and a second (size) bottom gets no diff."""
        grads: list = [None] * len(bottoms)
        if not propagate_down[0]:
            return grads
        ip = self.lp.interp_param
        x = bottoms[0]
        h, w = x.shape[2:]
        dx = np.zeros(x.shape, np.float32)
        window = (slice(None), slice(None), slice(-ip.pad_beg, h + ip.pad_end), slice(-ip.pad_beg, w + ip.pad_end))
        hi, wi = dx[window].shape[2:]
        dy = np.asarray(top_diffs[0], np.float32)
        if (hi, wi) == tuple(self.out):
            dx[window] = dy
        else:
            dx[window] = _separable(dy, _interp2_axis(hi, self.out[0]).T, _interp2_axis(wi, self.out[1]).T)
        grads[0] = dx
        return grads


# ------------------------------------------------------------------------ BilinearInterpolate
def _bilinear_axis(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    i = np.arange(n_out, dtype=np.float32)
    if align_corners:
        # float(src-1) / (dst-1) * i in float; for dst == 1 C++ divides by zero, we take 0
        r = _F(n_in - 1) / _F(n_out - 1) if n_out > 1 else _F(0)
        src = (r * i).astype(np.float32)
    else:
        # float(src)/dst * (i + 0.5) - 0.5: the product is done in double, then stored as float
        src = (np.float64(_F(n_in) / _F(n_out)) * (i.astype(np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.minimum(src, _F(n_in - 1))
    src = np.maximum(src, _F(0))
    i0 = np.clip(np.floor(src).astype(np.int64), 0, n_in - 2) if n_in >= 2 else np.full(n_out, -1, np.int64)
    i1 = i0 + 1
    return _matrix(n_in, i0, i1.astype(np.float32) - src, i1, src - i0.astype(np.float32))


def BilinearInterpolate(x, *, dst_h, dst_w, align_corners=True):  # noqa: N802 - Caffe type name
    """The fork's bilinear resize of ``x`` (N, C, H, W) to (dst_h, dst_w); see the module doc."""
    x = np.asarray(x, np.float32)
    h, w = x.shape[2:]
    return _separable(x, _bilinear_axis(h, dst_h, align_corners), _bilinear_axis(w, dst_w, align_corners))


@register("BilinearInterpolate")
class BilinearInterpolateLayer(EmptyBackward, Layer):
    """The fork's BilinearInterpolate: ``dst_h``/``dst_w`` or ``scale_factor`` (not both)."""

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        bp = lp.bilinear_interpolate_param
        sized = bp.HasField("dst_h") or bp.HasField("dst_w")
        if sized == bp.HasField("scale_factor"):
            raise GraphError(f"layer '{lp.name}' (BilinearInterpolate): give dst_h/dst_w or scale_factor "
                             "(exactly one of the two forms)")
        self.out = None

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        _check4(self, shape)
        if self.out is None:  # Caffe fixes the size in LayerSetUp, from the first bottom shape
            bp = self.lp.bilinear_interpolate_param
            if bp.HasField("scale_factor"):
                self.out = (int(_F(shape[2]) * _F(bp.scale_factor)), int(_F(shape[3]) * _F(bp.scale_factor)))
            else:
                self.out = (bp.dst_h if bp.HasField("dst_h") else shape[2],
                            bp.dst_w if bp.HasField("dst_w") else shape[3])
            if min(self.out) <= 0:
                raise GraphError(f"layer '{self.name}' (BilinearInterpolate): empty output size {self.out}")
        return [shape[:2] + self.out]

    def forward(self, bottoms):
        bp = self.lp.bilinear_interpolate_param
        return [BilinearInterpolate(bottoms[0], dst_h=self.out[0], dst_w=self.out[1],
                                    align_corners=bp.align_corners)]


# ------------------------------------------------------------------------ Resize
def _resize_axis(n_in: int, n_out: int) -> np.ndarray:
    scale = _F(n_in) / _F(n_out)
    src = (np.arange(n_out, dtype=np.float32) * scale).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    return _matrix(n_in, i0, np.abs(_F(1) - frac), i0 + 1, np.abs(frac))


def _resize_cells(n_in: int, n_out: int):
    """Per output index: the source cell ``i0``, its weight and the next cell's (util_img.cpp's
    float steps), and whether that next cell lies inside the input."""
    scale = _F(n_in) / _F(n_out)
    src = (np.arange(n_out, dtype=np.float32) * scale).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, np.abs(_F(1) - frac), np.abs(frac), i0 + 1 < n_in


def Resize(x, *, height, width):  # noqa: N802 - Caffe type name
    """The fork's Resize: bilinear with ``src = i * in/out``, edge weights dropped (module doc).

    Summed as BiLinearResizeMat_cpu does, so that the bytes are Caffe's (a separable product
    rounds differently, an ulp that can flip a later MAX between equal-looking values)::

        y = (wh0 ww0) x[i, j] + (wh0 ww1) x[i, j+1] + (wh1 ww0) x[i+1, j] + (wh1 ww1) x[i+1, j+1]

    each product of weights rounded, then each term, added left to right; a term whose cell is
    outside the input is left out (the last one needs both neighbours).
    """
    x = np.asarray(x, np.float32)
    h, w = x.shape[2:]
    i, wh0, wh1, down = _resize_cells(h, height)
    j, ww0, ww1, right = _resize_cells(w, width)
    i1, j1 = np.minimum(i + 1, h - 1), np.minimum(j + 1, w - 1)

    def cell(ii, jj):
        return x[:, :, ii[:, None], jj[None, :]]

    def weight(a, b):
        return (a[:, None] * b[None, :]).astype(np.float32)

    y = weight(wh0, ww0) * cell(i, j)
    y = np.where(right[None, :], y + weight(wh0, ww1) * cell(i, j1), y)
    y = np.where(down[:, None], y + weight(wh1, ww0) * cell(i1, j), y)
    both = down[:, None] & right[None, :]
    y = np.where(both, y + weight(wh1, ww1) * cell(i1, j1), y)
    return y.astype(np.float32)


@register("Resize")
class ResizeLayer(Layer):
    """The fork's Resize: ``resize_param.height/width``, or ``out_*_scale`` with is_pyramid_test."""

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        _check4(self, shape)
        rp = self.lp.resize_param
        if rp.is_pyramid_test:
            if not (rp.HasField("out_height_scale") and rp.HasField("out_width_scale")):
                raise GraphError(f"layer '{self.name}' (Resize): out_height_scale and out_width_scale are "
                                 "required")
            out = (int(_F(rp.out_height_scale) * _F(shape[2])), int(_F(rp.out_width_scale) * _F(shape[3])))
        else:
            if not (rp.HasField("height") and rp.HasField("width")):
                raise GraphError(f"layer '{self.name}' (Resize): resize_param.height and width are required")
            out = (rp.height, rp.width)
        if min(out) <= 0:
            raise GraphError(f"layer '{self.name}' (Resize): empty output size {out}")
        if self.in_place and out != tuple(shape[2:]):  # (its top, its input, would be reshaped before it is read)
            raise GraphError(f"layer '{self.name}' (Resize) works in place (top == bottom) while resizing "
                             f"{list(shape[2:])} to {list(out)}; give it a top of its own")
        self.out = out
        return [shape[:2] + out]

    def forward(self, bottoms):
        return [Resize(bottoms[0], height=self.out[0], width=self.out[1])]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """The fork's ResizeLayer::Backward_cpu: each output's diff goes back to its (up to four)
        source cells with the forward's weights, ``dx = A_h^T @ dy @ A_w``."""
        if not propagate_down[0]:
            return [None]
        if self.in_place:
            return [self.in_place_zero_diff(bottoms[0], "clears the diff it shares with the top first")]
        h, w = bottoms[0].shape[2:]
        ah, aw = _resize_axis(h, self.out[0]), _resize_axis(w, self.out[1])
        return [_separable(np.asarray(top_diffs[0], np.float32), ah.T, aw.T)]
