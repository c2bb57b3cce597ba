"""Type stub of the C++ extension (csrc/python/bindings.cpp). Use amct_caffe.quant, not this module.

Arrays must already have the stated dtype and be C-contiguous (TypeError/ValueError otherwise);
data errors in the core raise ValueError with the same messages as the NumPy references.
``into`` (the convolution, pooling and residual kernels): an array the result is written into and
returned, used only when it is float32, C-contiguous, writeable, of the result's shape and shares
no memory with the inputs; otherwise the result gets a fresh array.
"""

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

I8 = npt.NDArray[np.int8]
I32 = npt.NDArray[np.int32]
U64 = npt.NDArray[np.uint64]

def quantize(x: F32, scale: float, offset: int, num_bits: int) -> I8 | npt.NDArray[np.int16]: ...
def fake_quant(x: F32, scale: float, offset: int, num_bits: int, into: F32 | None = None) -> F32: ...
def pack_deq_scale(scale_w: F32, scale_d: float, offset_w: I8) -> U64: ...
def unpack_deq_scale(param: U64) -> tuple[F32, I8]: ...
def ifmr_search(
    chunks: list[F32], num_bits: int, with_offset: bool, max_percentile: float, min_percentile: float,
    ratios: F64, zeros: int = 0, threads: int = 1,
) -> tuple[int, float, int, float, float, F64]:
    """-> (best_index, scale, offset, clip_max, clip_min, mean squared error per candidate)."""

class IfmrHistogram:
    """The streaming IFMR state of amct_caffe.quant.ifmr_stream (same fields as its IfmrHistogram)."""

    def __init__(self, bins: int, top_k: int) -> None: ...
    def update(self, x: F32, what: str = "IfmrQuantWithOffset", threads: int = 1) -> None: ...
    def kth(self, k: int, largest: bool) -> float: ...
    def losses(self, clip: F32, lo: F32, scale: F32, threads: int = 1) -> F64: ...
    bins: int
    top_k: int
    exp: int | None
    base: int
    count: F64
    dev: F64
    m2: float
    nonzero: int
    positive: int
    negative: int
    top: F32
    bottom: F32

def ifmr_ratios(start: float, end: float, step: float) -> F64: ...
def ifmr_simd_level() -> int:
    """0 portable, 1 AVX2, 2 AVX-512."""

def arq_scales(weight: F32, layout: list[int], channel_wise: bool, num_bits: int) -> tuple[F32, I32]:
    """layout = (groups, rows, channels, inner); see amct_caffe.quant.arq.arq_layout."""

def arq_quantize(
    weight: F32, layout: list[int], channel_wise: bool, num_bits: int, scale: F32, offset: I32
) -> tuple[I8, F32]: ...
def quantize_bias(bias: F32, scale_w: F32, scale_d: float) -> npt.NDArray[np.int32]: ...
def search_n_errors(x: F32, deq_scale: F32) -> tuple[U64, U64]:
    """x [batch, C, inner] -> (hi, lo) [C, 16]; the exact error of shift n is (hi << 64) | lo at [c, n-1]."""

def snq(
    weight: F32, init: int, max_iteration: int, min_distance: float, seed: int
) -> tuple[F32, npt.NDArray[np.uint8], npt.NDArray[np.int32]]:
    """weight [C, K], init 0 uniform / 1 gaussian / 2 d2sampling.

    Returns (centres [C, 16], codes [C, K], iterations [C]).
    """

def ulq_clip_check(
    clip_max: float, clip_min: float, prev_max: float, prev_min: float
) -> tuple[float, float, float, float]: ...
def ulq_scale_offset(clip_max: float, clip_min: float, num_bits: int) -> tuple[float, int]: ...
def ulq_backward(
    x: F32, grad: F32, clip_max: float, clip_min: float, scale: float, offset: int, num_bits: int
) -> tuple[F32, float, float]:
    """-> (grad_x, grad_clip_max, grad_clip_min)."""

def depthwise_conv2d(
    x: F32, weight: F32, stride: list[int], pad: list[int], dilation: list[int], out: list[int], threads: int,
    bias: F32 | None = None, into: F32 | None = None,
) -> F32:
    """x (N, C, H, W), weight (C, kh, kw) -> (N, C, *out): one fused multiply-add per tap, taps in order,
    then + bias[c] if given."""

def depthwise_has_fma() -> bool: ...
def im2col_2d(
    x: F32, cols: F32, kernel: list[int], stride: list[int], pad: list[int], dilation: list[int], out: list[int],
    batch_last: bool, threads: int,
) -> None:
    """x (N, C, H, W) -> cols, (C*kh*kw, N, Ho*Wo) with batch_last else (N, C*kh*kw, Ho*Wo), written in place."""

