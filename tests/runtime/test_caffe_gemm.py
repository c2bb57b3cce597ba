"""caffe_gemm: GEMMs summed in the K blocks of Caffe's OpenBLAS (bit equality with Caffe: tests/caffe_patch/
test_real_caffe_exact_gemm.py)."""

import numpy as np
import pytest

from amct_caffe.runtime.layers import caffe_gemm
from amct_caffe.runtime.layers.conv import Convolution
from amct_caffe.runtime.layers.inner_product import InnerProduct


@pytest.fixture
def k_block():
    """Set the reproduced K block for one test, restore the detected configuration after."""
    def set_(q, threads=1, numpy_q=None):
        caffe_gemm.configure(k_block=q, threads=threads, numpy_k_block=numpy_q)
    yield set_
    caffe_gemm.configure()


def _blocked_reference(a, b, ends):
    """Sum of the per-block products, added in order, each block one float32 GEMM."""
    y, start = None, 0
    for end in ends:
        p = np.matmul(a[..., start:end], b[..., start:end, :])
        y = p if y is None else y + p
        start = end
    return y


@pytest.mark.parametrize(("k", "threads", "ends"), [
    (320, 1, None),                                # not above Q: one block
    (330, 1, (176, 330)),                          # Q < K < 2Q: halves, the first rounded up to 16
    (330, 2, (165, 330)),                          # ... threaded driver: (K + 1) // 2
    (641, 2, (320, 481, 641)),
    (1152, 1, (320, 640, 896, 1152)),              # ResNet-50 3x3, 256 channels
    (2304, 2, (320, 640, 960, 1280, 1600, 1920, 2112, 2304)),
])
def test_k_blocks_follow_the_openblas_driver(k_block, k, threads, ends):
    k_block(320, threads)
    assert caffe_gemm.k_blocks(128, 196, k) == ends


def test_small_calls_and_disabled_blocking_are_not_split(k_block):
    k_block(320)
    assert caffe_gemm.k_blocks(16, 36, 1152) is None            # M*N*K <= 100**3: small kernel, no blocks
    assert caffe_gemm.k_blocks(1, 256, 2880, trans_b=True) is None
    assert caffe_gemm.k_blocks(2, 1000, 800, trans_b=True) is not None   # A @ B.T with M*N > 1200: driver
    k_block(None)
    assert caffe_gemm.k_blocks(128, 196, 1152) is None


@pytest.mark.parametrize(("k", "split"), [(512, False), (576, False), (640, False), (600, True), (1152, True)])
def test_no_split_where_numpy_blocks_alike(k_block, k, split):
    """numpy's BLAS (Q = 448) halves K = 512 ... 640 exactly as Caffe's (Q = 320) does: one numpy GEMM then."""
    k_block(320, 2, 448)
    assert (caffe_gemm.k_blocks(128, 196, k) is not None) == split


def test_configure_validates_and_redetects(monkeypatch):
    with pytest.raises(ValueError, match="k_block"):
        caffe_gemm.configure(k_block=1000)
    monkeypatch.setenv("AMCT_CAFFE_SGEMM_Q", "256")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    caffe_gemm.configure()
    try:
        # the K block follows AMCT_CAFFE_SGEMM_Q; the process's BLAS threads never change the sums
        assert caffe_gemm.config()[:2] == (256, caffe_gemm.CAFFE_THREADS)
        monkeypatch.setenv("AMCT_CAFFE_SGEMM_Q", "0")
        caffe_gemm.configure()
        assert caffe_gemm.config()[0] is None
    finally:
        monkeypatch.delenv("AMCT_CAFFE_SGEMM_Q")
        monkeypatch.delenv("OPENBLAS_NUM_THREADS")
        caffe_gemm.configure()


def test_a_bad_sgemm_q_value_is_said_and_ignored(monkeypatch, caplog):
    """AMCT_CAFFE_SGEMM_Q=abc: a warning naming it, then the detected K block (it was an internal ValueError)."""
    detected = caffe_gemm.config()[0]
    monkeypatch.setenv("AMCT_CAFFE_SGEMM_Q", "abc")
    try:
        caffe_gemm.configure()
        assert caffe_gemm.config()[0] == detected
        assert any("AMCT_CAFFE_SGEMM_Q='abc' is not an integer" in r.getMessage() for r in caplog.records)
    finally:
        monkeypatch.delenv("AMCT_CAFFE_SGEMM_Q")
        caffe_gemm.configure()


