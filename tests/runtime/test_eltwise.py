"""Eltwise (PROD / SUM / MAX, coefficients) and Axpy against per-element references."""

import numpy as np
import pytest

from tests.runtime.layer_harness import make_layer as harness_make, run_layer as harness_run
from amct_caffe.errors import GraphError
from amct_caffe.runtime.layers import eltwise
from amct_caffe.runtime.registry import known_types

RNG = np.random.default_rng(3)


def run_layer(text, bottoms):
    (top,), _ = harness_run(harness_make(text, len(bottoms)), bottoms)
    return top


def data(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def reference(op, xs, coeff=None):
    out = np.empty(xs[0].shape)
    for idx in np.ndindex(*xs[0].shape):
        vals = [float(x[idx]) for x in xs]
        if op == "PROD":
            out[idx] = np.prod(vals)
        elif op == "MAX":
            out[idx] = max(vals)
        else:
            out[idx] = sum(c * v for c, v in zip(coeff or [1.0] * len(xs), vals, strict=True))
    return out


def test_types_and_reference_functions():
    for t in ("Eltwise", "Axpy"):
        assert t in known_types()
        assert callable(getattr(eltwise, t))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("op", ["SUM", "PROD", "MAX"])
def test_operations(op, n):
    xs = [data(2, 3, 4) for _ in range(n)]
    xs[1][0, 0, 0] = xs[0][0, 0, 0]  # a tie
    y = run_layer(f'type: "Eltwise" eltwise_param {{ operation: {op} }}', xs)
    np.testing.assert_allclose(y, reference(op, xs), rtol=1e-6, atol=1e-6)


def test_sum_is_the_default():
    xs = [data(3, 5), data(3, 5)]
    np.testing.assert_array_equal(run_layer('type: "Eltwise"', xs), xs[0] + xs[1])


@pytest.mark.parametrize("coeff", [[1, -1], [0.5, 2.0], [-1, 1, 0.25], [0, 3, 1], [2, 1, 1]])
def test_sum_coefficients(coeff):
    xs = [data(2, 3, 2, 2) for _ in coeff]
    text = 'type: "Eltwise" eltwise_param { operation: SUM ' + " ".join(f"coeff: {c}" for c in coeff) + " }"
    y = run_layer(text, xs)
    np.testing.assert_allclose(y, reference("SUM", xs, coeff), rtol=1e-6, atol=1e-6)


def test_max_nan_follows_caffes_comparison_order():
    a = np.array([np.nan, 1.0, 2.0], np.float32)
    b = np.array([5.0, np.nan, 1.0], np.float32)
    c = np.array([0.0, 0.0, np.nan], np.float32)
    # Caffe: a > b ? a : b, then c > y ? c : y
    y = eltwise.Eltwise(a, b, c, operation="MAX")
    np.testing.assert_array_equal(y, [5.0, np.nan, 2.0])


@pytest.mark.parametrize("kernel", [True, False])
def test_max_in_the_kernel_and_in_numpy(monkeypatch, kernel):
    """The C++ select and the NumPy fallback: the same bits (equal values give the later operand's, so -0 / +0
    follow Caffe's order), and 0-d blobs (Reduction over axis 0) stay 0-d."""
    if not kernel:
        monkeypatch.setattr(eltwise, "GREATER_SELECT_KERNEL", None)
    a = np.array([0.0, -0.0, 3.0, np.nan, -1.0], np.float32)
    b = np.array([-0.0, 0.0, 3.0, 1.0, np.nan], np.float32)
    y = eltwise.Eltwise(a, b, operation="MAX")
    np.testing.assert_array_equal(y.view(np.uint32), b.view(np.uint32)[[0, 1, 2, 3, 4]])
    assert eltwise.Eltwise(np.float32(2.0).reshape(()), np.float32(5.0).reshape(()), operation="MAX").shape == ()
    big = [np.random.default_rng(i).standard_normal((3, 70, 50, 40)).astype(np.float32) for i in range(3)]
    want = np.where(big[0] > big[1], big[0], big[1])
    want = np.where(big[2] > want, big[2], want)
    np.testing.assert_array_equal(eltwise.Eltwise(*big, operation="MAX"), want)


def test_equal_count_different_shapes_combine_in_memory_order():
    a, b = data(2, 3, 1, 1), data(2, 3)  # the fork dropped the equal-shape check
    y = run_layer('type: "Eltwise"', [a, b])
    assert y.shape == (2, 3, 1, 1)
    np.testing.assert_array_equal(y.reshape(-1), a.reshape(-1) + b.reshape(-1))


@pytest.mark.parametrize("text,nb,match", [
    ('type: "Eltwise" eltwise_param { coeff: 1 }', 2, "one coefficient per bottom"),
    ('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', 2, "only for SUM"),
    ('type: "Eltwise"', 1, "2..n bottom"),
])
def test_bad_parameters(text, nb, match):
    with pytest.raises(GraphError, match=match):
        run_layer(text, [data(2, 2)] * nb)


def test_different_sizes_are_an_error():
    with pytest.raises(GraphError, match="different sizes"):
        run_layer('type: "Eltwise"', [data(2, 3), data(2, 4)])


@pytest.mark.parametrize("ashape", [(2, 3), (2, 3, 1, 1)])
def test_axpy(ashape):
    a, x, y = data(*ashape), data(2, 3, 4, 5), data(2, 3, 4, 5)
    out = run_layer('type: "Axpy"', [a, x, y])
    a2 = a.reshape(2, 3)
    want = np.empty(x.shape)
    for n, c, h, w in np.ndindex(*x.shape):
        want[n, c, h, w] = float(a2[n, c]) * float(x[n, c, h, w]) + float(y[n, c, h, w])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shapes", [[(2, 4), (2, 3, 4, 4), (2, 3, 4, 4)],
                                    [(2, 3, 2, 1), (2, 3, 4, 4), (2, 3, 4, 4)],
                                    [(2, 3), (2, 3, 4, 4), (2, 3, 4, 5)]])
def test_axpy_shape_errors(shapes):
    with pytest.raises(GraphError, match="Axpy"):
        run_layer('type: "Axpy"', [data(*s) for s in shapes])
