// Per-channel reductions and BatchNorm's backward over (N, C, S) float32 arrays (S: the inner
// elements of a channel, e.g. H*W), for the batch-statistics layers (BatchNorm, Scale, Bias).
//
// channel_sums: sum_a[c] = sum over n, s of a[n, c, s]; with b, also
//   sum_ab[c] = sum over n, s of fl(a[n, c, s] * b[n, c, s])   (the float32 product, as NumPy's)
// accumulated in double, in a fixed order (eight partial sums over s, combined in order, then n in
// order): the same bytes with any thread count, within a double's rounding of NumPy's float64 sum.
//
// batch_norm_backward, per element with c its channel (every operation rounded to float32, no fused
// multiply-add, as the NumPy expression it replaces):
//   dx = (dy - ((x_norm * sum_dyx[c] + sum_dy[c]) * inv_m)) / std[c]
//
// `threads` workers split the channels (channel_sums) or the (n, c) runs (batch_norm_backward).
#pragma once

#include <cstddef>

namespace amct {

struct ChannelShape {
  std::size_t n, c, s;
};

void channel_sums(const float* a, const float* b, const ChannelShape& shape, double* sum_a, double* sum_ab,
                  int threads);

void batch_norm_backward(const float* dy, const float* x_norm, const float* stdev, const float* sum_dy,
                         const float* sum_dyx, float inv_m, const ChannelShape& shape, float* dx, int threads);

}  // namespace amct
