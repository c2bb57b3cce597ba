// Per-block loops of the streaming IFMR fill. Every float64 expression is the NumPy reference's
// (amct_caffe/quant/ifmr_stream.py) in the same order, and the core is built without FMA
// contraction, so the three paths give the same bits.
#include "amct/ifmr_fill.h"

#include <algorithm>
#include <cstring>
#include <limits>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "amct/ifmr.h"

namespace amct {
namespace ifmr_fill {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline bool not_finite(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x7f800000u) == 0x7f800000u;
}

// One entry per value, the zeros into the trash slots (j mod 8: zeros come in runs, and one slot
// would chain every addition to the previous one). No data-dependent branch: after a ReLU half of
// the values are zero and a branch on it would mispredict. `first` is x's position in its block.
std::size_t block_portable(const float* x, std::size_t m, std::size_t first, const Grid& g, std::int32_t* bin,
                           double* dev, double* lane, BlockStats* st) {
  const auto trash = static_cast<std::int32_t>(g.last_d) + 1;
  for (std::size_t j = 0; j < m; ++j) {
    const float v = x[j];
    const double keep = v != 0.0f ? 1.0 : 0.0;
    const double xd = v;
    const double z = xd * g.inv_w - g.base_d;
    double t = z > 0.0 ? z : 0.0;  // written so that a NaN goes to 0 and an inf to last (then refused)
    t = static_cast<double>(static_cast<std::int64_t>(t < g.last_d ? t : g.last_d));
    st->bad |= not_finite(v);
    const double c = t + g.base_d;
    const double d = (xd - (c + 0.5) * g.w) * keep;
    bin[j] = v != 0.0f ? static_cast<std::int32_t>(t) : trash + static_cast<std::int32_t>((first + j) & 7);
    dev[j] = d;
    lane[(first + j) & 3] += d * d;
    st->nonzero += v != 0.0f;
    st->positive += v > 0.0f;
    st->max = std::max(st->max, v != 0.0f ? v : -kInf);
    st->min = std::min(st->min, v != 0.0f ? v : kInf);
  }
  return m;
}

bool scan_portable(const float* x, std::size_t n, float* lo, float* hi) {
  bool bad = false;
  float l = kInf, h = -kInf;
  for (std::size_t j = 0; j < n; ++j) {
    const float v = x[j];
    bad |= not_finite(v);
    l = std::min(l, v == 0.0f ? kInf : v);
    h = std::max(h, v == 0.0f ? -kInf : v);
  }
  *lo = l;
  *hi = h;
  return bad;
}

void collect_portable(const float* x, std::size_t m, float bound, bool above, std::vector<float>* out) {
  for (std::size_t j = 0; j < m; ++j) {
    const float v = x[j];
    if (v != 0.0f && (above ? v > bound : v < bound)) out->push_back(v);
  }
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define AMCT_FILL_X86 1

__attribute__((target("avx2"))) bool scan_avx2(const float* x, std::size_t n, float* lo, float* hi) {
  const __m256 zero = _mm256_setzero_ps(), pinf = _mm256_set1_ps(kInf), ninf = _mm256_set1_ps(-kInf);
  const __m256i expo = _mm256_set1_epi32(0x7f800000);
  __m256i bad = _mm256_setzero_si256();
  __m256 l = pinf, h = ninf;
  std::size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), expo), expo));
    const __m256 nz = _mm256_cmp_ps(v, zero, _CMP_NEQ_OQ);
    l = _mm256_min_ps(l, _mm256_blendv_ps(pinf, v, nz));
    h = _mm256_max_ps(h, _mm256_blendv_ps(ninf, v, nz));
  }
  float tl, th;
  const bool tail_bad = scan_portable(x + j, n - j, &tl, &th);
  alignas(32) float ls[8], hs[8];
  _mm256_store_ps(ls, l);
  _mm256_store_ps(hs, h);
  for (int k = 0; k < 8; ++k) tl = std::min(tl, ls[k]), th = std::max(th, hs[k]);
  *lo = tl;
  *hi = th;
  return tail_bad || !_mm256_testz_si256(bad, bad);
}

// The candidates are rare: a mask per eight values, then its set bits.
__attribute__((target("avx2"))) void collect_avx2(const float* x, std::size_t m, float bound, bool above,
                                                    std::vector<float>* out) {
  const __m256 vb = _mm256_set1_ps(bound), zero = _mm256_setzero_ps();
  std::size_t j = 0;
  for (; j + 8 <= m; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 hit = _mm256_and_ps(above ? _mm256_cmp_ps(v, vb, _CMP_GT_OQ) : _mm256_cmp_ps(v, vb, _CMP_LT_OQ),
                                     _mm256_cmp_ps(v, zero, _CMP_NEQ_OQ));
    for (unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(hit)); bits; bits &= bits - 1) {
      out->push_back(x[j + static_cast<std::size_t>(__builtin_ctz(bits))]);
    }
  }
  collect_portable(x + j, m - j, bound, above, out);
}

