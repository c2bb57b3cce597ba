#include "amct/libm_float.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "amct/cpu.h"
#include "amct/parallel.h"

namespace amct {
namespace {

// The bits of one type read as another of the same size (C++20's std::bit_cast).
template <class To, class From>
To bit_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size only");
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}


constexpr float kOne = 1.0f, kHalf = 0.5f, kTwo = 2.0f;
constexpr float kHuge = 1.0e30f, kTiny = 1.0e-30f;
constexpr float kLn2Hi = 6.9313812256e-01f;   // 0x3f317180
constexpr float kLn2Lo = 9.0580006145e-06f;   // 0x3717f7d1
constexpr float kInvLn2 = 1.4426950216e+00f;  // 0x3fb8aa3b
constexpr float kQ1 = -3.3333335072e-02f, kQ2 = 1.5873016091e-03f, kQ3 = -7.9365076090e-05f,
                kQ4 = 4.0082177293e-06f, kQ5 = -2.0109921195e-07f;

// SET_FLOAT_WORD(y, GET_FLOAT_WORD(y) + (k << 23)): k added to y's exponent
float scale_exponent(float y, std::int32_t k) {
  const std::uint32_t raised =
      static_cast<std::uint32_t>(bit_as<std::int32_t>(y)) + (static_cast<std::uint32_t>(k) << 23);
  return bit_as<float>(static_cast<std::int32_t>(raised));
}

}  // namespace

float fdlibm_expm1f(float x) {
  const std::int32_t word = bit_as<std::int32_t>(x);
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
    t = bit_as<float>(0x3f800000 - (0x1000000 >> k));     // 1 - 2^-k
    y = t - (e - x);
  } else {
    t = bit_as<float>((0x7f - k) << 23);                  // 2^-k
    y = x - (e + t);
    y += kOne;
  }
  return scale_exponent(y, k);
}

float fdlibm_tanhf(float x) {
  const std::int32_t jx = bit_as<std::int32_t>(x);
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

namespace {

// glibc's __exp2f_data (sysdeps/ieee754/flt-32/e_exp2f_data.c), as the bits of its doubles: tab[j] is
// 2^(j/32) correctly rounded, less j << 47, so that adding k << 47 gives 2^(k/32); then what expf reads.
constexpr std::uint64_t kExp2fTab[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
    0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
    0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540};
constexpr std::uint64_t kInvLn2N = 0x40471547652b82fe;  // 32 / ln 2
constexpr std::uint64_t kShift = 0x4338000000000000;    // 0x1.8p52: z + shift rounds z to an integer
constexpr std::uint64_t kC0 = 0x3ebc6af84b912394, kC1 = 0x3f2ebfce50fac4f3, kC2 = 0x3f962e42ff0c52d6;
constexpr std::uint32_t kOverflow = 0x42b17217;     // 0x1.62e42ep6f: above, inf
constexpr std::uint32_t kUnderflow = 0xc2cff1b4;    // -0x1.9fe368p6f: below, 0
constexpr std::uint32_t kMayUnderflow = 0xc2ce8ecf; // -0x1.9d1d9ep6f: below, 2^-149 (__math_may_uflowf)

// e_expf.c as glibc's x86-64 FMA build compiles it (disassembled: vfmadd for z + shift, vfmsub for r,
// vfmadd for the three polynomial steps). std::fma is exact on any CPU, so this gives those bits
// everywhere; inlined into a function built for FMA it is those instructions.
__attribute__((always_inline)) inline float expf_body(float x) {
  std::uint32_t ux;
  std::memcpy(&ux, &x, sizeof ux);
  const std::uint32_t abstop = (ux >> 20) & 0x7ff;
  if (__builtin_expect(abstop >= 0x42b, 0)) {  // |x| >= 88 or NaN
    if (ux == 0xff800000u) return 0.0f;          // -inf
    if (abstop >= 0x7f8) return x + x;           // inf, NaN
    if (x > bit_as<float>(kOverflow)) return HUGE_VALF;
    if (x < bit_as<float>(kUnderflow)) return 0.0f;
    if (x < bit_as<float>(kMayUnderflow)) return bit_as<float>(1);  // 0x1.4p-75f * 0x1.4p-75f rounded: 2^-149
  }
  const double xd = x, inv = bit_as<double>(kInvLn2N), shift = bit_as<double>(kShift);
  const double shifted = std::fma(inv, xd, shift);  // k = round(x 32 / ln 2), ties to even, in the low bits
  const std::uint64_t ki = bit_as<std::uint64_t>(shifted);
  const double kd = shifted - shift;
  const double r = std::fma(inv, xd, -kd);          // x 32 / ln 2 - k, |r| <= 1/2
  const double s = bit_as<double>(kExp2fTab[ki % 32] + (ki << 47));  // 2^(k/32)
  const double z = std::fma(bit_as<double>(kC0), r, bit_as<double>(kC1));
  const double r2 = r * r;
  double y = std::fma(bit_as<double>(kC2), r, 1.0);
  y = std::fma(z, r2, y);
  return static_cast<float>(y * s);
}

// Four values at a time, the same operations lane by lane (vfmadd / vfmsub / vmulpd / vcvtpd2ps round as
// their scalar forms; the table through a gather); a group holding an input of |x| >= 88 or NaN takes
// those lanes from expf_body, whose first branch handles them.
__attribute__((target("avx2,fma"))) void expf_fma(const float* x, float* y, std::size_t n) {
  const __m256d inv = _mm256_set1_pd(bit_as<double>(kInvLn2N)), shift = _mm256_set1_pd(bit_as<double>(kShift));
  const __m256d c0 = _mm256_set1_pd(bit_as<double>(kC0)), c1 = _mm256_set1_pd(bit_as<double>(kC1));
  const __m256d c2 = _mm256_set1_pd(bit_as<double>(kC2));
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256i low5 = _mm256_set1_epi64x(31);
  const __m128i top_mask = _mm_set1_epi32(0x7ff), big = _mm_set1_epi32(0x42a);
  const auto* tab = reinterpret_cast<const long long*>(kExp2fTab);
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 xf = _mm_loadu_ps(x + i);
    const __m128i abstop = _mm_and_si128(_mm_srli_epi32(_mm_castps_si128(xf), 20), top_mask);
    const int special = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(abstop, big)));
    const __m256d xd = _mm256_cvtps_pd(xf);
    const __m256d shifted = _mm256_fmadd_pd(inv, xd, shift);
    const __m256i ki = _mm256_castpd_si256(shifted);
    const __m256d kd = _mm256_sub_pd(shifted, shift);
    const __m256d r = _mm256_fmsub_pd(inv, xd, kd);
    const __m256i t = _mm256_add_epi64(_mm256_i64gather_epi64(tab, _mm256_and_si256(ki, low5), 8),
                                       _mm256_slli_epi64(ki, 47));
    const __m256d z = _mm256_fmadd_pd(c0, r, c1);
    const __m256d r2 = _mm256_mul_pd(r, r);
    __m256d p = _mm256_fmadd_pd(c2, r, one);
    p = _mm256_fmadd_pd(z, r2, p);
    _mm_storeu_ps(y + i, _mm256_cvtpd_ps(_mm256_mul_pd(p, _mm256_castsi256_pd(t))));
    if (special) {  // (from the loaded values: y may be x)
      alignas(16) float in[4];
      _mm_store_ps(in, xf);
      for (int j = 0; j < 4; ++j) {
        if (special >> j & 1) y[i + j] = expf_body(in[j]);
      }
    }
  }
  for (; i < n; ++i) y[i] = expf_body(x[i]);
}

