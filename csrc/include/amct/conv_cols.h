// MAX pooling and the per-channel epilogue of the executor's forward
// (amct_caffe/runtime/layers/{conv_cols,pooling}.py and runtime/fold.py hold the NumPy references).
//
// None of these loops rounds differently from its reference: MAX pooling only compares, the
// epilogues round y * a and then + b as two float32 operations (no contraction).
#pragma once

#include <cstddef>

#include "amct/depthwise.h"

namespace amct {

// Caffe's PoolingLayer::Forward_cpu, MAX, on x (N, C, H, W) -> y (N, C, Ho, Wo); the geometry's
// kernel / stride / pad are the pooling's (dilation unused): windows clipped to the image, a tap
// replaces the running max (from -FLT_MAX) only where strictly greater.
void max_pool2d(const float* x, float* y, const Conv2dGeometry& g, int threads);

// Caffe's PoolingLayer::Forward_cpu, AVE: each window's cells clipped to the image summed in row-major order
// from +0, then divided by the window's size clipped to the padded image (an int, converted to float): Caffe's
// bytes. The sums of one output row run side by side over the outputs whose window lies inside the image, so
// each keeps its own order; global pooling sums sixteen planes side by side.
void ave_pool2d(const float* x, float* y, const Conv2dGeometry& g, int threads);

// In place on y (N, C, P): y = y * a[c] + b[c] (a or b may be null: skipped), then, if relu, NumPy's
// maximum(y, 0): y where y > 0 or NaN, else +0.
// y[i] = NumPy's maximum(x[i], 0) for i < n: x where x > 0 or NaN, else +0 (a ReLU layer whose top is
// another blob). NumPy's own loop keeps NaNs by a slower path: 0.23 ms for 614,400 values against 0.06.
void relu(const float* x, float* y, std::size_t n, int threads);

void channel_affine(float* y, std::size_t n, std::size_t c, std::size_t p, const float* a, const float* b, bool relu,
                    int threads);

// A residual block's end in one pass: y (N, C, P) = y * a[c] + b[c] in place (two roundings), and
// s = NumPy's maximum(y + other, 0) (an Eltwise SUM with the block's shortcut, then its ReLU).
void affine_add_relu(float* y, const float* other, float* s, std::size_t n, std::size_t c, std::size_t p,
                     const float* a, const float* b, int threads);

// y = max(a + b, 0) elementwise over n values (an Eltwise SUM and the in-place ReLU after it).
void add_relu(const float* a, const float* b, float* y, std::size_t n, int threads);

// y = a > b ? a : b elementwise over n values (Caffe's Eltwise MAX step: NaN never wins; equal values give b).
// y may be a or b.
void greater_select(const float* a, const float* b, float* y, std::size_t n, int threads);

// y = fma(a, x, y) elementwise over n values, one rounding each (Caffe's saxpy: an Eltwise SUM's coefficients).
void fused_axpy(float a, const float* x, float* y, std::size_t n, int threads);

// PReLU over x (N, C, P): y = x where x > 0, else x * a[c] (a[0] for every channel if `shared`): NumPy's
// multiply(x, a) then copyto(y, x, where=x > 0), so NaN and -0 come out as there, in one pass.
void prelu(const float* x, const float* a, float* y, std::size_t n, std::size_t c, std::size_t p, bool shared,
           int threads);

}  // namespace amct
