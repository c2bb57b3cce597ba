// IFMR search. The hot loop evaluates every candidate clip on a block of data that sits in L1:
// per block the clamped-below values, the targets and the rounding half-offsets are prepared
// once, then each candidate costs min, mul, add, trunc, mul, sub and a float64 square-add per
// value. The x86 path uses AVX2 (picked at run time); the portable path gives the same per-value
// errors, only the float64 summation order differs (which the tie tolerance absorbs).
#include "amct/ifmr.h"
#include "amct/cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

#include "amct/common.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define AMCT_IFMR_AVX2 1
#include <immintrin.h>
#endif

namespace amct {
namespace {

constexpr std::size_t kBlock = 1024;    // values per block: 3 float arrays = 12 KiB of L1
constexpr std::size_t kHeapMaxK = 4096;  // above this, select with nth_element on a copy
constexpr double kTieRtol = 1e-10;

const char* error_name(bool with_offset) {
  return with_offset ? "IfmrQuantWithOffset" : "IfmrQuantWithoutOffset";
}

struct Candidate {
  float clip, scale, inv;
};

// sum over j of f64(round(min(xl[j], clip) * inv) * scale - tgt[j])^2, halves away from zero.
// `half` is copysign(kHalfBelow, xl[j]) or nullptr when every xl[j] >= 0.
double block_loss_portable(const float* xl, const float* tgt, const float* half, std::size_t n,
                           const Candidate& c) {
  double sum = 0.0;
  for (std::size_t j = 0; j < n; ++j) {
    float t = no_fuse(std::min(xl[j], c.clip) * c.inv);
    float r = std::trunc(t + (half ? half[j] : kHalfBelow));
    float q = no_fuse(r * c.scale);
    float d = q - tgt[j];
    sum += static_cast<double>(d) * static_cast<double>(d);
  }
  return sum;
}

#ifdef AMCT_IFMR_AVX2
__attribute__((target("avx2,fma"))) inline double hsum(__m256d v) {
  __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
  lo = _mm_add_pd(lo, hi);
  return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

template <bool kSigned>
__attribute__((target("avx2,fma"))) double block_loss_avx2(const float* xl, const float* tgt,
                                                             const float* half, std::size_t n,
                                                             const Candidate& c) {
  const __m256 vclip = _mm256_set1_ps(c.clip), vinv = _mm256_set1_ps(c.inv);
  const __m256 vscale = _mm256_set1_ps(c.scale), vhalf = _mm256_set1_ps(kHalfBelow);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256 t0 = _mm256_mul_ps(_mm256_min_ps(_mm256_loadu_ps(xl + j), vclip), vinv);
    __m256 t1 = _mm256_mul_ps(_mm256_min_ps(_mm256_loadu_ps(xl + j + 8), vclip), vinv);
    __asm__("" : "+x"(t0), "+x"(t1));  // likewise keep t rounded before adding the half
    __m256 h0 = kSigned ? _mm256_loadu_ps(half + j) : vhalf;
    __m256 h1 = kSigned ? _mm256_loadu_ps(half + j + 8) : vhalf;
    __m256 r0 = _mm256_round_ps(_mm256_add_ps(t0, h0), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 r1 = _mm256_round_ps(_mm256_add_ps(t1, h1), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 q0 = _mm256_mul_ps(r0, vscale), q1 = _mm256_mul_ps(r1, vscale);
    // Keep r*scale rounded to float32 before the subtraction: a fused multiply-subtract would
    // differ from the reference in the last bit.
    __asm__("" : "+x"(q0), "+x"(q1));
    __m256 d0 = _mm256_sub_ps(q0, _mm256_loadu_ps(tgt + j));
    __m256 d1 = _mm256_sub_ps(q1, _mm256_loadu_ps(tgt + j + 8));
    __m256d e0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d0));
    __m256d e1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d0, 1));
    __m256d e2 = _mm256_cvtps_pd(_mm256_castps256_ps128(d1));
    __m256d e3 = _mm256_cvtps_pd(_mm256_extractf128_ps(d1, 1));
    // e*e is exact in float64 (24-bit significands), so fusing the add changes nothing.
    a0 = _mm256_fmadd_pd(e0, e0, a0);
    a1 = _mm256_fmadd_pd(e1, e1, a1);
    a2 = _mm256_fmadd_pd(e2, e2, a2);
    a3 = _mm256_fmadd_pd(e3, e3, a3);
  }
  double tail = block_loss_portable(xl + j, tgt + j, kSigned ? half + j : nullptr, n - j, c);
  return hsum(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3))) + tail;
}

