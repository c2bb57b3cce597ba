#include "amct/libm_float.h"

#include <cstdint>
#include <cstring>

#include "amct/parallel.h"

namespace amct {
namespace {

constexpr float kOne = 1.0f, kHalf = 0.5f, kTwo = 2.0f;
constexpr float kHuge = 1.0e30f, kTiny = 1.0e-30f;
constexpr float kLn2Hi = 6.9313812256e-01f;   // 0x3f317180
constexpr float kLn2Lo = 9.0580006145e-06f;   // 0x3717f7d1
constexpr float kInvLn2 = 1.4426950216e+00f;  // 0x3fb8aa3b
constexpr float kQ1 = -3.3333335072e-02f, kQ2 = 1.5873016091e-03f, kQ3 = -7.9365076090e-05f,
                kQ4 = 4.0082177293e-06f, kQ5 = -2.0109921195e-07f;

std::int32_t bits(float x) {
  std::int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}

float from_bits(std::int32_t i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

// SET_FLOAT_WORD(y, GET_FLOAT_WORD(y) + (k << 23)): k added to y's exponent
float scale_exponent(float y, std::int32_t k) {
  return from_bits(static_cast<std::int32_t>(static_cast<std::uint32_t>(bits(y)) + (static_cast<std::uint32_t>(k) << 23)));
}

}  // namespace

float fdlibm_expm1f(float x) {
  const std::int32_t word = bits(x);
  const bool negative = word < 0;
  const std::uint32_t hx = static_cast<std::uint32_t>(word) & 0x7fffffffu;
  if (hx >= 0x4195b844u) {           // |x| >= 27 ln2
    if (hx > 0x7f800000u) return x + x;                 // NaN
    if (hx >= 0x42b17218u) {                            // |x| >= 88.72...
      if (hx == 0x7f800000u) return negative ? -1.0f : x;
      if (!negative) return kHuge * kHuge;              // overflow
    }
    if (negative) return kTiny - kOne;                  // -1
  }
  std::int32_t k = 0;
  float c = 0.0f;
  if (hx > 0x3eb17218u) {            // |x| > 0.5 ln2: x = k ln2 + r
    float hi, lo;
    if (hx < 0x3F851592u) {          // and < 1.5 ln2
      if (!negative) {
        hi = x - kLn2Hi; lo = kLn2Lo; k = 1;
      } else {
        hi = x + kLn2Hi; lo = -kLn2Lo; k = -1;
      }
    } else {
      k = static_cast<std::int32_t>(kInvLn2 * x + (negative ? -0.5f : 0.5f));  // C truncation
      const float t = static_cast<float>(k);
      hi = x - t * kLn2Hi;           // exact
      lo = t * kLn2Lo;
    }
    x = hi - lo;
    c = (hi - x) - lo;
  } else if (hx < 0x33000000u) {     // |x| < 2^-25
    return x;
  }
  const float hfx = kHalf * x;
  const float hxs = x * hfx;
  const float r1 = kOne + hxs * (kQ1 + hxs * (kQ2 + hxs * (kQ3 + hxs * (kQ4 + hxs * kQ5))));
  float t = 3.0f - r1 * hfx;
  float e = hxs * ((r1 - t) / (6.0f - x * t));
  if (k == 0) return x - (x * e - hxs);
  e = (x * (e - c) - c);
  e -= hxs;
  if (k == -1) return kHalf * (x - e) - kHalf;
  if (k == 1) {
    if (x < -0.25f) return -kTwo * (e - (x + kHalf));
    return kOne + kTwo * (x - e);
  }
  if (k <= -2 || k > 56) return scale_exponent(kOne - (e - x), k) - kOne;
  float y;
  if (k < 23) {
    t = from_bits(0x3f800000 - (0x1000000 >> k));     // 1 - 2^-k
    y = t - (e - x);
  } else {
    t = from_bits((0x7f - k) << 23);                  // 2^-k
    y = x - (e + t);
    y += kOne;
  }
  return scale_exponent(y, k);
}

float fdlibm_tanhf(float x) {
  const std::int32_t jx = bits(x);
  const std::uint32_t ix = static_cast<std::uint32_t>(jx) & 0x7fffffffu;
  if (ix >= 0x7f800000u) return jx >= 0 ? kOne / x + kOne : kOne / x - kOne;  // +-inf: +-1; NaN
  float z;
  if (ix < 0x41b00000u) {            // |x| < 22
    if (ix == 0) return x;           // signed zero
    if (ix < 0x24000000u) return x * (kOne + x);        // |x| < 2^-55
    const float ax = x < 0 ? -x : x;
    if (ix >= 0x3f800000u) {         // |x| >= 1
      const float t = fdlibm_expm1f(kTwo * ax);
      z = kOne - kTwo / (t + kTwo);
    } else {
      const float t = fdlibm_expm1f(-kTwo * ax);
      z = -t / (t + kTwo);
    }
  } else {
    z = kOne - kTiny;
  }
  return jx >= 0 ? z : -z;
}

void tanhf_array(const float* x, float* y, std::size_t n, int threads) {
  parallel_for(n, n >= (1u << 16) ? threads : 1, [&](std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) y[i] = fdlibm_tanhf(x[i]);
  });
}

}  // namespace amct
