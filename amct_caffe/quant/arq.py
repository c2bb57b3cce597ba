"""ARQ weight quantization (symmetric, offset 0) and ARQ-retrain's straight-through estimator.

For a weight slice ``W_c`` (one output channel when ``channel_wise``, else the whole tensor) and
``b = num_bits``::

    t_c     = max(W_c) if |max(W_c)| > |min(W_c)| else min(W_c)     (a tie picks the min side)
    scale_c = t_c / (2^(b-1) - 1) if t_c > 0 else t_c / -2^(b-1)     (float32; 127 versus 128)
    scale_c = process_scale(scale_c)        (< FLT_EPSILON -> 1; inf -> "ArqQuant scale is illegal")
    offset_c = 0
    q = clamp(round(w / scale_c), -2^(b-1), 2^(b-1) - 1)  -> int8;   fake = q * scale_c

Output channels by layer type (Caffe blob layouts):

=============== ======================== =========================================
layer_type      weight shape              output channel of element
=============== ======================== =========================================
Convolution,    [Cout, Cin/G, kh, kw]     axis 0
DepthwiseConv
Deconvolution   [Cin, Cout/G, kh, kw]     g * Cout/G + j for row i in group g = i // (Cin/G),
                                          column j (the transposed layout)
InnerProduct    [Cout, Cin]               per tensor only: channel_wise=True is an error
=============== ======================== =========================================

Internally the weight is viewed as ``[groups, rows, channels, inner]`` with output channel
``g * channels + c`` (the C++ ``ArqLayout``); Convolution is ``[1, 1, Cout, rest]``.

ARQ retrain recomputes this from the current weights on every forward and passes the gradient
through unchanged (straight-through estimator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amct_caffe import ops
from amct_caffe.errors import ConfigError

from ._backend import call_kernel, resolve
from ._common import QuantizationError, check_num_bits, process_scale, qrange, round_half_away

__all__ = ["ArqResult", "arq_layout", "arq_quantize_weight", "arq_retrain_backward", "arq_retrain_forward",
           "quantize_with_scales"]

#: Layers with weights of their own (the recurrent layers' weights are quantized as InnerProducts).
LAYER_TYPES = tuple(name for name, row in ops.quantizable_rows().items()
                    if row.quant is ops.WEIGHTS_AND_DATA and not row.recurrent)


@dataclass(frozen=True)
class ArqResult:
    """``scale``/``offset`` [n] (n = output channels, or 1), ``quantized`` int8 and ``fake`` float32
    with the weight's shape."""

    scale: np.ndarray
    offset: np.ndarray
    quantized: np.ndarray
    fake: np.ndarray