def col2im_2d(
    cols: F32, x: F32, kernel: list[int], stride: list[int], pad: list[int], dilation: list[int], out: list[int],
    batch_last: bool, threads: int,
) -> None:
    """The adjoint of im2col_2d: x (N, C, H, W) = the columns added back in Caffe's order (written in place)."""

def max_pool2d_argmax(
    x: F32, kernel: list[int], stride: list[int], pad: list[int], out: list[int], threads: int
) -> tuple[F32, I32]:
    """x (N, C, H, W) -> (maxima, argmax as flat plane indices or -1), both (N, C, *out)."""

def max_pool2d_backward(
    dy: F32, mask: I32, in_hw: list[int], kernel: list[int], stride: list[int], pad: list[int], threads: int
) -> F32:
    """dx (N, C, *in_hw): dy added at the argmax of each window (empty windows: previous plane's last cell)."""

def channel_sums(a: F32, b: F32 | None, threads: int) -> tuple[F64, F64 | None]:
    """a, b (N, C, S) -> (sum of a, sum of a*b) per channel, accumulated in double."""

def blob_stats(a: F32, b: F32, rows: int, threads: int) -> tuple[F64, F64, F64, F64, float]:
    """a, b (rows, cols) -> per row sums of a*b, a*a, b*b, (a-b)^2 in double; max abs(a - b)."""

def batch_norm_backward(dy: F32, x_norm: F32, std: F32, sum_dy: F32, sum_dyx: F32, inv_m: float, threads: int) -> F32:
    """(N, C, S): (dy - (x_norm * sum_dyx[c] + sum_dy[c]) * inv_m) / std[c], each operation rounded."""

def sgd_update(
    weight: F32, diff: F32, history: F32, decay: float, momentum: float, rate: float, threads: int
) -> None:
    """In place: diff += decay * weight (decay != 0); history = momentum * history + rate * diff;
    diff = history; weight -= history."""
def direct_conv2d(
    x: F32, weight: F32, stride: list[int], pad: list[int], dilation: list[int], out: list[int], threads: int,
    bias: F32 | None = None, into: F32 | None = None,
) -> F32:
    """x (N, C, H, W), weight (O, C, kh, kw) -> (N, O, *out), C*kh*kw <= direct_conv_max_k(): one fused
    multiply-add per k in column order from zero (the sum stored + 0), then + bias[o]; AVX2 or AVX-512."""

def direct_conv_available() -> bool: ...
def direct_conv_max_k() -> int: ...
def pool2d(x: F32, method: str, kernel: list[int], stride: list[int], pad: list[int], out: list[int],
           threads: int, into: F32 | None = None) -> F32:
    """Caffe's MAX pooling of x (N, C, H, W) -> (N, C, *out) (method "MAX")."""

def channel_affine(y: F32, a: F32 | None, b: F32 | None, relu: bool, threads: int) -> None:
    """In place on y (N, C, ...): y = y * a[c] + b[c] (two roundings), then NumPy's maximum(y, 0) if relu."""

def affine_add_relu(y: F32, a: F32, b: F32, other: F32, threads: int, into: F32 | None = None) -> F32:
    """y = y * a[c] + b[c] in place; returns maximum(y + other, 0)."""

def add_relu(a: F32, b: F32, threads: int, into: F32 | None = None) -> F32:
    """maximum(a + b, 0)."""

def tanhf(x: F32, threads: int) -> F32:
    """glibc's (fdlibm's) float tanh of every element, bit for bit on any machine."""

def expf(x: F32, threads: int) -> F32:
    """glibc's float exp (e_expf.c as its x86-64 FMA build computes it) of every element, bit for bit on any
    machine."""

def libm_expf(x: F32) -> F32:
    """This machine's libm expf of every element (what the expf port is tested against)."""

def softmax(x: F32, axis: int, threads: int) -> F32:
    """exp(x - max) / sum over ``axis`` (0 <= axis < x.ndim), exp glibc's expf, the sum in axis order."""

def winograd_input(x: F32, v: F32, pad: list[int], m: int, threads: int) -> None:
    """x (N, C, H, W) -> v ((m+2)^2, C, N*tiles): B^T d B of every input tile (runtime/layers/winograd.py)."""

def relu(x: F32, threads: int, into: F32 | None = None) -> F32:
    """NumPy's maximum(x, 0) (NaNs kept, -0 to +0), the same bytes, without NumPy's slower NaN path."""

