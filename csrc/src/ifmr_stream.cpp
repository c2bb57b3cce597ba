// Streaming IFMR histogram. Every float64 expression is written in the order of the NumPy
// reference (amct_caffe/quant/ifmr_stream.py) and the core is built without FMA contraction, so
// the histogram (count, dev, m2), the kept extremes and kth() are bit for bit the reference's;
// losses() sums the bins sequentially where NumPy sums pairwise (a rounding-noise difference).
#include "amct/ifmr_stream.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <thread>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "amct/common.h"
#include "amct/ifmr.h"

namespace amct {
namespace {

constexpr int kMinExp = -200;

std::int64_t grid_index(double v, int e) { return static_cast<std::int64_t>(std::floor(std::ldexp(v, -e))); }

// floor(t) for |t| < 2^62 without a libm call (the core is built for the baseline ISA, where
// std::floor is one): truncate, then step down where that rounded up (negative non-integers).
inline double floor_small(double t) {
  const auto i = static_cast<std::int64_t>(t);
  const auto r = static_cast<double>(i);
  return r > t ? r - 1.0 : r;
}

// trunc(t) for |t| < 2^62, likewise.
inline double trunc_small(double t) { return static_cast<double>(static_cast<std::int64_t>(t)); }

double level(double x, double lo, double hi, double inv) {
  const double t = std::min(std::max(x, lo), hi) * inv;  // |t| <= 2^(num_bits) + 1
  const double r = trunc_small(t);
  return std::fabs(t - r) >= 0.5 ? r + (t > 0 ? 1.0 : (t < 0 ? -1.0 : 0.0)) : r + 0.0;
}

constexpr std::size_t kFill = 512;  // values per block of the fill (a multiple of 4)

struct BlockStats {
  std::uint32_t bad = 0;  // an inf or NaN seen
  std::uint64_t nonzero = 0, positive = 0;
  float max = -std::numeric_limits<float>::infinity(), min = std::numeric_limits<float>::infinity();
};

// For x[j], j < m: bin[j] = floor(x / w) - base clamped into [0, last] (exact: a power-of-two
// scaling, then an integer below 2^53 subtracted; >= 0 inside the window, where truncation is
// floor), dv[j] = x - centre; a zero adds 0 to one of 8 spare slots after the bins (j mod 8:
// zeros come in runs, and one slot would chain every addition to the previous one), and
// lane[(first + j) % 4] += dv[j]^2 in order of j. No data-dependent branch: after a ReLU half of
// the values are zero and a branch on it would mispredict.
void fill_block(const float* x, std::size_t m, std::size_t first, double inv_w, double base_d, double w,
                double last_d, std::int32_t* bin, double* kp, double* dv, double* lane, BlockStats* st) {
  const auto trash = static_cast<std::int32_t>(last_d) + 1;
  for (std::size_t j = 0; j < m; ++j) {
    const float v = x[j];
    const double keep = v != 0.0f ? 1.0 : 0.0;
    const double xd = v;
    const double z = xd * inv_w - base_d;
    double t = z > 0.0 ? z : 0.0;  // written so that a NaN goes to 0 and an inf to last (then refused)
    t = std::trunc(t < last_d ? t : last_d);
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    st->bad |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
    const double g = t + base_d;
    const double d = (xd - (g + 0.5) * w) * keep;
    bin[j] = v != 0.0f ? static_cast<std::int32_t>(t) : trash + static_cast<std::int32_t>((first + j) & 7);
    kp[j] = keep;
    dv[j] = d;
    lane[(first + j) & 3] += d * d;
    st->nonzero += v != 0.0f;
    st->positive += v > 0.0f;
    st->max = std::max(st->max, v != 0.0f ? v : -std::numeric_limits<float>::infinity());
    st->min = std::min(st->min, v != 0.0f ? v : std::numeric_limits<float>::infinity());
  }
}

// Whether x[0..n) holds an inf or NaN (integer test of the exponent: vectorizes), and the range
// [lo, hi] of its nonzero values (lo > hi when there is none). min and max do not depend on order.
bool scan(const float* x, std::size_t n, float* lo, float* hi) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::uint32_t bad = 0;
  float l = kInf, h = -kInf;
  for (std::size_t j = 0; j < n; ++j) {
    const float v = x[j];
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    bad |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
    l = std::min(l, v == 0.0f ? kInf : v);
    h = std::max(h, v == 0.0f ? -kInf : v);
  }
  *lo = l;
  *hi = h;
  return bad != 0;
}

// Appends the nonzero x[j] above (`above`) or below `bound` to `out`.
void collect(const float* x, std::size_t m, float bound, bool above, std::vector<float>* out) {
  for (std::size_t j = 0; j < m; ++j) {
    const float v = x[j];
    if (v != 0.0f && (above ? v > bound : v < bound)) out->push_back(v);
  }
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define AMCT_STREAM_AVX2 1

// The vector paths follow the IFMR search's level (amct::ifmr_simd_level: AVX2 or better, capped by
// set_ifmr_simd_limit, which tests lower to compare the paths).
bool use_avx2() { return ifmr_simd_level() >= 1; }

// scan eight values at a time.
__attribute__((target("avx2"))) bool scan_avx2(const float* x, std::size_t n, float* lo, float* hi) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
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
  bool tail_bad = scan(x + j, n - j, &tl, &th);
  alignas(32) float ls[8], hs[8];
  _mm256_store_ps(ls, l);
  _mm256_store_ps(hs, h);
  for (int k = 0; k < 8; ++k) tl = std::min(tl, ls[k]), th = std::max(th, hs[k]);
  *lo = tl;
  *hi = th;
  return tail_bad || !_mm256_testz_si256(bad, bad);
}

// collect, eight values per comparison (the candidates are rare: a mask, then its set bits).
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
  collect(x + j, m - j, bound, above, out);
}

