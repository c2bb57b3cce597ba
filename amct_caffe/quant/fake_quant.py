"""Uniform quantize / dequantize / fake-quant, and the deploy ``deq_scale`` uint64 packing.

With ``b = num_bits``, ``[qmin, qmax] = [-2^(b-1), 2^(b-1)-1]`` and a per-tensor scale ``s`` and
integer offset ``o``::

    q = clamp(round(x / s) + o, qmin, qmax)          quantize   (float32 -> int)
    y = (q - o) * s                                  dequantize (int -> float32)
    fake_quant(x) = dequantize(quantize(x))          what the fake-quant Quant layer computes

``round`` is half away from zero and ``x / s`` a float32 division (see ``_common``).
``quantize`` returns int8 for ``b <= 8`` and int16 for ``9 <= b <= 16``: activations of 9..16
bits are computed on their own grid but stored as 16-bit on the device.

Deploy DeQuant parameter, one uint64 per output channel ``c``::

    deq[c]   = float32(scale_w[c] * scale_d)                     (a float32 product)
    param[c] = (uint8(offset_w[c]) << 32) | float32_bits(deq[c])

bits 31..0 carry the IEEE-754 bits of ``deq``, bits 39..32 the two's-complement byte of
``offset_w``. (The vendor's source comment says 47:40 but its code shifts by 32; we follow the
code.) ``unpack_deq_scale`` inverts it exactly.
"""

from __future__ import annotations

import numpy as np

from ._backend import call_kernel, resolve
from ._common import check_num_bits, qrange, round_half_away

__all__ = ["dequantize", "fake_quant", "pack_deq_scale", "quantize", "unpack_deq_scale"]


def _int_dtype(num_bits: int) -> type[np.integer]:
    return np.int8 if num_bits <= 8 else np.int16


def _check_scale(scale: float) -> np.float32:
    s = np.float32(scale)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return s


def _check_offset(offset: int, num_bits: int) -> int:
    qmin, qmax = qrange(num_bits)
    if int(offset) != offset or not qmin <= offset <= qmax:
        raise ValueError(f"offset must be an integer in [{qmin}, {qmax}] for {num_bits} bits, got {offset!r}")
    return int(offset)


def quantize(x: np.ndarray, scale: float, offset: int = 0, num_bits: int = 8, *,
             backend: str | None = None) -> np.ndarray:
    """float32 ``x`` (any shape) -> int8/int16 codes of the same shape (see module doc)."""
    num_bits = check_num_bits(num_bits, 2, 16, "quantize")
    s, o = _check_scale(scale), _check_offset(offset, num_bits)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if resolve(backend) == "kernel":
        return call_kernel("quantize", x, float(s), o, num_bits)
    qmin, qmax = qrange(num_bits)
    q = np.clip(round_half_away(x / s) + np.float32(o), qmin, qmax)
    return q.astype(_int_dtype(num_bits))


def dequantize(q: np.ndarray, scale: float, offset: int = 0) -> np.ndarray:
    """Integer codes -> float32 ``(q - offset) * scale`` (trivial, NumPy only)."""
    return ((np.asarray(q).astype(np.float32) - np.float32(offset)) * np.float32(scale)).astype(np.float32)


def fake_quant(x: np.ndarray, scale: float, offset: int = 0, num_bits: int = 8, *,
               backend: str | None = None, into: np.ndarray | None = None) -> np.ndarray:
    """float32 ``x`` -> float32 ``(clamp(round(x/s)+o, qmin, qmax) - o) * s``, same shape.

    ``into``: an array the kernel may write the result into instead of fresh memory (used only when it
    is float32, C-contiguous, writeable, of ``x``'s shape and shares no memory with ``x``; else ignored).
    """
    num_bits = check_num_bits(num_bits, 2, 16, "fake_quant")
    s, o = _check_scale(scale), _check_offset(offset, num_bits)
    if into is not None and isinstance(x, np.ndarray) and np.may_share_memory(into, x):
        into = None  # (the kernel sees a contiguous copy of a strided x, and could not tell)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if resolve(backend) == "kernel":
        return call_kernel("fake_quant", x, float(s), o, num_bits, into)
    qmin, qmax = qrange(num_bits)
    q = np.clip(round_half_away(x / s) + np.float32(o), qmin, qmax)
    return ((q - np.float32(o)) * s).astype(np.float32)


def pack_deq_scale(scale_w: np.ndarray, scale_d: float, offset_w: np.ndarray | None = None, *,
                   backend: str | None = None) -> np.ndarray:
    """Pack per-channel ``scale_w`` [C] (float32), ``scale_d`` and ``offset_w`` [C] into uint64 [C].

    ``offset_w`` defaults to zeros and must fit in int8.
    """
    scale_w = np.ascontiguousarray(scale_w, dtype=np.float32).reshape(-1)
    if offset_w is None:
        offset_w = np.zeros(scale_w.shape, dtype=np.int32)
    offset_w = np.asarray(offset_w).reshape(-1)
    if offset_w.shape != scale_w.shape:
        raise ValueError(f"offset_w has {offset_w.size} values but scale_w has {scale_w.size}")
    if offset_w.size and (offset_w.min() < -128 or offset_w.max() > 127):
        raise ValueError("offset_w must fit in int8 to be packed into deq_scale")
    offset_w = np.ascontiguousarray(offset_w, dtype=np.int8)
    if resolve(backend) == "kernel":
        return call_kernel("pack_deq_scale", scale_w, float(np.float32(scale_d)), offset_w)
    deq = (scale_w * np.float32(scale_d)).astype(np.float32)
    low = deq.view(np.uint32).astype(np.uint64)
    high = offset_w.view(np.uint8).astype(np.uint64) << np.uint64(32)
    return high | low


def unpack_deq_scale(param: np.ndarray, *, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint64 [C] -> ``(deq float32 [C], offset_w int8 [C])``; inverse of ``pack_deq_scale``."""
    param = np.ascontiguousarray(param, dtype=np.uint64).reshape(-1)
    if resolve(backend) == "kernel":
        return call_kernel("unpack_deq_scale", param)
    deq = (param & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    offset_w = ((param >> np.uint64(32)) & np.uint64(0xFF)).astype(np.uint8).view(np.int8)
    return deq, offset_w