// block_portable four values at a time (the same entries and lanes).
__attribute__((target("avx2"))) std::size_t block_avx2(const float* x, std::size_t m, const Grid& g,
                                                         std::int32_t* bin, double* dev, double* lane,
                                                         BlockStats* st) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0), half = _mm256_set1_pd(0.5);
  const __m256d vinv = _mm256_set1_pd(g.inv_w), vbase = _mm256_set1_pd(g.base_d), vw = _mm256_set1_pd(g.w);
  const __m256d vlast = _mm256_set1_pd(g.last_d);
  const __m256d ninf = _mm256_set1_pd(-std::numeric_limits<double>::infinity());
  const __m256d pinf = _mm256_set1_pd(std::numeric_limits<double>::infinity());
  __m256d acc = _mm256_loadu_pd(lane), vmax = ninf, vmin = pinf;
  const __m128i expo = _mm_set1_epi32(0x7f800000);
  __m128i bad = _mm_setzero_si128();
  const __m128i trash = _mm_add_epi32(_mm_set1_epi32(static_cast<int>(g.last_d) + 1), _mm_setr_epi32(0, 1, 2, 3));
  std::uint64_t nonzero = 0, positive = 0;
  std::size_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const __m128 xf = _mm_loadu_ps(x + j);
    bad = _mm_or_si128(bad, _mm_cmpeq_epi32(_mm_and_si128(_mm_castps_si128(xf), expo), expo));
    const __m256d xd = _mm256_cvtps_pd(xf);
    const __m256d nz = _mm256_cmp_pd(xd, zero, _CMP_NEQ_OQ);
    const __m256d keep = _mm256_and_pd(nz, one);
    __m256d t = _mm256_sub_pd(_mm256_mul_pd(xd, vinv), vbase);
    t = _mm256_min_pd(_mm256_max_pd(t, zero), vlast);  // max_pd(NaN, 0) is 0: a NaN stays in range
    const __m128i i = _mm256_cvttpd_epi32(t);
    const __m128i nz32 = _mm256_cvtpd_epi32(keep);  // 1 where nonzero
    const __m128i slot = _mm_add_epi32(trash, _mm_set1_epi32(static_cast<int>(j & 4)));
    const __m128i where = _mm_blendv_epi8(slot, i, _mm_cmpeq_epi32(nz32, _mm_set1_epi32(1)));
    const __m256d c = _mm256_add_pd(_mm256_cvtepi32_pd(i), vbase);
    const __m256d d = _mm256_mul_pd(_mm256_sub_pd(xd, _mm256_mul_pd(_mm256_add_pd(c, half), vw)), keep);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bin + j), where);
    _mm256_storeu_pd(dev + j, d);
    acc = _mm256_add_pd(acc, _mm256_mul_pd(d, d));
    nonzero += static_cast<unsigned>(__builtin_popcount(_mm256_movemask_pd(nz)));
    positive += static_cast<unsigned>(__builtin_popcount(_mm256_movemask_pd(_mm256_cmp_pd(xd, zero, _CMP_GT_OQ))));
    vmax = _mm256_max_pd(vmax, _mm256_blendv_pd(ninf, xd, nz));
    vmin = _mm256_min_pd(vmin, _mm256_blendv_pd(pinf, xd, nz));
  }
  _mm256_storeu_pd(lane, acc);
  alignas(32) double mx[4], mn[4];
  _mm256_store_pd(mx, vmax);
  _mm256_store_pd(mn, vmin);
  block_portable(x + j, m - j, j, g, bin + j, dev + j, lane, st);
  st->bad |= !_mm_testz_si128(bad, bad);
  st->nonzero += nonzero;
  st->positive += positive;
  for (int l = 0; l < 4; ++l) {
    st->max = std::max(st->max, static_cast<float>(mx[l]));
    st->min = std::min(st->min, static_cast<float>(mn[l]));
  }
  return m;
}