// fill_block four values at a time (the same IEEE operations in the same order: the same bits).
__attribute__((target("avx2"))) void fill_block_avx2(const float* x, std::size_t m, double inv_w, double base_d,
                                                       double w, double last_d, std::int32_t* bin, double* kp,
                                                       double* dv, double* lane, BlockStats* st) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0), half = _mm256_set1_pd(0.5);
  const __m256d vinv = _mm256_set1_pd(inv_w), vbase = _mm256_set1_pd(base_d), vw = _mm256_set1_pd(w);
  const __m256d vlast = _mm256_set1_pd(last_d);
  const __m256d ninf = _mm256_set1_pd(-std::numeric_limits<double>::infinity());
  const __m256d pinf = _mm256_set1_pd(std::numeric_limits<double>::infinity());
  __m256d acc = _mm256_loadu_pd(lane), vmax = ninf, vmin = pinf;
  const __m128i expo = _mm_set1_epi32(0x7f800000);
  __m128i bad = _mm_setzero_si128();
  const __m128i trash = _mm_add_epi32(_mm_set1_epi32(static_cast<int>(last_d) + 1), _mm_setr_epi32(0, 1, 2, 3));
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
    const __m128i nz32 = _mm256_cvtpd_epi32(_mm256_and_pd(nz, one));  // 1 where nonzero
    const __m128i slot = _mm_add_epi32(trash, _mm_set1_epi32(static_cast<int>(j & 4)));
    const __m128i where = _mm_blendv_epi8(slot, i, _mm_cmpeq_epi32(nz32, _mm_set1_epi32(1)));
    const __m256d g = _mm256_add_pd(_mm256_cvtepi32_pd(i), vbase);
    const __m256d d = _mm256_mul_pd(_mm256_sub_pd(xd, _mm256_mul_pd(_mm256_add_pd(g, half), vw)), keep);
    _mm_store_si128(reinterpret_cast<__m128i*>(bin + j), where);
    _mm256_store_pd(kp + j, keep);
    _mm256_store_pd(dv + j, d);
    acc = _mm256_add_pd(acc, _mm256_mul_pd(d, d));
    st->nonzero += static_cast<unsigned>(__builtin_popcount(_mm256_movemask_pd(nz)));
    st->positive += static_cast<unsigned>(__builtin_popcount(_mm256_movemask_pd(_mm256_cmp_pd(xd, zero, _CMP_GT_OQ))));
    vmax = _mm256_max_pd(vmax, _mm256_blendv_pd(ninf, xd, nz));
    vmin = _mm256_min_pd(vmin, _mm256_blendv_pd(pinf, xd, nz));
  }
  _mm256_storeu_pd(lane, acc);
  alignas(32) double mx[4], mn[4];
  _mm256_store_pd(mx, vmax);
  _mm256_store_pd(mn, vmin);
  BlockStats tail;
  fill_block(x + j, m - j, j, inv_w, base_d, w, last_d, bin + j, kp + j, dv + j, lane, &tail);
  st->bad = tail.bad | static_cast<std::uint32_t>(!_mm_testz_si128(bad, bad));
  st->nonzero += tail.nonzero;
  st->positive += tail.positive;
  st->max = tail.max;
  st->min = tail.min;
  for (int l = 0; l < 4; ++l) {
    st->max = std::max(st->max, static_cast<float>(mx[l]));
    st->min = std::min(st->min, static_cast<float>(mn[l]));
  }
}
#endif

