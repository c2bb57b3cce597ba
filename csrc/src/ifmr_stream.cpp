// Streaming IFMR histogram. Every float64 expression is written in the order of the NumPy
// reference (amct_caffe/quant/ifmr_stream.py) and the core is built without FMA contraction, so
// the histogram (count, dev, m2), the kept extremes and kth() are bit for bit the reference's,
// whatever the thread count; losses() sums the bins sequentially where NumPy sums pairwise (a
// rounding-noise difference).
#include "amct/ifmr_stream.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <thread>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "amct/common.h"
#include "amct/ifmr.h"
#include "amct/ifmr_fill.h"

namespace amct {
namespace {

constexpr int kMinExp = -200;

std::int64_t grid_index(double v, int e) { return static_cast<std::int64_t>(std::floor(std::ldexp(v, -e))); }

// trunc(t) for |t| < 2^62 without a libm call (the core is built for the baseline ISA, where
// std::trunc is one).
inline double trunc_small(double t) { return static_cast<double>(static_cast<std::int64_t>(t)); }

double level(double x, double lo, double hi, double inv) {
  const double t = std::min(std::max(x, lo), hi) * inv;  // |t| <= 2^(num_bits) + 1
  const double r = trunc_small(t);
  return std::fabs(t - r) >= 0.5 ? r + (t > 0 ? 1.0 : (t < 0 ? -1.0 : 0.0)) : r + 0.0;
}

using ifmr_fill::BlockStats;
using ifmr_fill::Grid;
using ifmr_fill::kBlock;

// The bin of v on the grid, as ifmr_fill::block computes it (monotonic in v).
std::int64_t bin_of(float v, const Grid& g) {
  const double z = static_cast<double>(v) * g.inv_w - g.base_d;
  const double t = z > 0.0 ? z : 0.0;
  return static_cast<std::int64_t>(t < g.last_d ? t : g.last_d);
}

// pairs[2 b] += 1, pairs[2 b + 1] += dev for every entry (count and deviation in one 16-byte add).
void scatter(double* pairs, const std::int32_t* bin, const double* dev, std::size_t n) {
#ifdef __SSE2__
  for (std::size_t i = 0; i < n; ++i) {
    double* s = pairs + 2 * static_cast<std::size_t>(bin[i]);
    _mm_storeu_pd(s, _mm_add_pd(_mm_loadu_pd(s), _mm_set_pd(dev[i], 1.0)));
  }
#else
  for (std::size_t i = 0; i < n; ++i) {
    double* s = pairs + 2 * static_cast<std::size_t>(bin[i]);
    s[0] += 1.0;
    s[1] += dev[i];
  }
#endif
}

// What one worker of a fill gathers over the chunks it fills: the parts that do not depend on order.
struct Worker {
  double* pairs = nullptr;  // the (count, dev) pairs of its present chunk; zero between chunks
  BlockStats st;
  float top_floor = 0.0f, bottom_ceil = 0.0f;  // a value must pass these to be a candidate
  std::vector<float> top, bottom;              // candidates for the kept extremes
};

// Keeps the k best of *pending (in no order) and returns the k-th, the new threshold.
template <class Better>
float prune(std::vector<float>* pending, std::size_t k, Better better) {
  std::nth_element(pending->begin(), pending->begin() + static_cast<std::ptrdiff_t>(k - 1), pending->end(), better);
  pending->resize(k);
  return pending->back();
}

// Fills x[0..m) into w->pairs block by block: (a) bins and deviations, branch-free and vectorized
// where the CPU allows; (b) the scatter; (c) the extremes, only for a block that may hold one.
// Returns the chunk's sum of d^2 ((l0 + l1) + (l2 + l3) of the lanes) and its bin range [*b0, *b1]
// (b0 > b1 when it holds no nonzero value).
double fill_chunk(const float* x, std::size_t m, const Grid& g, std::size_t k, Worker* w, std::int64_t* b0,
                  std::int64_t* b1) {
  alignas(64) std::int32_t bin[kBlock + ifmr_fill::kSlack];
  alignas(64) double dev[kBlock + ifmr_fill::kSlack];
  double lane[4] = {0.0, 0.0, 0.0, 0.0};
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (std::size_t start = 0; start < m; start += kBlock) {
    const std::size_t mb = std::min(kBlock, m - start);
    const float* xb = x + start;
    BlockStats st;
    scatter(w->pairs, bin, dev, ifmr_fill::block(xb, mb, g, bin, dev, lane, &st));
    w->st.bad |= st.bad;
    w->st.nonzero += st.nonzero;
    w->st.positive += st.positive;
    lo = std::min(lo, st.min);
    hi = std::max(hi, st.max);
    // Candidates pile up until 4k, then only the k best stay (no value below those k can be among
    // the k best of the kept and them) and the threshold rises to theirs.
    if (st.max > w->top_floor) {
      ifmr_fill::collect(xb, mb, w->top_floor, true, &w->top);
      if (w->top.size() >= 4 * k) w->top_floor = std::max(w->top_floor, prune(&w->top, k, std::greater<float>()));
    }
    if (st.min < w->bottom_ceil) {
      ifmr_fill::collect(xb, mb, w->bottom_ceil, false, &w->bottom);
      if (w->bottom.size() >= 4 * k) {
        w->bottom_ceil = std::min(w->bottom_ceil, prune(&w->bottom, k, std::less<float>()));
      }
    }
  }
  w->st.min = std::min(w->st.min, lo);
  w->st.max = std::max(w->st.max, hi);
  *b0 = lo <= hi ? bin_of(lo, g) : 1;
  *b1 = lo <= hi ? bin_of(hi, g) : 0;
  return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

// The occupied bins of a search (the module doc's n_b, D_b, edges a_b and e_b, centre c_b, slope).
struct Occupied {
  std::vector<double> n, d, a, c, e, beta;
  double w = 0.0;
};

// The loss of candidate (s, lo, hi) over the bins (module doc), summed in bin order.
double loss_one(const Occupied& o, double s, double lo_i, double hi_i) {
  const double inv = 1.0 / s, w = o.w;
  double sum = 0.0;
  for (std::size_t b = 0; b < o.n.size(); ++b) {
    const double la = level(o.a[b], lo_i, hi_i, inv), le = level(o.e[b], lo_i, hi_i, inv);
    const double qa = la * s - o.c[b];
    double total = o.n[b] * qa * qa - 2.0 * qa * o.d[b];
    const double m = le - la;
    if (m > 0) {
      const double u = o.e[b] - s * 0.5 * (la + le);
      const double k2 = s * s * (m * m * m - m) / 12.0;
      const double su2 = m * u * u + k2;
      const double su3 = m * u * u * u + 3.0 * u * k2;
      total -= (2.0 * s / w) * o.n[b] * (0.5 * su2 + o.beta[b] * (0.25 * w * su2 - su3 / 6.0));
    }
    sum += total;
  }
  return sum;
}

constexpr std::size_t kLanes = 8;  // candidates per group of the search

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define AMCT_SEARCH_AVX512 1
// level() for eight (lo, hi, inv) at once.
__attribute__((target("avx512f"))) inline __m512d level8(__m512d x, __m512d lo, __m512d hi, __m512d inv) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  const __m512d t = _mm512_mul_pd(_mm512_min_pd(hi, _mm512_max_pd(lo, x)), inv);
  const __m512d r = _mm512_roundscale_pd(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask8 away = _mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_sub_pd(t, r)), _mm512_set1_pd(0.5), _CMP_GE_OQ);
  const __m512d sign = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(t, zero, _CMP_GT_OQ),
                                            _mm512_mask_blend_pd(_mm512_cmp_pd_mask(t, zero, _CMP_LT_OQ), zero,
                                                                 _mm512_set1_pd(-1.0)),
                                            one);
  return _mm512_mask_add_pd(_mm512_add_pd(r, zero), away, r, sign);
}