def pointwise_conv(
    x: F32, weight: F32, scale: F32 | None, bias: F32 | None, relu: bool, threads: int, into: F32 | None = None,
) -> F32:
    """x (N, K, ...) by weight (O, K[, 1, 1]) -> (N, O, ...): one fused multiply-add per k in order from zero,
    stored + 0, then * scale[o], + bias[o], maximum(v, 0) (each if given); AVX2 or AVX-512."""

def pointwise_conv_available() -> bool: ...
def winograd_simd_level() -> int:
    """0 portable, 1 AVX2, 2 AVX-512 (both transforms, the same bytes)."""

def simd_level() -> int:
    """The vector kernels in use: 2 AVX-512, 1 AVX2 (with FMA), 0 portable; the CPU's, capped by AMCT_SIMD
    ("avx512", "avx2", "portable") and set_simd_limit."""

def set_simd_limit(level: int) -> int:
    """Caps simd_level() at level (0..2; 2 lifts the cap) for every kernel; returns the previous cap. Layers
    a Net has already prepared keep the choices made at the level then in force: set it before building nets."""

def winograd_output(mm: F32, x_shape: list[int], pad: list[int], m: int, a: F32 | None, b: F32 | None,
                    relu: bool, threads: int, into: F32 | None = None) -> F32:
    """mm ((m+2)^2, O, N*tiles) -> (N, O, Ho, Wo): A^T M A per tile, cropped, * a + b, ReLU."""

def prelu(x: F32, slope: F32, threads: int) -> F32:
    """x (N, C, ...) -> x where x > 0, else x * slope[c] (one slope: shared): multiply, then copyto where x > 0."""

def bias_prelu(y: F32, b: F32 | None, slope: F32, threads: int) -> None:
    """In place on y (N, C, ...): y += b[c] (if given), then prelu's y > 0 ? y : y * slope[c]."""

def direct_conv2d_affine(
    x: F32, weight: F32, stride: list[int], pad: list[int], dilation: list[int], out: list[int], threads: int,
    scale: F32 | None, bias: F32 | None, relu: bool, into: F32 | None = None,
) -> F32:
    """direct_conv2d, each stored value then * scale[o], + bias[o], maximum(v, 0) (each if given): the bytes
    of the convolution followed by channel_affine."""

def bind_numpy_sgemm(library: str, symbol: str, ilp64: bool) -> bool:
    """Look up `symbol` (numpy's cblas_sgemm, 64-bit integers if ilp64) in the already loaded `library`."""

def numpy_sgemm(a: F32, b: F32) -> F32:
    """a (m, k) @ b (k, n) by the bound sgemm, called as np.matmul calls it for C-contiguous operands."""

class SmallConv:
    """A small one-group convolution of one input shape in one call (csrc/include/amct/small_conv.h)."""

    def __init__(self, x_shape: list[int], o: int, kernel: list[int], stride: list[int], pad: list[int],
                 dilation: list[int], out: list[int], rows: int, cols: int, im2col: bool, act: int) -> None: ...
    def __call__(self, x: F32, weight: F32, bias: F32 | None, slope: F32 | None) -> F32:
        """conv(x, weight) + bias, then act (0 none, 1 ReLU, 2 PReLU by slope): a fresh (N, O, Ho, Wo)."""

class SmallPool:
    """MAX pooling of one input shape, for SmallRun."""

    def __init__(self, x_shape: list[int], kernel: list[int], stride: list[int], pad: list[int],
                 out: list[int]) -> None: ...

class SmallSoftmax:
    """Softmax over ``axis`` of one 4-D input shape (the kernel of ``softmax``), for SmallRun."""

    def __init__(self, x_shape: list[int], axis: int) -> None: ...

class SmallRun:
    """SmallConv / SmallPool / SmallSoftmax ops in order, op i reading x (inputs[i] == -1) or op inputs[i]'s
    output."""

    def __init__(self, ops: list[SmallConv | SmallPool | SmallSoftmax], inputs: list[int],
                 biased: list[bool]) -> None: ...
    def bind(self, x_blob: object, param_blobs: list[object], top_blobs: list[object]) -> None:
        """The Blob objects step() reads (x; each SmallConv's weight, [bias], [slope]) and writes (one top per op)."""
    def step(self) -> bool:
        """The ops on the bound blobs' arrays, each top written into its array of the last step when only its
        blob holds that (else into a fresh one, stored in the blob); False, nothing done, if an array is
        refused."""