// The vector path where the CPU has it (and set_ifmr_simd_limit allows it), else the portable one.
bool scan_any(const float* x, std::size_t n, float* lo, float* hi) {
#ifdef AMCT_STREAM_AVX2
  if (use_avx2()) return scan_avx2(x, n, lo, hi);
#endif
  return scan(x, n, lo, hi);
}

void fill_any(const float* x, std::size_t m, double inv_w, double base_d, double w, double last_d,
              std::int32_t* bin, double* kp, double* dv, double* lane, BlockStats* st) {
#ifdef AMCT_STREAM_AVX2
  if (use_avx2()) return fill_block_avx2(x, m, inv_w, base_d, w, last_d, bin, kp, dv, lane, st);
#endif
  fill_block(x, m, 0, inv_w, base_d, w, last_d, bin, kp, dv, lane, st);
}

void collect_any(const float* x, std::size_t m, float bound, bool above, std::vector<float>* out) {
#ifdef AMCT_STREAM_AVX2
  if (use_avx2()) return collect_avx2(x, m, bound, above, out);
#endif
  collect(x, m, bound, above, out);
}

// Keeps the k best of `kept` + `pending` (best first) in `kept`; `better` orders best first.
template <class Better>
void keep_best(std::vector<float>* kept, std::vector<float>* pending, std::size_t k, Better better) {
  pending->insert(pending->end(), kept->begin(), kept->end());
  if (pending->size() > k) {
    std::nth_element(pending->begin(), pending->begin() + static_cast<std::ptrdiff_t>(k - 1), pending->end(), better);
    pending->resize(k);
  }
  std::sort(pending->begin(), pending->end(), better);
  kept->swap(*pending);
  pending->clear();
}

}  // namespace

IfmrHistogram::IfmrHistogram(std::size_t bins, std::size_t top_k)
    : top_k_(top_k), count_(bins, 0.0), dev_(bins, 0.0) {
  if (bins < 4 || (bins & (bins - 1)) != 0) {
    fail("IfmrHistogram: bins must be a power of two >= 4, got " + std::to_string(bins));
  }
  if (top_k < 1) fail("IfmrHistogram: top_k must be >= 1");
}

void IfmrHistogram::update(const float* x, std::size_t n, const char* what) {
  const std::string illegal = std::string(what) + " scale is illegal: input data contains inf or NaN";
  if (!has_grid_) {  // the first data: its range sets the grid
    float lo, hi;
    if (scan_any(x, n, &lo, &hi)) fail(illegal);
    if (!(lo <= hi)) return;  // all zeros
    cover(lo, hi);
  }
  // One pass on the present grid; where the batch turns out to reach past it, the pass (which
  // only wrote this update's scratch) is dropped and made again on the grid that covers it.
  Pass pass;
  while (!fill(x, n, &pass)) {
    if (pass.bad) fail(illegal);
    cover(pass.lo, pass.hi);
  }
  if (!pass.nonzero) return;
  const std::vector<double>& batch = *pass.batch;
  for (std::size_t i = 0; i < count_.size(); ++i) {
    count_[i] += batch[2 * i];
    dev_[i] += batch[2 * i + 1];
  }
  m2_ += (pass.lane[0] + pass.lane[1]) + (pass.lane[2] + pass.lane[3]);
  nonzero_ += pass.nonzero;
  positive_ += pass.positive;
  keep_best(&top_, &pass.top, top_k_, std::greater<float>());
  keep_best(&bottom_, &pass.bottom, top_k_, std::less<float>());
}

// This update's (count, dev) per bin, interleaved (one cache line per value), and 8 slots for zeros:
// scratch of the calling thread, shared by every histogram it fills (one at a time), so that the
// many layers of a calibration model do not each hold one.
std::vector<double>& IfmrHistogram::scratch() const {
  thread_local std::vector<double> batch;
  batch.assign(2 * (count_.size() + 8), 0.0);
  return batch;
}