def test_numpy_never_splits_k_itself(k_block):
    """numpy's OpenBLAS halves a K between Q and 2Q one way with one thread and another with several:
    such a K is split here, in the multi-threaded driver's blocks, whatever numpy's thread count."""
    k_block(None, 2, 448)
    assert caffe_gemm.k_blocks(64, 784, 500) == (250, 500)        # numpy: 256 + 244 single-threaded
    assert caffe_gemm.k_blocks(64, 784, 448) is None              # one block in any case
    assert caffe_gemm.k_blocks(64, 784, 512) is None              # 256 + 256 in both modes


def test_unknown_blas_gets_k_blocks_it_does_not_split(k_block):
    k_block(None, 2, None)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 700)).astype(np.float32)
    b = rng.standard_normal((700, 40)).astype(np.float32)
    ends = (256, 478, 700)  # the multi-threaded driver halves the remainder 444
    assert caffe_gemm._driver_blocks(700, caffe_gemm.UNKNOWN_BLAS_K_BLOCK, True) == ends
    np.testing.assert_array_equal(caffe_gemm.matmul(a, b, (30, 40, 700)), _blocked_reference(a, b, ends))


@pytest.mark.parametrize(("numpy_core", "bf16", "system_core", "expected"), [
    ("skylakex", True, "cooperlake", 320),   # Debian's OpenBLAS on a Cooper Lake / Zen 4
    ("skylakex", True, "skylakex", None),    # a CPU OpenBLAS 0.3.21 does not take for a Cooper Lake
    ("skylakex", True, None, 320),           # no system OpenBLAS to ask: the likely Cooperlake
    ("skylakex", False, "skylakex", None),   # no BF16: both run SkylakeX
    ("haswell", True, "cooperlake", None),   # numpy not on AVX-512: no bit equality attempted
])
def test_k_block_follows_the_core_of_caffes_openblas(monkeypatch, numpy_core, bf16, system_core, expected):
    monkeypatch.delenv("AMCT_CAFFE_SGEMM_Q", raising=False)
    monkeypatch.setattr(caffe_gemm, "_cpu_has_avx512_bf16", lambda: bf16)
    monkeypatch.setattr(caffe_gemm, "_system_openblas_core", lambda: system_core)
    assert caffe_gemm._detect_k_block(numpy_core) == expected


def test_configure_replaces_only_the_given_fields(k_block):
    k_block(256, 3, 448)
    cfg = caffe_gemm.gemm_config()
    assert cfg == caffe_gemm.GemmConfig(k_block=256, threads=3, numpy_k_block=448)
    assert caffe_gemm.config() == (256, 3, 448)
    with pytest.raises(AttributeError):
        cfg.k_block = 320  # frozen: changed through configure() only
    caffe_gemm.configure(threads=0)              # 0 or None: one thread
    assert caffe_gemm.gemm_config() == caffe_gemm.GemmConfig(256, 1, 448)
    caffe_gemm.configure(k_block=None)           # None: numpy's own blocking (not "keep")
    assert caffe_gemm.gemm_config() == caffe_gemm.GemmConfig(None, 1, 448)
    assert not caffe_gemm.k_blocks(128, 196, 1152)
    caffe_gemm.configure(numpy_k_block=None)
    assert caffe_gemm.gemm_config() == caffe_gemm.GemmConfig(None, 1, None) and not caffe_gemm.exact()
    with pytest.raises(ValueError, match="k_block"):
        caffe_gemm.configure(k_block=0)
    assert caffe_gemm.gemm_config() == caffe_gemm.GemmConfig(None, 1, None)


@pytest.mark.parametrize(("m", "n", "k"), [(128, 196, 1152), (6, 20, 2304), (20, 200, 700), (1, 300, 900),
                                         (300, 1, 900)])
