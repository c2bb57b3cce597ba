"""Caffe's weight fillers (``src/caffe/filler.hpp``), for nets built without a caffemodel.

``fill(filler_param, shape, rng)`` returns a float32 array. fan_in = count / shape[0] and
fan_out = count / shape[1] as in Caffe.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import ModelFormatError


def _fans(shape) -> tuple[float, float]:
    count = float(np.prod(shape)) if len(shape) else 1.0
    fan_in = count / shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _variance_norm(filler, fan_in: float, fan_out: float) -> float:
    name = filler.DESCRIPTOR.fields_by_name["variance_norm"].enum_type.values_by_number[filler.variance_norm].name
    if name == "AVERAGE":
        return (fan_in + fan_out) / 2.0
    if name == "FAN_OUT":
        return fan_out
    return fan_in


def _check(filler, kind: str) -> None:
    """The checks of Caffe's fillers (filler.hpp, math_functions.cpp), which abort the net's setup."""
    if kind != "gaussian" and filler.sparse != -1:
        raise ModelFormatError(f"the {kind} filler does not support sparse ({filler.sparse}); only gaussian does "
                               "(Caffe: Sparsity not supported by this Filler)")
    if kind == "gaussian" and not filler.std > 0:
        raise ModelFormatError(f"the gaussian filler's std must be > 0, got {filler.std} (Caffe: Check failed: "
                               "sigma > 0)")
    if kind == "uniform" and not filler.min <= filler.max:
        raise ModelFormatError(f"the uniform filler's min ({filler.min}) must not exceed its max ({filler.max})")


def fill(filler, shape, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    kind = filler.type if filler is not None else "constant"
    if filler is not None:
        _check(filler, kind)
    if kind == "constant":
        return np.full(shape, filler.value if filler is not None else 0.0, np.float32)
    if kind == "gaussian":
        x = rng.normal(filler.mean, filler.std, shape).astype(np.float32)
        if filler.sparse >= 0 and len(shape):
            # Caffe keeps each weight with probability sparse / num_outputs (shape[0]), zeroing the others
            x *= rng.random(shape) < filler.sparse / shape[0]
        return x
    if kind == "uniform":
        return rng.uniform(filler.min, filler.max, shape).astype(np.float32)
    if kind == "xavier":
        n = _variance_norm(filler, *_fans(shape))
        scale = np.sqrt(3.0 / n)
        return rng.uniform(-scale, scale, shape).astype(np.float32)
    if kind == "msra":
        n = _variance_norm(filler, *_fans(shape))
        return rng.normal(0.0, np.sqrt(2.0 / n), shape).astype(np.float32)
    if kind == "positive_unitball":
        x = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        flat = x.reshape(shape[0], -1) if shape else x.reshape(1, -1)
        flat /= flat.sum(axis=1, keepdims=True)
        return x
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ModelFormatError(f"bilinear filler needs a 4-D square kernel, got {list(shape)}")
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        idx = np.arange(k)
        w1 = 1 - np.abs(idx / f - c)
        return np.broadcast_to(np.outer(w1, w1), shape).astype(np.float32)
    raise ModelFormatError(f"unknown filler type '{kind}'")
