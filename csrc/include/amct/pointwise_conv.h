// A 1x1 convolution of a folded chain (FAST fold mode, float nets; a strided layer's pixels are picked
// first by the caller), with the chain's epilogue applied while the sums are still in registers:
//
//   s[n, o, p] = sum_k w[o, k] * x[n, k, p] + 0    one fused multiply-add per k, in k order, from zero;
//                                                    stored + 0 as a GEMM's alpha * acc + beta * 0
//   y = s * scale[o] + bias[o]                      (each if given; two float32 roundings, as the
//                                                    separate channel_affine pass of conv_cols.h)
//   y = max(y, 0)                                   (relu, NumPy's maximum: NaN kept, -0 -> +0)
//
// The sums are those of direct_conv.h's kernel (the register block of amct/register_block.h) and of
// OpenBLAS's AVX-512 sgemm where it does not split K. Against a BLAS GEMM and then a pass over the
// output, the output is written once and never read back, and the input is read in place (a GEMM packs
// it). Register blocks of 8 output channels x 48 pixels of one image (24 AVX-512 accumulators), or with
// AVX2 8 x 24 in two passes of 4 channels (the same bytes); a work item is 192 pixels of all channels,
// and the next item's input rows are requested into L2 while it runs. No sum depends on the thread
// count or the blocking. CPUs with AVX2 and FMA. (A residual Eltwise's
// max(y + other, 0) in the same kernel measured slower than a separate pass.)
#pragma once

#include <cstddef>

namespace amct {

struct PointwiseEpilogue {
  const float* scale = nullptr;  // (O,) or null
  const float* bias = nullptr;   // (O,) or null
  bool relu = false;
};

// x (N, K, P), w (O, K), y (N, O, P).
void pointwise_conv(const float* x, const float* w, float* y, int n, int k, std::size_t p, int o,
                    const PointwiseEpilogue& ep, int threads);

bool pointwise_conv_available();

}  // namespace amct