// loss_one for eight candidates, one per lane: every lane does loss_one's IEEE operations in its
// order (max(lo, x) and min(hi, x) return x on ties as std::max / std::min do; trunc keeps the
// sign of a zero where the integer cast does not, which r + 0.0 and t - r do not see), so the
// same bits. The per-candidate factors (1 / s, s / 2, s^2, 2 s / w) are the loop's, hoisted.
__attribute__((target("avx512f"))) void loss_eight(const Occupied& o, const double* s8, const double* lo8,
                                                    const double* hi8, double* out) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5);
  const __m512d two = _mm512_set1_pd(2.0), three = _mm512_set1_pd(3.0), twelve = _mm512_set1_pd(12.0);
  const __m512d six = _mm512_set1_pd(6.0), quarter_w = _mm512_set1_pd(0.25 * o.w);
  const __m512d s = _mm512_loadu_pd(s8), lo = _mm512_loadu_pd(lo8), hi = _mm512_loadu_pd(hi8);
  const __m512d inv = _mm512_div_pd(one, s), s_half = _mm512_mul_pd(s, half), ss = _mm512_mul_pd(s, s);
  const __m512d step = _mm512_div_pd(_mm512_mul_pd(two, s), _mm512_set1_pd(o.w));
  __m512d sum = zero;
  for (std::size_t b = 0; b < o.n.size(); ++b) {
    const __m512d e = _mm512_set1_pd(o.e[b]), n = _mm512_set1_pd(o.n[b]);
    const __m512d la = level8(_mm512_set1_pd(o.a[b]), lo, hi, inv), le = level8(e, lo, hi, inv);
    const __m512d qa = _mm512_sub_pd(_mm512_mul_pd(la, s), _mm512_set1_pd(o.c[b]));
    __m512d total = _mm512_sub_pd(_mm512_mul_pd(_mm512_mul_pd(n, qa), qa),
                                  _mm512_mul_pd(_mm512_mul_pd(two, qa), _mm512_set1_pd(o.d[b])));
    const __m512d m = _mm512_sub_pd(le, la);
    const __mmask8 steps = _mm512_cmp_pd_mask(m, zero, _CMP_GT_OQ);
    if (steps) {
      const __m512d u = _mm512_sub_pd(e, _mm512_mul_pd(s_half, _mm512_add_pd(la, le)));
      const __m512d k2 = _mm512_div_pd(_mm512_mul_pd(ss, _mm512_sub_pd(_mm512_mul_pd(_mm512_mul_pd(m, m), m), m)),
                                       twelve);
      const __m512d mu2 = _mm512_mul_pd(_mm512_mul_pd(m, u), u);
      const __m512d su2 = _mm512_add_pd(mu2, k2);
      const __m512d su3 = _mm512_add_pd(_mm512_mul_pd(mu2, u), _mm512_mul_pd(_mm512_mul_pd(three, u), k2));
      const __m512d inner = _mm512_add_pd(
          _mm512_mul_pd(half, su2),
          _mm512_mul_pd(_mm512_set1_pd(o.beta[b]), _mm512_sub_pd(_mm512_mul_pd(quarter_w, su2),
                                                                 _mm512_div_pd(su3, six))));
      total = _mm512_mask_sub_pd(total, steps, total, _mm512_mul_pd(_mm512_mul_pd(step, n), inner));
    }
    sum = _mm512_add_pd(sum, total);
  }
  _mm512_storeu_pd(out, sum);
}
#endif