def test_matmul_sums_caffes_blocks(k_block, m, n, k):
    k_block(320)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    got = caffe_gemm.matmul(a, b, (m, n, k))
    assert got.shape == (m, n) and got.dtype == np.float32
    ends = caffe_gemm.k_blocks(m, n, k)
    if ends is None:
        np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)
    else:  # the blocks (padded away from numpy's small-matrix kernel when needed) add up in order
        pad = np.zeros((max(m, 2, 10**6 // (max(n, 2) * min(np.diff((0,) + ends))) + 1), k), np.float32)
        pad[:m] = a
        bp = np.zeros((k, max(n, 2)), np.float32)
        bp[:, :n] = b
        np.testing.assert_array_equal(got, _blocked_reference(pad, bp, ends)[:m, :n])
    out = np.empty((m, n), np.float32)
    assert caffe_gemm.matmul(a, b, (m, n, k), out=out) is out
    np.testing.assert_array_equal(out, got)


def test_layers_agree_with_and_without_blocking(k_block):
    """Caffe's summation order changes the rounding only: conv (every path) and InnerProduct agree to float32
    noise with numpy's own order."""
    rng = np.random.default_rng(1)
    cases = [((2, 256, 7, 7), (256, 256, 3, 3), 1, 1),     # wide GEMM, K = 2304
             ((1, 128, 40, 40), (64, 128, 3, 3), 1, 1),    # per image, K = 1152
             ((2, 512, 6, 6), (8, 512, 1, 1), 0, 1),       # 1x1, small per-image call
             ((2, 16, 30, 30), (16, 1, 3, 3), 1, 16),      # depthwise (sgemv)
             ((2, 8, 20, 20), (8, 1, 7, 7), 3, 8),         # depthwise, K = 49: a zero row, sgemm
             ((1, 4, 140, 130), (4, 1, 3, 3), 1, 4),       # depthwise, P > 16384: a zero row, sgemm
             ((3, 64, 4, 5), (12, 64, 3, 3), 1, 1)]        # narrow map, small call
    for xs, ws, pad, group in cases:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        k_block(None)
        plain = Convolution(x, w, b, pad=pad, group=group)
        k_block(320, 2, 448)  # numpy's BLAS taken for SkylakeX: the shape-keeping paths too
        blocked = Convolution(x, w, b, pad=pad, group=group)
        np.testing.assert_allclose(blocked, plain, rtol=1e-5, atol=1e-4 * float(np.abs(plain).max()))
    x = rng.standard_normal((3, 50, 6, 6)).astype(np.float32)
    w = rng.standard_normal((500, 1800)).astype(np.float32)
    k_block(None)
    plain = InnerProduct(x, w)
    k_block(320, 1, 448)
    np.testing.assert_allclose(InnerProduct(x, w), plain, rtol=1e-5, atol=1e-4 * float(np.abs(plain).max()))
    np.testing.assert_allclose(InnerProduct(x[:1], w), plain[:1], rtol=1e-5, atol=1e-4 * float(np.abs(plain).max()))


def test_conv_gemms_keep_caffes_shape_only_where_it_matters(k_block):
    """Where numpy rounds like Caffe (numpy_q known) and Caffe's call is small, no wide GEMMs / row grids
    (but a depthwise row grid below K = 32); a single depthwise weight row becomes two where sgemv would
    round differently."""
    k_block(320, 1, 448)
    small = caffe_gemm.conv_gemms(12, 20, 576)                       # 12*20*576 <= 100**3
    assert small.same_shape and not small.wide and not small.row_grid
    assert caffe_gemm.conv_gemms(1, 400, 9, depthwise=True).row_grid
    assert not caffe_gemm.conv_gemms(1, 400, 49, depthwise=True).row_grid
    big = caffe_gemm.conv_gemms(128, 196, 1152)
    assert big.wide and big.row_grid
    dw = caffe_gemm.conv_gemms(1, 400, 9, depthwise=True)
    w = np.arange(18, dtype=np.float32).reshape(2, 9)
    assert dw.channel_weights(w, 400).shape == (2, 1, 9)
    w2 = dw.channel_weights(w, 20000)                                 # P > 16384: a zero second row
    assert w2.shape == (2, 2, 9) and not w2[:, 1].any() and (w2[:, 0] == w).all()
    assert caffe_gemm.conv_gemms(1, 400, 49, depthwise=True).channel_weights(np.ones((2, 49), np.float32),
                                                                          400).shape == (2, 2, 49)
    k_block(320, 1, None)                                             # numpy's BLAS not known to round alike
    plain = caffe_gemm.conv_gemms(12, 20, 576)
    assert plain.wide and plain.row_grid
    assert plain.channel_weights(np.ones((2, 49), np.float32), 20000).shape == (2, 1, 49)
