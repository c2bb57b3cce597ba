"""search_n: the shift bit ``n`` that requantizes a layer's int32 output to int16 with least error.

The SearchN layer sees the float output ``x`` of a quantized Convolution/InnerProduct, shaped
``[batch, C, inner]`` (``inner = H*W``), and the per-channel ``deq[c] = scale_w[c] * scale_d``::

    s32 = clamp(round(f64(x) / f64(deq[c])), -2^31, 2^31 - 1)              (back to the int32 sum)
    s16 = clamp(floor(s32 / 2^n), -32768, 32767)                           (arithmetic shift)
    err[c, n] = sum over the channel's values of (s16 * 2^n - s32)^2,     n = 1 .. 16
    best[c]   = argmin_n err[c, n]

Sources disagree on the shift: the research notes and the NumPy oracle floor, the vendor C++
divides integers (truncating toward zero), and the Caffe DeQuant emulation rounds. We floor,
which is what an arithmetic right shift does on the device.

Errors are exact integers (the C++ core keeps 128-bit sums, this reference splits each
difference into 16-bit halves so the int64 partial sums cannot overflow), so ties are real
ties: the *smallest* n wins (the vendor C++ rule; its NumPy oracle took the largest). A smaller
n keeps more low bits for the same error. Errors add up over batches, so ``SearchNObserver``
keeps only ``C x 16`` integers, not the data.
"""

from __future__ import annotations

import numpy as np

from ._backend import call_kernel, resolve
from ._common import INT32_MAX, INT32_MIN, QuantizationError, round_half_away

__all__ = ["SearchNObserver", "search_n", "search_n_errors", "shift_bit_fault"]

MIN_SHIFT_BIT, MAX_SHIFT_BIT = 1, 16
SHIFT_BITS = np.arange(MIN_SHIFT_BIT, MAX_SHIFT_BIT + 1)


def shift_bit_fault(values) -> str | None:
    """What is wrong with a layer's shift_bit values (None: nothing). They are all 0 (no requantization) or all
    integers in [1, 16] (a shift per channel), never mixed: the DeQuant layer's rule."""
    n = np.asarray(values, np.float64).reshape(-1)
    if not np.any(n) or np.all((n >= MIN_SHIFT_BIT) & (n <= MAX_SHIFT_BIT) & (n == np.round(n))):
        return None
    shown = [int(v) if float(v).is_integer() else float(v) for v in n[:8]]
    return (f"shift_bit values must be all 0 or all integers in [{MIN_SHIFT_BIT}, {MAX_SHIFT_BIT}] (mixed "
            f"zero/non-zero is not allowed), got {shown}{' ...' if n.size > 8 else ''}")


def _as_3d(x: np.ndarray, channels: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2 or x.shape[1] != channels:
        raise QuantizationError(f"SearchN: expected data shaped [batch, {channels}, ...], got {x.shape}")
    return x.reshape(x.shape[0], channels, -1)


def search_n_errors(x: np.ndarray, deq_scale: np.ndarray, *, backend: str | None = None) -> list[list[int]]:
    """Exact errors ``err[c][n-1]`` (Python ints) of one batch ``x`` [batch, C, ...]."""
    deq = np.ascontiguousarray(deq_scale, dtype=np.float32).reshape(-1)
    x3 = _as_3d(x, deq.size)
    if not (np.isfinite(deq).all() and (deq > 0).all()):
        raise QuantizationError("SearchN: deq_scale must be finite and > 0")
    if resolve(backend) == "kernel":
        hi, lo = call_kernel("search_n_errors", x3, deq)
        return [[(int(h) << 64) | int(v) for h, v in zip(hr, lr, strict=True)]
                for hr, lr in zip(hi.tolist(), lo.tolist(), strict=True)]
    if np.isnan(x3).any():
        raise QuantizationError("SearchN: input data contains NaN")
    s32 = np.clip(round_half_away(x3.astype(np.float64) / deq.astype(np.float64)[None, :, None]),
                  INT32_MIN, INT32_MAX).astype(np.int64)
    out = []
    for c in range(deq.size):
        v = s32[:, c, :].reshape(-1)
        row = []
        for n in SHIFT_BITS:
            d = (np.clip(v >> n, -32768, 32767) << n) - v        # |d| < 2^33
            hi, lo = d >> 16, d & 0xFFFF                           # d = hi * 2^16 + lo, 0 <= lo < 2^16
            row.append((int((hi * hi).sum()) << 32) + (int((hi * lo).sum()) << 17) + int((lo * lo).sum()))
        out.append(row)
    return out


def _select(errors: list[list[int]]) -> np.ndarray:
    return np.array([1 + min(range(16), key=row.__getitem__) for row in errors], dtype=np.int32)


def search_n(x: np.ndarray, deq_scale: np.ndarray, *, backend: str | None = None) -> np.ndarray:
    """Best shift bit per channel (int32 [C], values in [1, 16]) for one array ``x``."""
    return _select(search_n_errors(x, deq_scale, backend=backend))


class SearchNObserver:
    """Sums exact per-channel errors over calibration batches: ``update``, ``compute_qparams``, ``reset``."""

    def __init__(self, deq_scale: np.ndarray, *, backend: str | None = None) -> None:
        self.deq_scale = np.ascontiguousarray(deq_scale, dtype=np.float32).reshape(-1)
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forget all batches."""
        self._errors = [[0] * 16 for _ in range(self.deq_scale.size)]
        self.batches = 0

    def update(self, x: np.ndarray) -> None:
        """Add one batch ``x`` [batch, C, ...]."""
        batch = search_n_errors(x, self.deq_scale, backend=self.backend)
        self._errors = [[a + b for a, b in zip(r0, r1, strict=True)]
                        for r0, r1 in zip(self._errors, batch, strict=True)]
        self.batches += 1

    @property
    def errors(self) -> list[list[int]]:
        return [list(r) for r in self._errors]

    def compute_qparams(self) -> np.ndarray:
        """Best shift bit per channel, int32 [C] in [1, 16]."""
        if not self.batches:
            raise QuantizationError("SearchN: compute_qparams() before any update()")
        return _select(self._errors)