__attribute__((target("avx512f"))) inline __m512d sq_acc(__m256 d, __m512d acc) {
  __m512d e = _mm512_cvtps_pd(d);
  return _mm512_fmadd_pd(e, e, acc);
}

template <bool kSigned>
__attribute__((target("avx512f"))) double block_loss_avx512(const float* xl, const float* tgt,
                                                             const float* half, std::size_t n,
                                                             const Candidate& c) {
  const __m512 vclip = _mm512_set1_ps(c.clip), vinv = _mm512_set1_ps(c.inv);
  const __m512 vscale = _mm512_set1_ps(c.scale), vhalf = _mm512_set1_ps(kHalfBelow);
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512 t0 = _mm512_mul_ps(_mm512_min_ps(_mm512_loadu_ps(xl + j), vclip), vinv);
    __m512 t1 = _mm512_mul_ps(_mm512_min_ps(_mm512_loadu_ps(xl + j + 16), vclip), vinv);
    __asm__("" : "+v"(t0), "+v"(t1));  // see the AVX2 loop
    __m512 h0 = kSigned ? _mm512_loadu_ps(half + j) : vhalf;
    __m512 h1 = kSigned ? _mm512_loadu_ps(half + j + 16) : vhalf;
    __m512 r0 = _mm512_roundscale_ps(_mm512_add_ps(t0, h0), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 r1 = _mm512_roundscale_ps(_mm512_add_ps(t1, h1), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 q0 = _mm512_mul_ps(r0, vscale), q1 = _mm512_mul_ps(r1, vscale);
    __asm__("" : "+v"(q0), "+v"(q1));  // no fused multiply-subtract (see the AVX2 loop)
    __m512 d0 = _mm512_sub_ps(q0, _mm512_loadu_ps(tgt + j));
    __m512 d1 = _mm512_sub_ps(q1, _mm512_loadu_ps(tgt + j + 16));
    a0 = sq_acc(_mm512_castps512_ps256(d0), a0);
    a1 = sq_acc(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d0), 1)), a1);
    a2 = sq_acc(_mm512_castps512_ps256(d1), a2);
    a3 = sq_acc(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d1), 1)), a3);
  }
  double tail = block_loss_portable(xl + j, tgt + j, kSigned ? half + j : nullptr, n - j, c);
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3))) + tail;
}

#endif

double block_loss(const float* xl, const float* tgt, const float* half, std::size_t n,
                  const Candidate& c) {
#ifdef AMCT_IFMR_AVX2
  if (cpu_has_avx512f()) {
    return half ? block_loss_avx512<true>(xl, tgt, half, n, c)
                : block_loss_avx512<false>(xl, tgt, half, n, c);
  }
  if (cpu_has_avx2()) {
    return half ? block_loss_avx2<true>(xl, tgt, half, n, c)
                : block_loss_avx2<false>(xl, tgt, half, n, c);
  }
#endif
  return block_loss_portable(xl, tgt, half, n, c);
}

bool all_finite(const float* x, std::size_t n) {
  std::uint32_t flag = 0;  // integer OR-reduction: vectorizes without fast-math
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    flag |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return flag == 0;
}

