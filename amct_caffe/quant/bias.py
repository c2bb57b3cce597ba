"""Bias quantization to int32 for the deploy model.

For output channel ``c`` (``scale_w`` has C entries, or 1 for a per-tensor weight scale)::

    deq_c  = float32(scale_w[c] * scale_d)            (the same product packed into deq_scale)
    bias_q = round(f64(bias[c]) / f64(deq_c))          (halves away from zero)

``bias_q`` must lie in ``[-2^31, 2^31 - 1]``; otherwise the layer cannot be deployed with int32
bias and the error suggests skipping its quantization. The division is done in float64 because
int32 values beyond 2^24 are not exact in float32.
"""

from __future__ import annotations

import numpy as np

from ._backend import call_kernel, resolve
from ._common import INT32_MAX, INT32_MIN, QuantizationError, round_half_away

__all__ = ["dequantize_bias", "quantize_bias"]


def _deq(n: int, scale_w: np.ndarray, scale_d: float) -> np.ndarray:
    if scale_w.size not in (1, n):
        raise QuantizationError(f"bias quantization: scale_w has {scale_w.size} values for {n} bias channels")
    deq = (scale_w * np.float32(scale_d)).astype(np.float32)
    if not (np.isfinite(deq).all() and (deq > 0).all()):
        raise QuantizationError("bias quantization: scale_w * scale_d must be finite and > 0")
    return np.broadcast_to(deq, (n,))


def quantize_bias(bias: np.ndarray, scale_w: np.ndarray, scale_d: float, *,
                  backend: str | None = None) -> np.ndarray:
    """float32 bias [C] -> int32 [C] (see module doc)."""
    b = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    sw = np.ascontiguousarray(scale_w, dtype=np.float32).reshape(-1)
    if resolve(backend) == "kernel":
        return call_kernel("quantize_bias", b, sw, float(np.float32(scale_d)))
    deq = _deq(b.size, sw, scale_d)
    v = round_half_away(b.astype(np.float64) / deq.astype(np.float64))
    bad = ~((v >= INT32_MIN) & (v <= INT32_MAX))
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        raise QuantizationError(
            f"bias quantization: channel {c} bias {float(b[c])!r} / deq_scale {float(deq[c])!r} does not fit "
            "in int32; skip quantizing this layer (quant_enable: false)")
    return v.astype(np.int32)


def dequantize_bias(bias_q: np.ndarray, scale_w: np.ndarray, scale_d: float) -> np.ndarray:
    """int32 [C] -> float32 ``bias_q * deq`` (the fake-quant model's bias)."""
    q = np.asarray(bias_q).reshape(-1)
    deq = _deq(q.size, np.asarray(scale_w, dtype=np.float32).reshape(-1), scale_d)
    return (q.astype(np.float64) * deq.astype(np.float64)).astype(np.float32)