// sums[i] = loss + m2 for the kLanes candidates of a group.
void losses_group(const Occupied& o, const double* s, const double* lo, const double* hi, double m2, double* sums) {
#ifdef AMCT_SEARCH_AVX512
  if (ifmr_simd_level() >= 2) {
    loss_eight(o, s, lo, hi, sums);
    for (std::size_t i = 0; i < kLanes; ++i) sums[i] += m2;
    return;
  }
#endif
  for (std::size_t i = 0; i < kLanes; ++i) sums[i] = loss_one(o, s[i], lo[i], hi[i]) + m2;
}

// Keeps the k best of `kept` (sorted, best first) + `pending` in `kept`; `better` orders best first.
// After a layer's first batch few values pass the thresholds: only they are sorted, then merged in.
template <class Better>
void keep_best(std::vector<float>* kept, std::vector<float>* pending, std::size_t k, Better better) {
  if (pending->size() > k) prune(pending, k, better);
  std::sort(pending->begin(), pending->end(), better);
  std::vector<float> merged(kept->size() + pending->size());
  std::merge(kept->begin(), kept->end(), pending->begin(), pending->end(), merged.begin(), better);
  if (merged.size() > k) merged.resize(k);
  // Copied into the kept storage (reserved at construction), not swapped: the state stays in the memory
  // of the thread that made the histogram, whichever thread fills it (a worker's malloc arena would
  // otherwise hold every layer's state on top of the main one's).
  kept->assign(merged.begin(), merged.end());
  pending->clear();
}

}  // namespace

