#include "amct/channel_ops.h"
#include "amct/cpu.h"

#include "amct/parallel.h"

namespace amct {
namespace {

constexpr int kLanes = 8;  // partial sums per run: independent chains the compiler can vectorize

// Adds the run a[0, len) (times b, if given) onto acc[kLanes] / acc_ab[kLanes], lane i % kLanes.
template <bool Product>
__attribute__((always_inline)) inline void add_run(const float* a, const float* b, std::size_t len, double* acc,
                                                   double* acc_ab) {
  std::size_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      acc[k] += static_cast<double>(a[i + k]);
      if (Product) acc_ab[k] += static_cast<double>(a[i + k] * b[i + k]);
    }
  }
  for (int k = 0; i < len; ++i, ++k) {
    acc[k] += static_cast<double>(a[i]);
    if (Product) acc_ab[k] += static_cast<double>(a[i] * b[i]);
  }
}

template <int Dummy>
__attribute__((always_inline)) inline void sums(const float* a, const float* b, const ChannelShape& sh,
                                                double* sum_a, double* sum_ab, std::size_t first, std::size_t last) {
  for (std::size_t c = first; c < last; ++c) {
    double acc[kLanes] = {}, acc_ab[kLanes] = {};
    for (std::size_t n = 0; n < sh.n; ++n) {
      const std::size_t at = (n * sh.c + c) * sh.s;
      if (b) {
        add_run<true>(a + at, b + at, sh.s, acc, acc_ab);
      } else {
        add_run<false>(a + at, nullptr, sh.s, acc, acc_ab);
      }
    }
    double total = 0.0, total_ab = 0.0;
    for (int k = 0; k < kLanes; ++k) {
      total += acc[k];
      total_ab += acc_ab[k];
    }
    sum_a[c] = total;
    if (b) sum_ab[c] = total_ab;
  }
}

__attribute__((target("avx2"))) void sums_avx2(const float* a, const float* b, const ChannelShape& sh, double* sum_a,
                                               double* sum_ab, std::size_t first, std::size_t last) {
  sums<0>(a, b, sh, sum_a, sum_ab, first, last);
}

void sums_generic(const float* a, const float* b, const ChannelShape& sh, double* sum_a, double* sum_ab,
                  std::size_t first, std::size_t last) {
  sums<1>(a, b, sh, sum_a, sum_ab, first, last);
}

}  // namespace

void channel_sums(const float* a, const float* b, const ChannelShape& shape, double* sum_a, double* sum_ab,
                  int threads) {
  auto run = cpu_has_avx2() ? sums_avx2 : sums_generic;
  parallel_for(shape.c, threads,
                  [&](std::size_t first, std::size_t last) { run(a, b, shape, sum_a, sum_ab, first, last); });
}

void batch_norm_backward(const float* dy, const float* x_norm, const float* stdev, const float* sum_dy,
                         const float* sum_dyx, float inv_m, const ChannelShape& shape, float* dx, int threads) {
  parallel_for(shape.n * shape.c, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t r = first; r < last; ++r) {
      const std::size_t c = r % shape.c, at = r * shape.s;
      const float s2 = sum_dyx[c], s1 = sum_dy[c], sd = stdev[c];
      for (std::size_t i = at; i < at + shape.s; ++i) {
        float t = x_norm[i] * s2;
        t = t + s1;
        t = t * inv_m;
        dx[i] = (dy[i] - t) / sd;
      }
    }
  });
}

}  // namespace amct