bool IfmrHistogram::fill(const float* x, std::size_t n, Pass* pass) {
  *pass = Pass();
  std::vector<double>& batch = scratch();
  const double w = std::ldexp(1.0, exp_), inv_w = std::ldexp(1.0, -exp_);
  const std::size_t k = top_k_;
  // Candidates are values that may enter the kept extremes; when they pile up, only the k best of
  // them are kept (no value below those k can be among the k best of the kept and them) and the
  // threshold rises to theirs.
  float top_floor = top_.size() == k ? top_.back() : -std::numeric_limits<float>::infinity();
  float bottom_ceil = bottom_.size() == k ? bottom_.back() : std::numeric_limits<float>::infinity();
  std::vector<float> scratch;
  // Per block of kFill values: (a) bins, deviations, squares, counts, range and the finite check,
  // branch-free and vectorized where the CPU allows; (b) the scatter into the bins; (c) the
  // extremes, only for a block that may hold one.
  const double base_d = static_cast<double>(base_);
  const double last_d = static_cast<double>(count_.size() - 1);
  alignas(32) std::int32_t bin[kFill];
  alignas(32) double kp[kFill], dv[kFill];
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  std::uint32_t bad = 0;
  for (std::size_t start = 0; start < n; start += kFill) {
    const std::size_t m = std::min(kFill, n - start);
    const float* xb = x + start;
    BlockStats st;
    fill_any(xb, m, inv_w, base_d, w, last_d, bin, kp, dv, pass->lane, &st);
    bad |= st.bad;
    lo = std::min(lo, st.min);
    hi = std::max(hi, st.max);
    pass->nonzero += st.nonzero;
    pass->positive += st.positive;
    for (std::size_t j = 0; j < m; ++j) {
      const auto idx = static_cast<std::size_t>(bin[j]);
      batch[2 * idx] += kp[j];
      batch[2 * idx + 1] += dv[j];
    }
    if (st.max > top_floor) {  // candidates for the kept extremes (a stale threshold only adds some)
      collect_any(xb, m, top_floor, true, &pass->top);
      if (pass->top.size() >= 4 * k) {
        scratch.clear();
        keep_best(&scratch, &pass->top, k, std::greater<float>());
        pass->top.swap(scratch);
        top_floor = std::max(top_floor, pass->top.back());
      }
    }
    if (st.min < bottom_ceil) {
      collect_any(xb, m, bottom_ceil, false, &pass->bottom);
      if (pass->bottom.size() >= 4 * k) {
        scratch.clear();
        keep_best(&scratch, &pass->bottom, k, std::less<float>());
        pass->bottom.swap(scratch);
        bottom_ceil = std::min(bottom_ceil, pass->bottom.back());
      }
    }
  }
  pass->batch = &batch;
  pass->bad = bad != 0;
  pass->lo = lo;
  pass->hi = hi;
  if (pass->bad) return false;
  if (!pass->nonzero) return true;
  const auto bins = static_cast<std::int64_t>(count_.size());
  return grid_index(lo, exp_) >= base_ && grid_index(hi, exp_) < base_ + bins;
}

void IfmrHistogram::cover(double lo, double hi) {
  const auto bins = static_cast<std::int64_t>(count_.size());
  const std::int64_t half = bins / 2;
  if (!has_grid_) {
    int e;
    if (hi == lo) {
      std::frexp(std::fabs(hi), &e);
      e = std::max(kMinExp, e - 21);
    } else {
      std::frexp((hi - lo) / static_cast<double>(half - 1), &e);
      e = std::max(kMinExp, e - 1);
    }
    while (grid_index(hi, e) - grid_index(lo, e) >= half) ++e;
    const std::int64_t g0 = grid_index(lo, e), g1 = grid_index(hi, e);
    exp_ = e;
    base_ = g0 - (bins - (g1 - g0 + 1)) / 2;
    has_grid_ = true;
    return;
  }
  while (true) {
    std::int64_t g0 = grid_index(lo, exp_), g1 = grid_index(hi, exp_);
    std::int64_t first = -1, last = -1;
    for (std::int64_t i = 0; i < bins; ++i) {
      if (count_[static_cast<std::size_t>(i)] != 0.0) {
        if (first < 0) first = i;
        last = i;
      }
    }
    if (first >= 0) {
      g0 = std::min(g0, base_ + first);
      g1 = std::max(g1, base_ + last);
    }
    if (g0 >= base_ && g1 < base_ + bins) return;
    if (g1 - g0 < bins) {
      shift(g0 - (bins - (g1 - g0 + 1)) / 2);
      return;
    }
    merge();
  }
}