template <class Better>
float kth_best(const std::vector<FloatSpan>& chunks, std::size_t k, Better better) {
  std::size_t total = 0;
  for (const auto& c : chunks) total += c.size;
  if (k == 0 || k > total) fail("kth selection: k must be in [1, " + std::to_string(total) + "]");
  if (k <= kHeapMaxK) {
    // heap.front() is the worst of the k best so far; most values fail one comparison with it.
    std::vector<float> heap;
    heap.reserve(k);
    for (const auto& c : chunks) {
      for (std::size_t i = 0; i < c.size; ++i) {
        const float v = c.data[i];
        if (heap.size() < k) {
          heap.push_back(v);
          std::push_heap(heap.begin(), heap.end(), better);
        } else if (better(v, heap.front())) {
          std::pop_heap(heap.begin(), heap.end(), better);
          heap.back() = v;
          std::push_heap(heap.begin(), heap.end(), better);
        }
      }
    }
    return heap.front();
  }
  std::vector<float> all;
  all.reserve(total);
  for (const auto& c : chunks) all.insert(all.end(), c.data, c.data + c.size);
  std::nth_element(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(k - 1), all.end(), better);
  return all[k - 1];
}

std::size_t select_count(double percentile, std::size_t n) {
  if (std::fabs(percentile - 1.0) < DBL_EPSILON) return 1;
  const double kept = std::floor(percentile * static_cast<double>(n));
  double k = static_cast<double>(n) - kept;
  k = std::min(std::max(k, 1.0), static_cast<double>(n));
  return static_cast<std::size_t>(k);
}

}  // namespace

int ifmr_simd_level() {
#ifdef AMCT_IFMR_AVX2
  return simd_level();
#else
  return 0;
#endif
}

std::vector<double> ifmr_ratios(double start, double end, double step) {
  if (!(step > 0.0) || !(end > start)) fail("IFMR search range: need start < end and step > 0");
  const auto n = static_cast<std::size_t>(std::floor((end - start) / step + 1e-6)) + 1;
  std::vector<double> ratios(n);
  for (std::size_t i = 0; i < n; ++i) ratios[i] = start + static_cast<double>(i) * step;
  return ratios;
}

float kth_largest(const std::vector<FloatSpan>& chunks, std::size_t k) {
  return kth_best(chunks, k, std::greater<float>());
}

void check_ifmr_config(const IfmrConfig& config, std::size_t n_ratios) {
  check_num_bits(config.num_bits, 8, 16, "IFMR activation_quant_params");
  if (!(config.max_percentile > 0.5 && config.max_percentile <= 1.0) ||
      !(config.min_percentile > 0.5 && config.min_percentile <= 1.0)) {
    fail("IFMR max_percentile and min_percentile must be in (0.5, 1]");
  }
  if (n_ratios == 0) fail("IFMR: no search candidates");
}

