// Depthwise 2-D convolution (group == C == O), summed as Caffe's OpenBLAS sums it.
//
// Caffe runs one (1 x K) @ (K x P) sgemm per image and channel, K = kh*kw taps. OpenBLAS's
// small-matrix kernel (the case of these calls on x86-64) accumulates each output with one fused
// multiply-add per tap, taps in row-major order, from zero:
//
//   y[n, c, oy, ox] = fma(w[c, kh-1, kw-1], xpad[..], ... fma(w[c, 0, 0], xpad[n, c, oy*sh, ox*sw], 0))
//
// xpad being x with ph / pw zero rows / columns around (and more zeros at the end where C's
// truncating division lets the last window reach past it). The zero taps are summed too, so the
// signs of zero results are Caffe's.
#pragma once

#include "amct/conv_geometry.h"

namespace amct {

// x (N, C, H, W), w (C, kh, kw), y (N, C, Ho, Wo), all C-contiguous float32; bias (C,) or null, added
// to each sum (y = sum + bias[c], one rounding, as Caffe's bias GEMM adds it). `threads` workers
// split the (image, channel) planes; each output is computed by one worker, so the result does
// not depend on `threads`.
void depthwise_conv2d(const float* x, const float* w, float* y, const Conv2dGeometry& g, int threads,
                      const float* bias = nullptr);

// Whether the loops use the CPU's FMA instruction (otherwise libm's fmaf, exact but slow).
bool depthwise_has_fma();

}  // namespace amct
