// search_n: per-channel shift bit n in [1, 16] for the int32 -> int16 requantization
// (math and tie rule: amct_caffe/quant/search_n.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace amct {

constexpr int kMinShiftBit = 1;
constexpr int kMaxShiftBit = 16;
constexpr int kNumShiftBits = kMaxShiftBit - kMinShiftBit + 1;

// Exact unsigned 128-bit error accumulator (hi:lo).
struct U128 {
  std::uint64_t hi = 0, lo = 0;
};

// x viewed as [batch, channels, inner], deq[channels] > 0. Adds, for every channel c and n,
//   sum over its values of (clamp(floor(s32 / 2^n), -32768, 32767) * 2^n - s32)^2,
//   s32 = clamp(round(f64(x) / f64(deq[c])), INT32_MIN, INT32_MAX)
// to err[c * 16 + (n - 1)], exactly. Throws on NaN input or a bad deq.
void search_n_accumulate(const float* x, std::size_t batch, std::size_t channels, std::size_t inner,
                         const float* deq, U128* err);

// best[c] = the smallest n with the smallest err (exact integers, so ties are real ties).
void search_n_select(const U128* err, std::size_t channels, int* best);

}  // namespace amct
