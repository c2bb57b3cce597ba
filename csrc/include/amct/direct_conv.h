// A 2-D convolution with a short contraction (K = C * kh * kw up to kDirectMaxK) computed directly,
// without columns, summed as OpenBLAS's level-3 sgemm driver sums each element of Caffe's column GEMM
// (one call per image, K not split): one fused multiply-add per k in Caffe's column order (c, i, j),
// from zero, the sum stored as alpha * acc + 0 (so -0 is stored +0). numpy's OpenBLAS (AVX-512
// kernels) computes the same bytes; the caller checks it is the one in use (caffe_gemm.exact()) where
// those bytes matter.
//
// Early layers of small networks (a 3x3 stride-2 layer on an RGB image, 1x1 layers on 16-32
// channels over large maps) are like this: their GEMM is mostly packing and memory traffic, while
// here each input vector loaded feeds 8 output channels (amct/register_block.h: 48 pixels at a time in
// AVX-512 registers, or 24 in AVX2 registers, four channels per pass; the same bytes).
#pragma once

#include "amct/depthwise.h"

namespace amct {

constexpr int kDirectMaxK = 256;

// x (N, C, H, W), w (O, C, kh, kw), y (N, O, Ho, Wo); geometry g with g.c = C (g.kh, g.kw, strides,
// pads, dilations, Ho, Wo). bias (O,) or null: y = sum + bias[o] (a second rounding, as Caffe adds
// it). Workers split the output rows.
void direct_conv2d(const float* x, const float* w, float* y, const Conv2dGeometry& g, int o, int threads,
                   const float* bias = nullptr);

// The same, each stored value then mapped as a folded chain's epilogue does it in a separate pass
// (channel_affine, conv_cols.h): v * scale[o] (if scale), + bias[o] (if bias), NumPy's maximum(v, 0)
// (if relu); each step one float32 rounding, so the bytes of the two passes.
void direct_conv2d(const float* x, const float* w, float* y, const Conv2dGeometry& g, int o, int threads,
                   const float* scale, const float* bias, bool relu);

// Whether direct_conv2d can run here (a CPU with AVX2 and FMA, amct/cpu.h's simd_level() >= 1).
bool direct_conv_available();

}  // namespace amct
