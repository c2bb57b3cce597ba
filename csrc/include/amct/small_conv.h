// A whole small 2-D convolution in one call: columns, one GEMM per image, the bias and an activation
// (amct_caffe/runtime/layers/conv_plan.py, ConvPlan.native: MTCNN's 12x12 P-Net, where the Python and
// pybind11 calls around each kernel cost more than the kernels).
//
// The GEMM is the caller's (`Sgemm`): the Python module passes numpy's own BLAS sgemm, called exactly as
// numpy's matmul calls it for C-contiguous 2-D operands, so each product rounds as the NumPy path's does.
#pragma once

#include <cstddef>

#include "amct/depthwise.h"

namespace amct {

// C (m x n) = A (m x k) @ B (k x n), row-major with leading dimensions lda / ldb / ldc.
using Sgemm = void (*)(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc);

struct SmallConvShape {
  Conv2dGeometry g;  // the input, kernel, stride, pad, dilation and output size (one group)
  int o;             // output channels
  int rows, cols;    // the GEMM's call shape: >= (o, Ho*Wo), zero rows / columns appended where larger
  bool im2col;       // false: a 1x1 stride-1 convolution without pad, whose input is its columns
};

enum class SmallConvAct { kNone, kRelu, kPrelu };

// y (N, O, Ho, Wo) = conv(x (N, C, H, W), w (O, C, kh, kw)), per image: im2col (conv_backward.h), then
// C = W @ cols through `gemm` on the (rows x cols) call shape (W's zero rows in `apad`, the columns' zero
// columns in `bpad`, the product in `cpad`, cropped into y); then channel_affine's bias add (bias may be
// null) and NumPy's ReLU, or prelu (conv_cols.h) with `slope` (one value if `shared`). Scratch: `cols`
// N*C*kh*kw*Ho*Wo values (if im2col), `apad` rows*K with rows o.. zero, `bpad` K*cols with columns
// Ho*Wo.. zero, `cpad` rows*cols (the last three only where the call shape is larger). One thread.
void small_conv2d(const float* x, const float* w, float* y, const SmallConvShape& s, Sgemm gemm, float* cols,
                  float* apad, float* bpad, float* cpad, const float* bias, SmallConvAct act, const float* slope,
                  bool shared);

}  // namespace amct