void IfmrHistogram::shift(std::int64_t base) {
  const auto bins = static_cast<std::int64_t>(count_.size());
  const std::int64_t delta = base - base_;
  std::vector<double> count(count_.size(), 0.0), dev(dev_.size(), 0.0);
  for (std::int64_t i = 0; i < bins; ++i) {
    const std::int64_t src = i + delta;
    if (src >= 0 && src < bins) {
      count[static_cast<std::size_t>(i)] = count_[static_cast<std::size_t>(src)];
      dev[static_cast<std::size_t>(i)] = dev_[static_cast<std::size_t>(src)];
    }
  }
  count_.swap(count);
  dev_.swap(dev);
  base_ = base;
}

void IfmrHistogram::merge() {
  const double w = std::ldexp(1.0, exp_);
  const std::int64_t new_base = base_ >> 1;
  std::vector<double> count(count_.size(), 0.0), dev(dev_.size(), 0.0);
  for (std::size_t i = 0; i < count_.size(); ++i) {
    const double n = count_[i];
    if (n == 0.0) continue;
    const std::int64_t g = base_ + static_cast<std::int64_t>(i);
    const double sh = (g & 1) == 0 ? -0.5 * w : 0.5 * w;  // old centre - new centre
    const double d = dev_[i];
    m2_ += 2.0 * sh * d + n * (0.25 * w * w);
    const auto j = static_cast<std::size_t>((g >> 1) - new_base);
    count[j] += n;
    dev[j] += d + n * sh;
  }
  count_.swap(count);
  dev_.swap(dev);
  exp_ += 1;
  base_ = new_base;
}

double IfmrHistogram::kth(std::size_t k, bool largest) const {
  const std::vector<float>& kept = largest ? top_ : bottom_;
  if (k >= 1 && k <= kept.size()) return kept[k - 1];
  if (k < 1 || k > nonzero_) fail("IfmrHistogram::kth: k out of range");
  const double w = std::ldexp(1.0, exp_);
  const std::size_t bins = count_.size();
  double cum = 0.0;
  for (std::size_t step = 0; step < bins; ++step) {
    const std::size_t b = largest ? bins - 1 - step : step;
    cum += count_[b];
    if (cum >= static_cast<double>(k)) {
      const double before = cum - count_[b];
      const double frac = (static_cast<double>(k) - before - 0.5) / count_[b];
      const double a = static_cast<double>(base_ + static_cast<std::int64_t>(b)) * w;
      return largest ? a + w - frac * w : a + frac * w;
    }
  }
  fail("IfmrHistogram::kth: inconsistent counts");
}

std::vector<double> IfmrHistogram::losses(const float* clip, const float* lo, const float* scale, std::size_t k,
                                          int threads) const {
  // The occupied bins' edges, centres and density slopes, shared by every candidate.
  const double w = std::ldexp(1.0, exp_);
  std::vector<double> n, d, a, c, e, beta;
  for (std::size_t b = 0; b < count_.size(); ++b) {
    if (count_[b] == 0.0) continue;
    const double ab = static_cast<double>(base_ + static_cast<std::int64_t>(b)) * w;
    n.push_back(count_[b]);
    d.push_back(dev_[b]);
    a.push_back(ab);
    c.push_back(ab + 0.5 * w);
    e.push_back(ab + w);
    beta.push_back(std::min(std::max(12.0 * dev_[b] / (count_[b] * w * w), -2.0 / w), 2.0 / w));
  }
  std::vector<double> sums(k, 0.0);
  auto work = [&](std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) {
      const double s = scale[i], lo_i = lo[i], hi_i = clip[i], inv = 1.0 / s;
      double sum = 0.0;
      for (std::size_t b = 0; b < n.size(); ++b) {
        const double la = level(a[b], lo_i, hi_i, inv), le = level(e[b], lo_i, hi_i, inv);
        const double qa = la * s - c[b];
        double total = n[b] * qa * qa - 2.0 * qa * d[b];
        const double m = le - la;
        if (m > 0) {
          const double u = e[b] - s * 0.5 * (la + le);
          const double k2 = s * s * (m * m * m - m) / 12.0;
          const double su2 = m * u * u + k2;
          const double su3 = m * u * u * u + 3.0 * u * k2;
          total -= (2.0 * s / w) * n[b] * (0.5 * su2 + beta[b] * (0.25 * w * su2 - su3 / 6.0));
        }
        sum += total;
      }
      sums[i] = sum + m2_;
    }
  };
  const std::size_t workers = std::max<std::size_t>(1, std::min<std::size_t>(static_cast<std::size_t>(
                                                                                  std::max(threads, 1)), k));
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(work, k * t / workers, k * (t + 1) / workers);
  work(0, k / workers);
  for (auto& th : pool) th.join();
  return sums;
}

}  // namespace amct