IfmrResult ifmr_search(const std::vector<FloatSpan>& chunks, const IfmrConfig& config,
                       const std::vector<double>& ratios, std::size_t zeros, int threads) {
  check_ifmr_config(config, ratios.size());
  const char* what = error_name(config.with_offset);
  std::size_t n = 0;
  for (const auto& c : chunks) {
    if (c.size && !c.data) fail(std::string(what) + ": null data pointer");
    if (!all_finite(c.data, c.size)) {
      fail(std::string(what) + " scale is illegal: input data contains inf or NaN");
    }
    n += c.size;
  }
  const std::size_t stored = n;
  n += zeros;
  if (n == 0) fail(std::string(what) + ": no calibration data");

  // Step 1: percentile start points, forced to include zero. Beyond the stored values the k-th
  // largest (smallest) is a dropped zero or lies past them on zero's other side: either way the
  // clamp to zero gives 0.
  const std::size_t k_max = select_count(config.max_percentile, n);
  const std::size_t k_min = select_count(config.min_percentile, n);
  const float max0 = k_max > stored ? 0.0f : std::max(kth_best(chunks, k_max, std::greater<float>()), 0.0f);
  const float min0 = k_min > stored ? 0.0f : std::min(kth_best(chunks, k_min, std::less<float>()), 0.0f);

  // Step 3: candidate clips and scales.
  const int b = config.num_bits;
  const std::size_t K = ratios.size();
  std::vector<Candidate> cand(K);
  float abs_side = max0;
  double limit = std::ldexp(1.0, b) - 1.0;
  if (!config.with_offset) {
    abs_side = std::fabs(max0) > std::fabs(min0) ? max0 : min0;
    limit = abs_side > 0.0f ? std::ldexp(1.0, b - 1) - 1.0 : std::ldexp(1.0, b - 1);
  }
  for (std::size_t i = 0; i < K; ++i) {
    Candidate& c = cand[i];
    if (config.with_offset) {
      c.clip = static_cast<float>(ratios[i] * static_cast<double>(max0));
      c.scale = static_cast<float>((static_cast<double>(c.clip) - static_cast<double>(min0)) / limit);
    } else {
      c.clip = static_cast<float>(ratios[i] * std::fabs(static_cast<double>(abs_side)));
      c.scale = static_cast<float>(static_cast<double>(c.clip) / limit);
    }
    c.scale = process_scale(c.scale, what, i);
    c.inv = 1.0f / c.scale;
  }

  // Step 4: one pass over the data, every candidate per L1-resident block. Workers take disjoint
  // ranges of candidates, each summing its candidates over the blocks in the same order: the sums do
  // not depend on `threads`.
  std::vector<double> sums(K, 0.0);
  auto work = [&](std::size_t first, std::size_t last) {
    std::vector<float> xl(kBlock), tgt(kBlock), half(kBlock);
    for (const auto& chunk : chunks) {
      for (std::size_t start = 0; start < chunk.size; start += kBlock) {
        const std::size_t m = std::min(kBlock, chunk.size - start);
        const float* x = chunk.data + start;
        if (config.with_offset) {
          for (std::size_t j = 0; j < m; ++j) {
            xl[j] = std::max(x[j], min0);
            tgt[j] = x[j];
            half[j] = std::copysign(kHalfBelow, xl[j]);
          }
        } else {  // symmetric: work on |x|, the error of -x mirrors that of x exactly
          for (std::size_t j = 0; j < m; ++j) xl[j] = tgt[j] = std::fabs(x[j]);
        }
        const float* h = config.with_offset ? half.data() : nullptr;
        for (std::size_t i = first; i < last; ++i) sums[i] += block_loss(xl.data(), tgt.data(), h, m, cand[i]);
      }
    }
  };
  const std::size_t workers = std::min<std::size_t>(static_cast<std::size_t>(std::max(threads, 1)), K);
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(work, K * t / workers, K * (t + 1) / workers);
  work(0, K / workers);
  for (auto& th : pool) th.join();

  // Step 5: first minimum, with a relative tie tolerance for summation-order noise.
  const double best_sum = *std::min_element(sums.begin(), sums.end());
  std::size_t best = 0;
  while (sums[best] > best_sum * (1.0 + kTieRtol)) ++best;

  IfmrResult result;
  result.best_index = static_cast<int>(best);
  result.scale = cand[best].scale;
  result.clip_max = cand[best].clip;
  if (config.with_offset) {
    const float qmin = static_cast<float>(qmin_of(b)), qmax = static_cast<float>(qmax_of(b));
    float off = -std::round(min0 / result.scale) + qmin;
    off = std::min(std::max(off, qmin), qmax);
    result.offset = static_cast<int>(off);
    result.clip_min = min0;
  } else {
    result.offset = 0;
    result.clip_min = -cand[best].clip;
  }
  result.losses.resize(K);
  for (std::size_t i = 0; i < K; ++i) result.losses[i] = sums[i] / static_cast<double>(n);
  return result;
}

}  // namespace amct
