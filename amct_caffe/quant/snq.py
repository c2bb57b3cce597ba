"""SNQ: INT4 non-uniform weight quantization, a 1-D k-means with 16 centres per channel.

Every output channel's values ``w`` (K floats; the whole tensor when ``channel_wise=False``) are
sorted once (``xs``, with float64 prefix sums ``P``), then:

Initial centres (``init_algo``)
    ``uniform``     ``c_j = xs[0] + j * (xs[-1] - xs[0]) / 15``
    ``gaussian``    ``c_j = mu + sigma * z_j`` with ``z_j`` the standard normal quantile at
                    ``(j + 0.5) / 16`` (deterministic; mu, sigma of the channel)
    ``d2sampling``  k-means++: the first centre is ``xs[floor(u * K)]``, each next one is drawn
                    with probability proportional to the squared distance to the nearest chosen
                    centre (inverse CDF over the sequential cumulative sum); ``u`` comes from a
                    SplitMix64 stream seeded with ``seed + (channel + 1) * 0x9E3779B97F4A7C15``,
                    so a seed gives the same result in C++ and here. With fewer distinct values
                    than centres the missing ones repeat the last centre.

Lloyd iterations (at most ``max_iteration``)
    midpoints ``m_j = (c_j + c_{j+1}) / 2``; cluster j holds the values in ``(m_{j-1}, m_j]``
    (contiguous in ``xs``, so a tie between two centres goes to the lower one); each non-empty
    cluster's centre becomes its mean ``(P[hi] - P[lo]) / (hi - lo)``, an empty one keeps its
    centre. Stop once the largest centre move is below ``min_distance``.

Codes ``code(w) = #{j : m_j < w}`` in [0, 15] from the final centres; the fake-quantized weight is
``float32(c[code])``. Centres stay sorted ascending.

The vendor's text only says "clustering" with these three settings; this algorithm is our reading
of it. Ranges: ``max_iteration`` in [500, 2000], ``min_distance`` in [1e-10, 1e-3], ``num_bits`` 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amct_caffe.errors import ConfigError

from ._backend import call_kernel, resolve
from .arq import arq_layout
from ._common import QuantizationError

__all__ = ["SnqResult", "snq_quantize_weight"]

INIT_ALGOS = ("uniform", "gaussian", "d2sampling")
NUM_CENTRES = 16
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
_GAUSS_Z = np.array([
    -1.862731867421651, -1.3180108973035367, -1.009990169249582, -0.7764217611479276,
    -0.579132162255556, -0.40225006532172525, -0.2372021093287877, -0.0784124127331122,
    0.0784124127331122, 0.2372021093287877, 0.40225006532172525, 0.579132162255556,
    0.7764217611479276, 1.009990169249582, 1.3180108973035367, 1.862731867421651])


@dataclass(frozen=True)
class SnqResult:
    """``centres`` float32 [C, 16] ascending, ``codes`` uint8 [C, K] in [0, 15],
    ``fake`` float32 (weight shape), ``iterations`` int32 [C]."""

    centres: np.ndarray
    codes: np.ndarray
    fake: np.ndarray
    iterations: np.ndarray


class _SplitMix64:
    def __init__(self, state: int) -> None:
        self.state = state & _MASK

    def uniform(self) -> float:
        self.state = (self.state + _GOLDEN) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
        return (z >> 11) * 2.0**-53


def _init(xs: np.ndarray, prefix: np.ndarray, init: str, seed: int, channel: int) -> np.ndarray:
    k = xs.size
    x64 = xs.astype(np.float64)
    if init == "uniform":
        step = (x64[-1] - x64[0]) / (NUM_CENTRES - 1)
        return x64[0] + np.arange(NUM_CENTRES) * step
    if init == "gaussian":
        mu = prefix[k] / k
        sigma = np.sqrt(np.cumsum((x64 - mu) * (x64 - mu))[-1] / k)
        return mu + sigma * _GAUSS_Z
    rng = _SplitMix64(seed + (channel + 1) * _GOLDEN)
    c = np.empty(NUM_CENTRES)
    c[0] = x64[min(int(rng.uniform() * k), k - 1)]
    d2 = np.full(k, np.inf)
    for j in range(1, NUM_CENTRES):
        e = x64 - c[j - 1]
        d2 = np.minimum(d2, e * e)
        cum = np.cumsum(d2)  # sequential, like the C++ loop
        u = rng.uniform()
        if cum[-1] == 0.0:
            c[j] = c[j - 1]
            continue
        c[j] = x64[min(int(np.searchsorted(cum, u * cum[-1], side="right")), k - 1)]
    return np.sort(c)


def _channel(w: np.ndarray, init: str, max_iteration: int, min_distance: float, seed: int, channel: int):
    xs = np.sort(w)
    x64 = xs.astype(np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(x64)])
    c = _init(xs, prefix, init, seed, channel)
    it = 0
    while it < max_iteration:
        it += 1
        mids = (c[:-1] + c[1:]) * 0.5
        bounds = np.concatenate([[0], np.searchsorted(x64, mids, side="right"), [xs.size]])
        counts = np.diff(bounds)
        means = np.where(counts > 0, (prefix[bounds[1:]] - prefix[bounds[:-1]]) / np.maximum(counts, 1), c)
        shift = np.abs(means - c).max()
        c = means
        if shift < min_distance:
            break
    mids = (c[:-1] + c[1:]) * 0.5
    codes = np.searchsorted(mids, w.astype(np.float64), side="left").astype(np.uint8)
    return c.astype(np.float32), codes, it


def snq_quantize_weight(weight: np.ndarray, channel_wise: bool = True, num_bits: int = 4,
                        max_iteration: int = 1000, min_distance: float = 1e-10, init_algo: str = "uniform",
                        seed: int = 0, *, layer_type: str = "Convolution", group: int = 1,
                        backend: str | None = None) -> SnqResult:
    """Cluster each output channel of ``weight`` into 16 centres; see the module doc.

    The output channels are ARQ's (:func:`.arq.arq_layout`): axis 0 of a Convolution or InnerProduct
    weight, axis 1 within each group of a Deconvolution's ``(Cin, Cout / group, kh, kw)``, so that the
    ARQ that follows finds at most 16 values per channel it scales. ``centres`` and ``codes`` have one
    row per output channel in that order (group-major for a Deconvolution).
    """
    if num_bits != 4:
        raise ConfigError(f"SNQ supports only num_bits=4 (codes in [0, 15]), got {num_bits!r}")
    if not 500 <= max_iteration <= 2000 or int(max_iteration) != max_iteration:
        raise ConfigError(f"SNQ max_iteration must be an integer in [500, 2000], got {max_iteration!r}")
    if not 1e-10 <= min_distance <= 1e-3:
        raise ConfigError(f"SNQ min_distance must be in [1e-10, 1e-3], got {min_distance!r}")
    if init_algo not in INIT_ALGOS:
        raise ConfigError(f"SNQ init_algo must be one of {INIT_ALGOS}, got {init_algo!r}")
    if layer_type == "InnerProduct" and channel_wise:
        raise ConfigError("InnerProduct supports only channel_wise=false for weight quantization")
    if not 0 <= seed < 2**64:
        raise ConfigError(f"SNQ seed must be in [0, 2^64), got {seed!r}")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.size == 0 or w.ndim < 1:
        raise QuantizationError("SNQ: empty weight")
    if channel_wise:
        groups, per_group, channels, inner = arq_layout(w.shape, layer_type, True, group)
        by_channel = w.reshape(groups, per_group, channels, inner).transpose(0, 2, 1, 3)
        rows = by_channel.reshape(groups * channels, per_group * inner)
    else:
        rows = w.reshape(1, -1)
    if resolve(backend) == "kernel":
        centres, codes, iters = call_kernel("snq", np.ascontiguousarray(rows), INIT_ALGOS.index(init_algo),
                                            int(max_iteration), float(min_distance), int(seed))
    else:
        if not np.isfinite(rows).all():
            raise QuantizationError("SNQ: weight contains inf or NaN")
        out = [_channel(r, init_algo, max_iteration, min_distance, seed, i) for i, r in enumerate(rows)]
        centres = np.stack([o[0] for o in out])
        codes = np.stack([o[1] for o in out])
        iters = np.array([o[2] for o in out], dtype=np.int32)
    fake = np.take_along_axis(centres, codes.astype(np.intp), axis=1)
    if channel_wise:  # back from one row per output channel to the weight's own layout
        fake = fake.reshape(groups, channels, per_group, inner).transpose(0, 2, 1, 3)
    fake = np.ascontiguousarray(fake).reshape(w.shape)
    return SnqResult(centres=centres, codes=codes.reshape(rows.shape), fake=fake, iterations=iters)