// Eight values at a time, and only the nonzero ones get an entry (compressed out of the vectors):
// the scatter then skips the zeros. The squares of the zeros' +0 deviations add nothing to the
// lanes, and the lanes take positions j..j+3 then j+4..j+7, so they get the bits of the paths above.
__attribute__((target("avx512f,avx2"))) std::size_t block_avx512(const float* x, std::size_t m, const Grid& g,
                                                                  std::int32_t* bin, double* dev, double* lane,
                                                                  BlockStats* st) {
  const __m512d zero = _mm512_setzero_pd(), half = _mm512_set1_pd(0.5);
  const __m512d vinv = _mm512_set1_pd(g.inv_w), vbase = _mm512_set1_pd(g.base_d), vw = _mm512_set1_pd(g.w);
  const __m512d vlast = _mm512_set1_pd(g.last_d);
  __m512d vmax = _mm512_set1_pd(-std::numeric_limits<double>::infinity());
  __m512d vmin = _mm512_set1_pd(std::numeric_limits<double>::infinity());
  __m256d acc = _mm256_loadu_pd(lane);
  const __m256i expo = _mm256_set1_epi32(0x7f800000);
  __m256i bad = _mm256_setzero_si256();
  std::uint64_t nonzero = 0, positive = 0;
  std::size_t n = 0;
  alignas(32) float tail[8];
  for (std::size_t j = 0; j < m; j += 8) {
    const float* src = x + j;
    if (j + 8 > m) {  // the last values, padded with zeros (which get no entry)
      std::memset(tail, 0, sizeof tail);
      std::memcpy(tail, x + j, (m - j) * sizeof(float));
      src = tail;
    }
    _mm_prefetch(reinterpret_cast<const char*>(x + j) + 1024, _MM_HINT_T0);
    const __m256 xf = _mm256_loadu_ps(src);
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(xf), expo), expo));
    const __m512d xd = _mm512_cvtps_pd(xf);
    const __mmask8 nz = _mm512_cmp_pd_mask(xd, zero, _CMP_NEQ_OQ);
    const __mmask8 pos = _mm512_cmp_pd_mask(xd, zero, _CMP_GT_OQ);
    __m512d t = _mm512_sub_pd(_mm512_mul_pd(xd, vinv), vbase);
    t = _mm512_min_pd(_mm512_max_pd(t, zero), vlast);  // max_pd(NaN, 0) is 0: a NaN stays in range
    const __m256i i = _mm512_cvttpd_epi32(t);
    const __m512d c = _mm512_add_pd(_mm512_cvtepi32_pd(i), vbase);
    const __m512d d = _mm512_maskz_sub_pd(nz, xd, _mm512_mul_pd(_mm512_add_pd(c, half), vw));
    _mm512_storeu_pd(dev + n, _mm512_maskz_compress_pd(nz, d));
    const __m512i packed = _mm512_maskz_compress_epi32(nz, _mm512_castsi256_si512(i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bin + n), _mm512_castsi512_si256(packed));
    n += static_cast<unsigned>(__builtin_popcount(nz));
    const __m512d sq = _mm512_mul_pd(d, d);
    acc = _mm256_add_pd(acc, _mm512_castpd512_pd256(sq));
    acc = _mm256_add_pd(acc, _mm512_extractf64x4_pd(sq, 1));
    nonzero += static_cast<unsigned>(__builtin_popcount(nz));
    positive += static_cast<unsigned>(__builtin_popcount(pos));
    vmax = _mm512_mask_max_pd(vmax, nz, vmax, xd);
    vmin = _mm512_mask_min_pd(vmin, nz, vmin, xd);
  }
  _mm256_storeu_pd(lane, acc);
  st->bad |= !_mm256_testz_si256(bad, bad);
  st->nonzero += nonzero;
  st->positive += positive;
  st->max = std::max(st->max, static_cast<float>(_mm512_reduce_max_pd(vmax)));
  st->min = std::min(st->min, static_cast<float>(_mm512_reduce_min_pd(vmin)));
  return n;
}
#endif

}  // namespace

std::size_t block(const float* x, std::size_t m, const Grid& g, std::int32_t* bin, double* dev, double* lane,
                  BlockStats* st) {
#ifdef AMCT_FILL_X86
  const int level = ifmr_simd_level();
  if (level >= 2) return block_avx512(x, m, g, bin, dev, lane, st);
  if (level >= 1) return block_avx2(x, m, g, bin, dev, lane, st);
#endif
  return block_portable(x, m, 0, g, bin, dev, lane, st);
}

bool scan(const float* x, std::size_t n, float* lo, float* hi) {
#ifdef AMCT_FILL_X86
  if (ifmr_simd_level() >= 1) return scan_avx2(x, n, lo, hi);
#endif
  return scan_portable(x, n, lo, hi);
}

void collect(const float* x, std::size_t m, float bound, bool above, std::vector<float>* out) {
#ifdef AMCT_FILL_X86
  if (ifmr_simd_level() >= 1) return collect_avx2(x, m, bound, above, out);
#endif
  collect_portable(x, m, bound, above, out);
}

}  // namespace ifmr_fill
}  // namespace amct
