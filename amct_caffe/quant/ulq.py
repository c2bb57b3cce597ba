"""ULQ: quantization-aware retraining of an activation's clip range ``[clip_min, clip_max]``.

Forward, with ``b = num_bits``, ``L = 2^b - 1`` and ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``::

    fixed_min          -> clip_min = 0 (the input follows a ReLU)
    ClipCheck          clip_max <= clip_min -> restore both previous values;
                       else clip_max < 0    -> restore clip_max;
                       else clip_min > 0    -> restore clip_min;
                       else remember both as the new previous values
    s = f32(clip_max - clip_min) / L          (s < FLT_EPSILON -> s = 1, o = qmin)
    o = clamp(round(qmin - clip_min / s), qmin, qmax)        (= round(-ceil(L/2) - clip_min/s))
    y = (clamp(round(x / s) + o, qmin, qmax) - o) * s        (``fake_quant``)

Backward (incoming gradient ``g``; the LSQ-style estimator of the vendor code)::

    upper = x > s * (qmax - o),    lower = x < s * (qmin - o)
    t     = (upper ? clip_max : lower ? clip_min : x) / s
    e     = (round(t) - t) / L
    dL/dx        = g inside the range, 0 outside
    dL/dclip_max = sum (e + upper) * g,     dL/dclip_min = sum (lower - e) * g   (float64 sums)

These are the exact gradients of the surrogate ``y~ = clamp(x) + s * rho`` in which the rounding
residual ``rho = round(t) - t`` and the masks are held constant (``ds/dclip_max = 1/L``,
``ds/dclip_min = -1/L``); the tests check them against finite differences of that surrogate.

Rounding is half away from zero like every other kernel here; the vendor's C++ ULQ used
``rint`` (halves to even). We keep one rule so that a retrained model's fake-quant and its
deployed Quant layer agree.
"""

from __future__ import annotations

import numpy as np

from ._backend import call_kernel, resolve
from ._common import FLT_EPSILON, check_num_bits, process_scale, qrange, round_half_away
from .fake_quant import fake_quant

__all__ = ["UlqQuantizer", "ulq_backward", "ulq_clip_check", "ulq_forward", "ulq_scale_offset"]


def ulq_clip_check(clip_max: float, clip_min: float, prev_max: float, prev_min: float) -> tuple:
    """Apply ClipCheck; returns ``(clip_max, clip_min, prev_max, prev_min)`` as float32 values."""
    cmax, cmin, pmax, pmin = (np.float32(v) for v in (clip_max, clip_min, prev_max, prev_min))
    if cmax <= cmin:
        cmax, cmin = pmax, pmin
    elif cmax < 0:
        cmax = pmax
    elif cmin > 0:
        cmin = pmin
    else:
        pmax, pmin = cmax, cmin
    return cmax, cmin, pmax, pmin


def ulq_scale_offset(clip_max: float, clip_min: float, num_bits: int = 8, *,
                     backend: str | None = None) -> tuple[float, int]:
    """``(scale, offset)`` of a clip range (see module doc)."""
    num_bits = check_num_bits(num_bits, 2, 16, "ULQ retrain_data_config")
    if resolve(backend) == "kernel":
        return call_kernel("ulq_scale_offset", float(clip_max), float(clip_min), num_bits)
    qmin, qmax = qrange(num_bits)
    s = (np.float32(clip_max) - np.float32(clip_min)) / np.float32(2**num_bits - 1)
    if np.isfinite(s) and s < np.float32(FLT_EPSILON):
        return 1.0, qmin
    s = process_scale(s, "UlqQuant")[0]
    o = np.clip(round_half_away(np.float32(qmin) - np.float32(clip_min) / s), qmin, qmax)
    return float(s), int(o)


def ulq_forward(x: np.ndarray, clip_max: float, clip_min: float, num_bits: int = 8, *,
                backend: str | None = None) -> tuple[np.ndarray, float, int]:
    """Fake-quantize ``x`` on the clip range (after ClipCheck); returns ``(y, scale, offset)``."""
    scale, offset = ulq_scale_offset(clip_max, clip_min, num_bits, backend=backend)
    return fake_quant(x, scale, offset, num_bits, backend=backend), scale, offset


def ulq_backward(x: np.ndarray, grad: np.ndarray, clip_max: float, clip_min: float, num_bits: int = 8, *,
                 backend: str | None = None) -> tuple[np.ndarray, float, float]:
    """``(dL/dx, dL/dclip_max, dL/dclip_min)`` for the forward at the same clip values."""
    scale, offset = ulq_scale_offset(clip_max, clip_min, num_bits, backend=backend)
    x = np.ascontiguousarray(x, dtype=np.float32)
    g = np.ascontiguousarray(grad, dtype=np.float32)
    if x.shape != g.shape:
        raise ValueError(f"ULQ backward: x {x.shape} and grad {g.shape} differ in shape")
    if resolve(backend) == "kernel":
        return call_kernel("ulq_backward", x, g, float(clip_max), float(clip_min), scale, offset, num_bits)
    qmin, qmax = qrange(num_bits)
    s = np.float32(scale)
    upper = x > s * np.float32(qmax - offset)
    lower = x < s * np.float32(qmin - offset)
    t = np.where(upper, np.float32(clip_max), np.where(lower, np.float32(clip_min), x)) / s
    e = (round_half_away(t) - t) / np.float32(2**num_bits - 1)
    g64 = g.astype(np.float64)
    grad_max = float(np.sum((e + upper.astype(np.float32)).astype(np.float64) * g64))
    grad_min = float(np.sum((lower.astype(np.float32) - e).astype(np.float64) * g64))
    return np.where(upper | lower, np.float32(0), g).astype(np.float32), grad_max, grad_min


class UlqQuantizer:
    """Per-layer ULQ state: the learnable clip values and ClipCheck's previous values.

    ``clip_max``/``clip_min`` are the learnable parameters (the training loop updates them from
    the gradients ``backward`` returns); ``forward`` applies ``fixed_min`` and ClipCheck first.
    """

    def __init__(self, clip_max: float, clip_min: float, num_bits: int = 8, fixed_min: bool = False, *,
                 backend: str | None = None) -> None:
        self.num_bits = check_num_bits(num_bits, 8, 16, "ULQ retrain_data_config")
        self.fixed_min = fixed_min
        self.backend = backend
        self.clip_max, self.clip_min = np.float32(clip_max), np.float32(0 if fixed_min else clip_min)
        self.prev_max, self.prev_min = self.clip_max, self.clip_min

    def _check(self) -> None:
        if self.fixed_min:
            self.clip_min = np.float32(0)
        self.clip_max, self.clip_min, self.prev_max, self.prev_min = ulq_clip_check(
            self.clip_max, self.clip_min, self.prev_max, self.prev_min)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Fake-quantized ``x`` with the current (checked) clip range."""
        self._check()
        y, self.scale, self.offset = ulq_forward(x, self.clip_max, self.clip_min, self.num_bits,
                                                 backend=self.backend)
        return y

    def backward(self, x: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Gradients for ``x``, ``clip_max`` and ``clip_min`` (``clip_min``'s is 0 with fixed_min)."""
        gx, gmax, gmin = ulq_backward(x, grad, self.clip_max, self.clip_min, self.num_bits,
                                      backend=self.backend)
        return gx, gmax, (0.0 if self.fixed_min else gmin)