void expf_portable(const float* x, float* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] = expf_body(x[i]);
}

}  // namespace

float glibc_expf(float x) { return expf_body(x); }

void expf_span(const float* x, float* y, std::size_t n) {
  if (cpu_has_avx2()) {
    expf_fma(x, y, n);
  } else {
    expf_portable(x, y, n);
  }
}

void expf_array(const float* x, float* y, std::size_t n, int threads) {
  parallel_for(n, n >= (1u << 16) ? threads : 1, [&](std::size_t first, std::size_t last) {
    expf_span(x + first, y + first, last - first);
  });
}

void powf_array(const float* x, float* y, std::size_t n, float exponent, int threads) {
  volatile float held = exponent;  // read at run time: the call stays libm's powf (never a sqrtf or x * x)
  const float p = held;
  parallel_for(n, n >= (1u << 16) ? threads : 1, [&](std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) y[i] = std::pow(x[i], p);
  });
}

namespace {

// y[i] = finish(x[i], glibc_expf(argument(x[i]))) over chunks: the arguments and their expf in a buffer, the
// expf loop vectorized (expf_span), each value written by one worker (the bytes do not depend on `threads`).
template <class Argument, class Finish>
void with_expf(const float* x, float* y, std::size_t n, int threads, Argument argument, Finish finish) {
  constexpr std::size_t kChunk = 4096;
  parallel_for((n + kChunk - 1) / kChunk, n >= (1u << 16) ? threads : 1, [&](std::size_t first, std::size_t last) {
    float e[kChunk];
    for (std::size_t c = first; c < last; ++c) {
      const std::size_t begin = c * kChunk, len = std::min(n, begin + kChunk) - begin;
      for (std::size_t i = 0; i < len; ++i) e[i] = argument(x[begin + i]);
      expf_span(e, e, len);
      for (std::size_t i = 0; i < len; ++i) y[begin + i] = finish(x[begin + i], e[i]);
    }
  });
}

}  // namespace

void caffe_sigmoid_array(const float* x, float* y, std::size_t n, int threads) {
  with_expf(x, y, n, threads, [](float v) { return -v; },
            [](float, float e) { return static_cast<float>(1.0 / (1.0 + static_cast<double>(e))); });
}

void caffe_bnll_array(const float* x, float* y, std::size_t n, int threads) {
  with_expf(x, y, n, threads, [](float v) { return -std::fabs(v); }, [](float v, float e) {
    const double l = std::log(1.0 + static_cast<double>(e));
    return static_cast<float>(v > 0.0f ? static_cast<double>(v) + l : l);
  });
}

void logf_array(const float* x, float* y, std::size_t n, int threads) {
  parallel_for(n, n >= (1u << 16) ? threads : 1, [&](std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) y[i] = std::log(x[i]);
  });
}

}  // namespace amct
