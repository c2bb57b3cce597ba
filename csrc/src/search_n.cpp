#include "amct/search_n.h"

#include <cmath>
#include <string>

#include "amct/common.h"

#ifndef __SIZEOF_INT128__
#error "search_n needs a compiler with unsigned __int128 (GCC or Clang)"
#endif

namespace amct {
namespace {
using u128 = unsigned __int128;
u128 load(const U128& v) { return (static_cast<u128>(v.hi) << 64) | v.lo; }
void store(U128& v, u128 x) {
  v.hi = static_cast<std::uint64_t>(x >> 64);
  v.lo = static_cast<std::uint64_t>(x);
}
}  // namespace

void search_n_accumulate(const float* x, std::size_t batch, std::size_t channels, std::size_t inner,
                         const float* deq, U128* err) {
  for (std::size_t c = 0; c < channels; ++c) {
    if (!(deq[c] > 0.0f) || !std::isfinite(deq[c])) {
      fail("SearchN: deq_scale of channel " + std::to_string(c) + " must be finite and > 0");
    }
  }
  for (std::size_t c = 0; c < channels; ++c) {
    u128 acc[kNumShiftBits] = {};
    const double d = static_cast<double>(deq[c]);
    for (std::size_t b = 0; b < batch; ++b) {
      const float* row = x + (b * channels + c) * inner;
      for (std::size_t i = 0; i < inner; ++i) {
        if (std::isnan(row[i])) fail("SearchN: input data contains NaN");
        double r = std::round(static_cast<double>(row[i]) / d);
        r = r < -2147483648.0 ? -2147483648.0 : (r > 2147483647.0 ? 2147483647.0 : r);
        const auto s32 = static_cast<std::int64_t>(r);
        for (int n = kMinShiftBit; n <= kMaxShiftBit; ++n) {
          std::int64_t s16 = s32 >> n;  // arithmetic shift = floor division by 2^n
          s16 = s16 < -32768 ? -32768 : (s16 > 32767 ? 32767 : s16);
          const std::int64_t diff = s16 * (std::int64_t{1} << n) - s32;
          const auto mag = static_cast<u128>(diff < 0 ? -diff : diff);
          acc[n - kMinShiftBit] += mag * mag;
        }
      }
    }
    for (int k = 0; k < kNumShiftBits; ++k) {
      U128& slot = err[c * kNumShiftBits + k];
      store(slot, load(slot) + acc[k]);
    }
  }
}

void search_n_select(const U128* err, std::size_t channels, int* best) {
  for (std::size_t c = 0; c < channels; ++c) {
    int k_best = 0;
    for (int k = 1; k < kNumShiftBits; ++k) {
      if (load(err[c * kNumShiftBits + k]) < load(err[c * kNumShiftBits + k_best])) k_best = k;
    }
    best[c] = k_best + kMinShiftBit;
  }
}

}  // namespace amct