IfmrHistogram::IfmrHistogram(std::size_t bins, std::size_t top_k)
    : top_k_(top_k), count_(bins, 0.0), dev_(bins, 0.0) {
  if (bins < 4 || (bins & (bins - 1)) != 0) {
    fail("IfmrHistogram: bins must be a power of two >= 4, got " + std::to_string(bins));
  }
  if (top_k < 1) fail("IfmrHistogram: top_k must be >= 1");
  top_.reserve(top_k);
  bottom_.reserve(top_k);
}

void IfmrHistogram::update(const float* x, std::size_t n, const char* what, int threads) {
  const std::string illegal = std::string(what) + " scale is illegal: input data contains inf or NaN";
  if (!has_grid_) {  // the first data: its range sets the grid
    float lo, hi;
    if (ifmr_fill::scan(x, n, &lo, &hi)) fail(illegal);
    if (!(lo <= hi)) return;  // all zeros
    cover(lo, hi);
  }
  // One pass on the present grid; where the batch turns out to reach past it, the pass (which
  // only wrote this update's scratch) is dropped and made again on the grid that covers it.
  Pass pass;
  while (!fill(x, n, threads, &pass)) {
    if (pass.bad) fail(illegal);
    cover(pass.lo, pass.hi);
  }
  if (!pass.nonzero) return;
  const std::vector<double>& batch = *pass.batch;
  for (auto b = static_cast<std::size_t>(pass.b0); b <= static_cast<std::size_t>(pass.b1); ++b) {
    count_[b] += batch[2 * b];
    dev_[b] += batch[2 * b + 1];
  }
  m2_ += pass.m2;
  nonzero_ += pass.nonzero;
  positive_ += pass.positive;
  keep_best(&top_, &pass.top, top_k_, std::greater<float>());
  keep_best(&bottom_, &pass.bottom, top_k_, std::less<float>());
}

// This update's (count, dev) per bin, interleaved (one cache line per value): scratch of the
// calling thread, shared by every histogram it fills (one at a time), so that the many layers of a
// calibration model do not each hold one.
std::vector<double>& IfmrHistogram::scratch() const {
  thread_local std::vector<double> batch;
  batch.assign(2 * count_.size(), 0.0);
  return batch;
}

