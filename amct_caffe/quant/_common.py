"""Shared numeric conventions of every quantization algorithm in this package.

Rounding
    ``round_half_away(t)`` rounds to the nearest integer and sends exact halves away from zero
    (C ``std::round``). The vendor's C++ library (``libquant.so``, used by the Caffe layers) rounds
    this way in IFMR, ARQ and the Quant layer; its PyTorch port uses ``torch.round`` (halves to
    even) instead. We follow the C++ library everywhere, ULQ included, so the fake-quant model,
    the deploy model and retraining all put a value on the same integer.

Integer range
    ``num_bits`` signed: ``[-2^(b-1), 2^(b-1) - 1]``.

Scale sanity (``process_scale``)
    ``scale < FLT_EPSILON`` becomes 1 (the data range is numerically empty, e.g. all zeros);
    a non-finite scale, or one whose reciprocal is below ``FLT_EPSILON`` (``scale > 2^23``), cannot
    be carried by the hardware, which multiplies by ``1/scale``, and is an error.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import AmctError, ConfigError

FLT_EPSILON = float(np.finfo(np.float32).eps)  # 2^-23
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

__all__ = [
    "FLT_EPSILON", "INT32_MAX", "INT32_MIN", "ConfigError", "QuantizationError", "check_finite",
    "check_num_bits", "process_scale", "qrange", "round_half_away",
]


class QuantizationError(AmctError, ValueError):
    """The data cannot be quantized (inf/NaN input, an illegal scale, an int32 overflow...)."""


def round_half_away(t: np.ndarray) -> np.ndarray:
    """Round to nearest, halves away from zero, exactly for every float (same dtype out).

    ``trunc(t) + sign(t) * (|t - trunc(t)| >= 0.5)``; ``t - trunc(t)`` is exact in floating point.
    """
    t = np.asarray(t)
    r = np.trunc(t)
    return r + np.where(np.abs(t - r) >= 0.5, np.sign(t), 0).astype(t.dtype)


def qrange(num_bits: int) -> tuple[int, int]:
    """Signed integer range ``(-2^(b-1), 2^(b-1) - 1)`` of ``num_bits``."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def check_num_bits(num_bits: int, low: int, high: int, what: str) -> int:
    """Return ``num_bits`` as int, raising ConfigError outside ``[low, high]``."""
    if isinstance(num_bits, bool) or int(num_bits) != num_bits or not low <= num_bits <= high:
        raise ConfigError(f"{what}: num_bits must be an integer in [{low}, {high}], got {num_bits!r}")
    return int(num_bits)


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise QuantizationError naming ``what`` when ``x`` holds a NaN or an inf."""
    if not np.isfinite(x).all():
        bad = "NaN" if np.isnan(x).any() else "inf"
        raise QuantizationError(f"{what}: input data contains {bad}, which cannot be quantized")


def process_scale(scale: np.ndarray, what: str) -> np.ndarray:
    """Apply the scale rules above to a float32 scale array (returns a new float32 array).

    Raises QuantizationError ``"<what> scale is illegal ..."`` for a non-finite scale or one above 2^23.
    """
    s = np.array(scale, dtype=np.float32, ndmin=1)
    bad = ~np.isfinite(s)
    s = np.where(bad, s, np.where(s < np.float32(FLT_EPSILON), np.float32(1.0), s))
    with np.errstate(divide="ignore", over="ignore"):
        bad |= (np.float32(1.0) / s) < np.float32(FLT_EPSILON)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise QuantizationError(
            f"{what} scale is illegal: scale={float(s[i])!r} (index {i}); the data range must be "
            f"finite and below about 2^23 quantization steps, check the input for inf or huge values")
    return s
