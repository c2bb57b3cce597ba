"""Winograd minimal filtering F(m x m, 3 x 3) for stride-1 3x3 convolutions (FAST and CALIBRATION folds).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015). One output tile
``Y`` (m x m) of a 3x3 correlation of an ``alpha x alpha`` input tile ``d`` (``alpha = m + 2``)
by a kernel ``g`` is

    Y = A^T [ (G g G^T) .* (B^T d B) ] A

so that, summed over the input channels, each tile of each (image, output channel) costs
``alpha^2`` multiplies per input channel instead of ``9 m^2``: 2.25x fewer for m = 2, 4x for
m = 4. The products are GEMMs, one per transform position ``(xi, nu)``::

    U[xi, nu] = (G g G^T)[xi, nu]          (O, C)          weights, float64 -> float32, cached
    V[xi, nu] = (B^T d B)[xi, nu]          (C, N*T)        every input tile t of every image
    M[xi, nu] = U[xi, nu] @ V[xi, nu]      (O, N*T)        alpha^2 GEMMs, K = C
    y = crop(A^T M A) * a + b, ReLU        (N, O, Ho, Wo)

with ``T = ceil(Ho/m) * ceil(Wo/m)`` tiles per image; tiles past the output's edge read zeros
and their extra outputs are dropped. The matrices (points 0, +-1, +-2 and infinity for m = 4;
0, +-1, infinity for m = 2) are :data:`MATRICES`. The input and output transforms run in C++
(``csrc/src/winograd.cpp``; eight tiles per vector on AVX2 CPUs, sixteen on AVX-512 ones,
``csrc/src/winograd_avx2.cpp`` / ``winograd_avx512.cpp``, the same bytes but for NaN payloads where two
NaNs meet), the batch in chunks of images that keep the transformed tiles in cache. The GEMMs go
through :func:`caffe_gemm.matmul`, which sums ``K`` in fixed blocks, so the bytes do not depend on the
BLAS thread count.

Accuracy. The sums are reassociated and the transforms add and subtract multiples of
neighbouring inputs, so the result is not Caffe's bit for bit: on random layers of open_nsfw's
shapes the largest difference to the direct convolution is ~7e-7 of the layer's largest output
for m = 2 and ~1e-5 for m = 4; through the whole of open_nsfw (FAST, :func:`tile_size`'s choice)
every blob stays within 1.4e-5 of its scale from Caffe's (5.2e-6 without Winograd; 6.3e-6 with F(2x2) on
the maps of at most 16 pixels a side), far below the
executor's 1e-4 budget, but a fake-quant model's Quant layer could round such a value the other
way: this path is used only by FAST
chains that fold a BatchNorm or Scale (:mod:`amct_caffe.runtime.fold`), i.e. in float models, where
the folded affine map already gives up Caffe's bytes, and by the convolutions of calibration nets with
streaming IFMR layers (fold mode CALIBRATION), whose records bin the values anyway.

:func:`winograd_reference` is the NumPy (float64) formula the kernels are tested against.
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.runtime import threads
from amct_caffe.runtime.layers import caffe_gemm

try:  # csrc/src/winograd.cpp
    from amct_caffe._kernels import winograd_input as INPUT_KERNEL
    from amct_caffe._kernels import winograd_output as OUTPUT_KERNEL
    from amct_caffe._kernels import winograd_simd_level as SIMD_LEVEL
except ImportError:
    INPUT_KERNEL = OUTPUT_KERNEL = SIMD_LEVEL = None
# Below this many multiply-adds (of the direct convolution) a layer's transforms run on one thread.
THREADED_MACS = 1 << 22
# conv3x3 transforms this many bytes of input tiles at a time (see there).
CHUNK_BYTES = 1 << 19

_F = np.float64
# m -> (B^T, G, A^T)
MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], _F),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], _F),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], _F)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], _F),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], _F),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], _F)),
}


def available() -> bool:
    return INPUT_KERNEL is not None


def applies(weight_shape, stride, dilation, group: int) -> bool:
    """Whether a convolution is a plain 2-D 3x3 stride-1 one (the only kind done here)."""
    return (len(weight_shape) == 4 and tuple(weight_shape[2:]) == (3, 3) and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and group == 1)


# Outputs at most this many pixels a side use m = 2 where the transforms run one tile at a time (see tile_size).
SMALL_MAP = 16


def tile_size(ho: int, wo: int) -> int:
    """4, or 2 on maps of at most :data:`SMALL_MAP` pixels a side unless the transforms are AVX-512's.

    F(4x4) needs fewer multiplies on any map, ``ceil(Ho/m) * ceil(Wo/m) * (m+2)^2``, but rounds worse
    (module doc). With the portable one-tile loops its transforms cost more than it saves on small maps
    (open_nsfw's 14x14 and 7x7 layers, batch 8: 3.15 against 3.3 and 2.95 against 3.5 ms), where F(2x2)
    also halves the largest difference to Caffe (1.2e-5 -> 6e-6 of the blob's scale). The AVX-512
    transforms gather sixteen tiles of any rows and images per vector (csrc/src/winograd_avx512.cpp):
    there F(4x4) wins on every map, 14x14 2.3 against 2.7 ms and 7x7 2.2 against 3.2 (input transform,
    GEMMs and output transform), and open_nsfw's blobs stay within 1.4e-5 of their scale from Caffe's.
    The AVX2 transforms (eight tiles of one tile row per vector) fill few lanes on such maps: with them
    and OpenBLAS's AVX2 kernels, F(4x4) there made open_nsfw slower (207 against 202 ms).
    So a FAST net's values on such maps depend on whether the CPU has AVX-512, as its GEMMs' already
    depend on the BLAS kernels the CPU selects; on one machine they are the same on every run."""
    if min(ho, wo) > SMALL_MAP or (INPUT_KERNEL is not None and SIMD_LEVEL() >= 2):
        return 4
    return 2


def transform_weights(weight: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T of ``weight`` (O, C, 3, 3) as ((m+2)^2, O, C) float32, computed in float64.

    As two GEMMs over all kernels at once, laid out so that U comes out in its final order: the kernels'
    taps first, ``W[i, j*OC]``, then ``T = G W`` (alpha, 3, OC) and ``U = G T[x]`` for each row x.
    open_nsfw's 3x3 layers: 23-31 ms, against 78-103 ms for one einsum and the transpose of its result
    (the same bytes)."""
    _, g, _ = MATRICES[m]
    o, c = weight.shape[:2]
    alpha = m + 2
    taps = np.ascontiguousarray(np.asarray(weight, _F).reshape(o * c, 9).T).reshape(3, 3 * o * c)
    t = (g @ taps).reshape(alpha, 3, o * c)
    return np.matmul(g, t).reshape(alpha * alpha, o, c).astype(np.float32)


class WeightCache:
    """The transformed weights of one layer, recomputed only when the weights (or m) change.

    A user may write a layer's weights in place between forwards, so the cache keeps a copy of the
    weights it transformed and compares it (O*C*9 floats) with the current ones each time.
    """

    def __init__(self):
        self._key = None  # (m, copy of the weights)
        self._u = None

    def get(self, weight: np.ndarray, m: int) -> np.ndarray:
        if self._key is None or self._key[0] != m or not np.array_equal(self._key[1], weight):
            self._u = transform_weights(weight, m)
            self._key = (m, np.array(weight, np.float32, copy=True))
        return self._u

    def clear(self) -> None:
        """Let go of the transformed weights and the copy (the layer runs without Winograd now)."""
        self._key = self._u = None


def conv3x3(x: np.ndarray, u: np.ndarray, m: int, pad, a=None, b=None, relu: bool = False,
            into: np.ndarray | None = None) -> np.ndarray:
    """``max(conv(x, g) * a + b, 0)`` (each step if given) for x (N, C, H, W) and ``u`` from
    :func:`transform_weights` of g (O, C, 3, 3); stride 1, ``pad`` (ph, pw). See the module doc.
    ``into``: an array the result may be written into (used when it is float32 of the result's shape).

    The batch goes through in chunks of images whose transformed input ``V`` stays under
    :data:`CHUNK_BYTES`, so that ``V`` and the products are still in cache when the GEMMs and the output
    transform read them."""
    x = np.ascontiguousarray(x, np.float32)
    if into is not None and np.may_share_memory(into, x):
        into = None
    n, c, h, w = x.shape
    alpha2, o, _ = u.shape
    ho, wo = h + 2 * pad[0] - 2, w + 2 * pad[1] - 2
    tiles = math.ceil(ho / m) * math.ceil(wo / m)
    workers = threads.workers() if n * c * o * 9 * ho * wo >= THREADED_MACS else 1
    chunk = max(1, min(n, CHUNK_BYTES // (alpha2 * c * tiles * 4)))
    if into is None or into.shape != (n, o, ho, wo) or into.dtype != np.float32 or not into.flags.c_contiguous \
            or not into.flags.writeable:
        into = np.empty((n, o, ho, wo), np.float32)
    for n0 in range(0, n, chunk):
        xb = x[n0:n0 + chunk]
        v = np.empty((alpha2, c, len(xb) * tiles), np.float32)
        INPUT_KERNEL(xb, v, list(pad), m, workers)
        mm = np.ascontiguousarray(caffe_gemm.matmul(u, v, (o, v.shape[2], c)))  # (a padded single column: a view)
        OUTPUT_KERNEL(mm, list(xb.shape), list(pad), m, a, b, relu, workers, into[n0:n0 + chunk])
    return into


def winograd_reference(x: np.ndarray, weight: np.ndarray, m: int, pad) -> np.ndarray:
    """The module doc's formula in float64 NumPy (no bias): the kernels' reference."""
    bt, g, at = MATRICES[m]
    alpha = m + 2
    n, c, h, w = x.shape
    ho, wo = h + 2 * pad[0] - 2, w + 2 * pad[1] - 2
    th, tw = math.ceil(ho / m), math.ceil(wo / m)
    xp = np.zeros((n, c, th * m + 2, tw * m + 2), _F)
    xp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w] = x
    d = np.stack([np.stack([xp[:, :, ty * m:ty * m + alpha, tx * m:tx * m + alpha] for tx in range(tw)], 2)
                  for ty in range(th)], 2)                       # (N, C, th, tw, alpha, alpha)
    v = np.einsum("xi,nctsij,yj->xyncts", bt, d, bt)
    uu = np.einsum("xi,ocij,yj->xyoc", g, np.asarray(weight, _F), g)
    mm = np.einsum("xyoc,xyncts->xynots", uu, v)
    y = np.einsum("kx,xynots,ly->notskl", at, mm, at)             # (N, O, th, tw, m, m)
    y = y.transpose(0, 1, 2, 4, 3, 5).reshape(n, -1, th * m, tw * m)
    return y[:, :, :ho, :wo]