def arq_layout(shape: tuple[int, ...], layer_type: str, channel_wise: bool, group: int = 1) -> tuple:
    """``(groups, rows, channels, inner)`` view of a weight of ``shape`` (see module doc)."""
    if layer_type not in LAYER_TYPES:
        raise ConfigError(f"ARQ supports layer types {LAYER_TYPES}, got {layer_type!r}")
    if len(shape) < 2:
        raise ConfigError(f"{layer_type} weight must have at least 2 dimensions, got shape {tuple(shape)}")
    if layer_type == "InnerProduct" and channel_wise:
        raise ConfigError("InnerProduct supports only channel_wise=false for weight quantization")
    inner = int(np.prod(shape[2:], dtype=np.int64))
    if layer_type == "Deconvolution":
        if group < 1 or shape[0] % group:
            raise ConfigError(f"Deconvolution: input channels {shape[0]} not divisible by group {group}")
        return (group, shape[0] // group, shape[1], inner)
    return (1, 1, shape[0], int(shape[1]) * inner)


def _reference(w: np.ndarray, layout: tuple, channel_wise: bool, num_bits: int):
    g, a, c, b = layout
    # [G, A, C, B] -> [G*C, A*B]: one row per output channel
    rows = w.reshape(g, a, c, b).transpose(0, 2, 1, 3).reshape(g * c, a * b)
    if not channel_wise:
        rows = rows.reshape(1, -1)
    if np.isnan(rows).any():
        raise QuantizationError("ArqQuant: weight contains NaN, cannot quantize")
    mx, mn = rows.max(axis=1), rows.min(axis=1)
    t = np.where(np.abs(mx) > np.abs(mn), mx, mn).astype(np.float32)
    qmin, qmax = qrange(num_bits)
    scale = process_scale(np.where(t > 0, t / np.float32(qmax), t / np.float32(qmin)), "ArqQuant")
    s_rows = scale[:, None]
    q_rows = np.clip(round_half_away(rows / s_rows), qmin, qmax)
    fake_rows = (q_rows * s_rows).astype(np.float32)

    def back(r: np.ndarray) -> np.ndarray:
        return r.reshape(g, c, a, b).transpose(0, 2, 1, 3).reshape(w.shape)

    return scale, np.zeros(scale.shape, np.int32), back(q_rows.astype(np.int8)), back(fake_rows)


def arq_quantize_weight(weight: np.ndarray, layer_type: str = "Convolution", channel_wise: bool = True,
                        num_bits: int = 8, group: int = 1, *, backend: str | None = None) -> ArqResult:
    """ARQ-quantize a Caffe weight blob; returns scales, offsets, int8 and fake-quantized weights."""
    num_bits = check_num_bits(num_bits, 2, 8, "ARQ weight_quant_params")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    layout = arq_layout(w.shape, layer_type, channel_wise, group)
    if w.size == 0:
        raise QuantizationError("ArqQuant: empty weight")
    if resolve(backend) == "kernel":
        scale, offset = call_kernel("arq_scales", w, list(layout), channel_wise, num_bits)
        q, fake = call_kernel("arq_quantize", w, list(layout), channel_wise, num_bits, scale, offset)
    else:
        scale, offset, q, fake = _reference(w, layout, channel_wise, num_bits)
    return ArqResult(scale=scale, offset=offset, quantized=q, fake=fake)


def quantize_with_scales(weight: np.ndarray, scale: np.ndarray, layer_type: str = "Convolution",
                         num_bits: int = 8, group: int = 1, *,
                         backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a weight blob with given scales, exactly as ARQ does with its own.

    ``scale`` has one value per output channel (layout of the module doc) or a single value.
    Returns ``(q, fake)``: int8 codes ``clamp(round(w / s_c))`` and float32 ``q * s_c``, both of
    the weight's shape. convert_model and save_model use this with the record's scale_w; with
    ARQ's scales it reproduces :func:`arq_quantize_weight`'s outputs bit for bit. The kernel is
    ARQ's own quantization step (``arq_quantize`` with zero offsets).
    """
    num_bits = check_num_bits(num_bits, 2, 8, "weight num_bits")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    channel_wise = scale.size != 1
    g, a, c, b = arq_layout(w.shape, "Convolution" if layer_type == "InnerProduct" and channel_wise
                            else layer_type, channel_wise, group)
    if channel_wise and scale.size != g * c:
        raise QuantizationError(f"{scale.size} weight scales given for a weight with {g * c} output channels")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise QuantizationError("weight scales must be finite and > 0")
    if resolve(backend) == "kernel":
        return call_kernel("arq_quantize", w, [g, a, c, b], channel_wise, num_bits, np.ascontiguousarray(scale),
                           np.zeros(scale.size, np.int32))
    rows = w.reshape(g, a, c, b).transpose(0, 2, 1, 3).reshape(g * c, a * b)
    if not channel_wise:
        rows = rows.reshape(1, -1)
    qmin, qmax = qrange(num_bits)
    s_rows = scale[:, None]
    q_rows = np.clip(round_half_away(rows / s_rows), qmin, qmax)
    fake_rows = (q_rows * s_rows).astype(np.float32)

    def back(r: np.ndarray) -> np.ndarray:
        return r.reshape(g, c, a, b).transpose(0, 2, 1, 3).reshape(w.shape)

    return back(q_rows.astype(np.int8)), back(fake_rows)


def arq_retrain_forward(weight: np.ndarray, layer_type: str = "Convolution", channel_wise: bool = True,
                        num_bits: int = 8, group: int = 1, *, backend: str | None = None) -> ArqResult:
    """Forward of ARQ retrain: fresh ARQ scales from the current weights, fake-quantized weights."""
    return arq_quantize_weight(weight, layer_type, channel_wise, num_bits, group, backend=backend)


def arq_retrain_backward(grad_fake: np.ndarray) -> np.ndarray:
    """Straight-through estimator: d loss / d weight = d loss / d fake weight (a copy)."""
    return np.array(grad_fake, dtype=np.float32, copy=True)
