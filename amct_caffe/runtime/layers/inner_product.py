"""InnerProduct (``src/caffe/layers/inner_product_layer.cpp``).

The bottom is viewed as a matrix ``X (M, K)`` with ``M = prod(shape[:axis])`` and
``K = prod(shape[axis:])``; the top is ``(*shape[:axis], N)``:

    Y = X @ W.T + b      weight W (N, K)             (transpose: false, Caffe's default)
    Y = X @ W + b        weight W (K, N)             (transpose: true)
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layers import caffe_gemm
from amct_caffe.runtime.layers.integer_ops import inner_product_exact
from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.ops import register


def InnerProduct(x, weight, bias=None, *, axis=1, transpose=False):  # noqa: N802 - Caffe type name
    """Caffe's fully connected layer; see the module doc for the shapes."""
    x = np.asarray(x, np.float32)
    axis = canonical_axis(axis, x.ndim, "InnerProduct")
    lead = x.shape[:axis]
    x2 = x.reshape(math.prod(lead), math.prod(x.shape[axis:]))  # (not -1: an empty batch has 0 rows)
    w = np.asarray(weight, np.float32)
    # Caffe: cblas_sgemm(NoTrans, transpose ? NoTrans : Trans, M, N, K); numpy hands the
    # transposed view to BLAS as the same Trans call, without a copy. Rounded like Caffe's
    # OpenBLAS (see caffe_gemm).
    n = w.shape[1] if transpose else w.shape[0]
    y = caffe_gemm.matmul(x2, w if transpose else w.T, (x2.shape[0], n, x2.shape[1]), trans_b=not transpose)
    if bias is not None:
        y += np.asarray(bias, np.float32).reshape(-1)
    return y.reshape(lead + (y.shape[1],))


@register("InnerProduct")
class InnerProductLayer(Layer):
    """Caffe's InnerProduct: see :func:`InnerProduct`; learned blobs [weight, bias (N,)]."""

    in_place_differs = "Caffe's GEMM would write the output into the input it is still reading"

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        if lp.inner_product_param.num_output <= 0:
            raise GraphError(f"layer '{lp.name}' (InnerProduct): inner_product_param.num_output must be > 0")
        self.axis = None

    def _k(self, shape) -> int:
        self.axis = canonical_axis(self.lp.inner_product_param.axis, len(shape), self.name)
        return math.prod(shape[self.axis:])

    def param_shapes(self, bottom_shapes):
        ip = self.lp.inner_product_param
        k = self._k(tuple(bottom_shapes[0]))
        shapes = [(k, ip.num_output) if ip.transpose else (ip.num_output, k)]
        if ip.bias_term:
            shapes.append((ip.num_output,))
        return shapes

    def param_fillers(self):
        ip = self.lp.inner_product_param
        return [ip.weight_filler, ip.bias_filler]

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        ip = self.lp.inner_product_param
        k = self._k(shape)
        if self.blobs:
            w = self.blobs[0].data.shape
            if (w[0] if ip.transpose else w[1]) != k:
                raise GraphError(f"layer '{self.name}' (InnerProduct): input size {k} (shape {list(shape)} "
                                 f"from axis {self.axis}) does not match the weight shape {list(w)}")
        return [shape[:self.axis] + (ip.num_output,)]

    def forward(self, bottoms):
        ip = self.lp.inner_product_param
        bias = self.blobs[1].data if len(self.blobs) > 1 else None
        if self.integer_params:  # a deploy model's INT8 layer: exact integer accumulation
            return [inner_product_exact(bottoms[0], self.blobs[0].data, bias, self.axis, ip.transpose)]
        return [InnerProduct(bottoms[0], self.blobs[0].data, bias, axis=self.axis, transpose=ip.transpose)]

    def prepared_forward(self, bottom_shapes):
        """:func:`InnerProduct` with its GEMM prepared for this bottom shape (caffe_gemm.prepared)."""
        if self.integer_params:
            return self.forward
        shape = tuple(bottom_shapes[0])
        lead, transpose = shape[:self.axis], self.lp.inner_product_param.transpose
        m, k = math.prod(lead), math.prod(shape[self.axis:])
        plans = {}  # per GEMM configuration (caffe_gemm.configure replaces it)

        def forward(bottoms):
            blobs = self.blobs
            w = blobs[0].data
            n = w.shape[1] if transpose else w.shape[0]
            config = caffe_gemm.gemm_config()
            mm = plans.get((config, n))
            if mm is None:
                mm = plans[(config, n)] = caffe_gemm.prepared(m, k, n, (m, n, k), trans_b=not transpose)
            y = mm(bottoms[0].reshape(m, k), w if transpose else w.T)
            if len(blobs) > 1:
                y += blobs[1].data.reshape(-1)
            return [y.reshape(lead + (n,))]
        return forward

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """dW += dY^T X (or X^T dY when transposed), db += sum_m dY, dX = dY W (or dY W^T).

        dX is Caffe's one ``(M x N) @ (N x K)`` call rounded as Caffe's (:func:`caffe_gemm.matmul`);
        dW sums its M rows in blocks that do not depend on the BLAS thread count.
        """
        x = bottoms[0]
        x2 = x.reshape(math.prod(x.shape[:self.axis]), math.prod(x.shape[self.axis:]))
        dy = top_diffs[0].reshape(x2.shape[0], math.prod(top_diffs[0].shape[self.axis:]))
        w = self.blobs[0].data
        transpose = self.lp.inner_product_param.transpose
        if self.param_propagate_down[0]:
            a, b = (x2.T, dy) if transpose else (dy.T, x2)
            self.blobs[0].diff += caffe_gemm.stable_matmul(a, b)
        if len(self.blobs) > 1 and self.param_propagate_down[1]:
            self.blobs[1].diff += dy.sum(axis=0, dtype=np.float32)
        if not propagate_down[0]:
            return [None]
        m, n = dy.shape
        dx = caffe_gemm.matmul(dy, w.T if transpose else w, (m, x2.shape[1], n), trans_b=transpose)
        return [dx.reshape(x.shape)]