bool IfmrHistogram::fill(const float* x, std::size_t n, int threads, Pass* pass) {
  *pass = Pass();
  std::vector<double>& batch = scratch();
  const Grid grid{std::ldexp(1.0, -exp_), static_cast<double>(base_), std::ldexp(1.0, exp_),
                  static_cast<double>(count_.size() - 1)};
  const std::size_t k = top_k_, chunks = (n + kChunk - 1) / kChunk;
  const std::size_t workers = std::max<std::size_t>(1, std::min<std::size_t>(static_cast<std::size_t>(
                                                                                  std::max(threads, 1)), chunks));
  // Each worker sums its chunk into its own pairs (the bins, then the trash slots of the zeros);
  // the caller's thread keeps them from one update to the next.
  thread_local std::vector<std::vector<double>> own;
  if (own.size() < workers) own.resize(workers);
  std::vector<Worker> team(workers);
  for (std::size_t t = 0; t < workers; ++t) {
    own[t].assign(2 * (count_.size() + ifmr_fill::kTrash), 0.0);
    team[t].pairs = own[t].data();
    team[t].top_floor = top_.size() == k ? top_.back() : -std::numeric_limits<float>::infinity();
    team[t].bottom_ceil = bottom_.size() == k ? bottom_.back() : std::numeric_limits<float>::infinity();
  }
  // Workers take chunks in order and add each to the batch once every earlier chunk is in: the
  // sums per bin (0 + chunk 0 + chunk 1 + ...) and of d^2 are the same whoever filled the chunks.
  std::atomic<std::size_t> claim{0};
  std::mutex mu;
  std::condition_variable turn;
  std::size_t merged = 0;  // chunks added so far (guarded by mu)
  double m2 = 0.0;
  std::int64_t lowest = std::numeric_limits<std::int64_t>::max(), highest = -1;  // bins touched (guarded by mu)
  auto work = [&](Worker* w) {
    for (std::size_t c = claim.fetch_add(1); c < chunks; c = claim.fetch_add(1)) {
      const std::size_t first = c * kChunk;
      std::int64_t b0, b1;
      const double sq = fill_chunk(x + first, std::min(kChunk, n - first), grid, k, w, &b0, &b1);
      std::unique_lock<std::mutex> lock(mu);
      turn.wait(lock, [&] { return merged == c; });
      lock.unlock();  // until merged moves on, no other worker touches the batch
      for (std::int64_t b = b0; b <= b1; ++b) {
        const auto i = 2 * static_cast<std::size_t>(b);
        batch[i] += w->pairs[i];
        batch[i + 1] += w->pairs[i + 1];
        w->pairs[i] = w->pairs[i + 1] = 0.0;
      }
      m2 += sq;
      if (b0 <= b1) lowest = std::min(lowest, b0), highest = std::max(highest, b1);
      lock.lock();
      merged = c + 1;
      lock.unlock();
      turn.notify_all();
    }
  };
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(work, &team[t]);
  work(&team[0]);
  for (auto& th : pool) th.join();
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool bad = false;
  for (Worker& w : team) {
    bad |= w.st.bad;
    lo = std::min(lo, w.st.min);
    hi = std::max(hi, w.st.max);
    pass->nonzero += w.st.nonzero;
    pass->positive += w.st.positive;
    pass->top.insert(pass->top.end(), w.top.begin(), w.top.end());
    pass->bottom.insert(pass->bottom.end(), w.bottom.begin(), w.bottom.end());
  }
  pass->batch = &batch;
  pass->m2 = m2;
  pass->b0 = lowest;
  pass->b1 = highest;
  pass->bad = bad;
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
  std::copy(count.begin(), count.end(), count_.begin());  // in place, as keep_best
  std::copy(dev.begin(), dev.end(), dev_.begin());
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
  std::copy(count.begin(), count.end(), count_.begin());  // in place, as keep_best
  std::copy(dev.begin(), dev.end(), dev_.begin());
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
  Occupied o;
  o.w = std::ldexp(1.0, exp_);
  const double w = o.w;
  for (std::size_t b = 0; b < count_.size(); ++b) {
    if (count_[b] == 0.0) continue;
    const double ab = static_cast<double>(base_ + static_cast<std::int64_t>(b)) * w;
    o.n.push_back(count_[b]);
    o.d.push_back(dev_[b]);
    o.a.push_back(ab);
    o.c.push_back(ab + 0.5 * w);
    o.e.push_back(ab + w);
    o.beta.push_back(std::min(std::max(12.0 * dev_[b] / (count_[b] * w * w), -2.0 / w), 2.0 / w));
  }
  // Candidates in groups of kLanes (the last one padded with copies of the last candidate).
  const std::size_t groups = (k + kLanes - 1) / kLanes;
  std::vector<double> s(groups * kLanes), l(groups * kLanes), h(groups * kLanes), sums(groups * kLanes);
  for (std::size_t i = 0; i < s.size(); ++i) {
    const std::size_t j = std::min(i, k - 1);
    s[i] = scale[j];
    l[i] = lo[j];
    h[i] = clip[j];
  }
  auto work = [&](std::size_t first, std::size_t last) {
    for (std::size_t g = first; g < last; ++g) losses_group(o, &s[g * kLanes], &l[g * kLanes], &h[g * kLanes],
                                                            m2_, &sums[g * kLanes]);
  };
  const std::size_t workers = std::max<std::size_t>(1, std::min<std::size_t>(static_cast<std::size_t>(
                                                                                  std::max(threads, 1)), groups));
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(work, groups * t / workers, groups * (t + 1) / workers);
  work(0, groups / workers);
  for (auto& th : pool) th.join();
  sums.resize(k);
  return sums;
}

}  // namespace amct
