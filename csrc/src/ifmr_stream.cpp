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

#include "amct/common.h"

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
    : top_k_(top_k), count_(bins, 0.0), dev_(bins, 0.0), batch_(2 * bins, 0.0) {
  if (bins < 4 || (bins & (bins - 1)) != 0) {
    fail("IfmrHistogram: bins must be a power of two >= 4, got " + std::to_string(bins));
  }
  if (top_k < 1) fail("IfmrHistogram: top_k must be >= 1");
}

void IfmrHistogram::update(const float* x, std::size_t n, const char* what) {
  // Pass 1: the finite check (integer OR) and the range of the nonzero values, in 8 independent
  // lanes (no loop-carried dependency, no branch; min/max are exact whatever the order).
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float lo8[8], hi8[8];
  std::uint32_t bad8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int l = 0; l < 8; ++l) lo8[l] = kInf, hi8[l] = -kInf;
  std::size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) {
      const float v = x[j + l];
      std::uint32_t u;
      std::memcpy(&u, &v, sizeof u);
      bad8[l] |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
      lo8[l] = std::min(lo8[l], v == 0.0f ? kInf : v);
      hi8[l] = std::max(hi8[l], v == 0.0f ? -kInf : v);
    }
  }
  for (; j < n; ++j) {
    const float v = x[j];
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    bad8[0] |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
    lo8[0] = std::min(lo8[0], v == 0.0f ? kInf : v);
    hi8[0] = std::max(hi8[0], v == 0.0f ? -kInf : v);
  }
  float lo = kInf, hi = -kInf;
  std::uint32_t bad = 0;
  for (int l = 0; l < 8; ++l) lo = std::min(lo, lo8[l]), hi = std::max(hi, hi8[l]), bad |= bad8[l];
  if (bad) fail(std::string(what) + " scale is illegal: input data contains inf or NaN");
  if (!(lo <= hi)) return;  // all zeros
  cover(lo, hi);
  const double w = std::ldexp(1.0, exp_), inv_w = std::ldexp(1.0, -exp_);
  const std::size_t k = top_k_;
  float top_floor = top_.size() == k ? top_.back() : -std::numeric_limits<float>::infinity();
  float bottom_ceil = bottom_.size() == k ? bottom_.back() : std::numeric_limits<float>::infinity();
  std::vector<float> pending_top, pending_bottom;
  double lane[4] = {0.0, 0.0, 0.0, 0.0};
  std::uint64_t nonzero = 0, positive = 0;
  // Pass 2, without data-dependent branches (a zero, half of the values after a ReLU, would
  // mispredict): a zero goes to a clamped bin with weight 0, which adds nothing.
  const double base_d = static_cast<double>(base_);
  const auto last = static_cast<std::int64_t>(count_.size()) - 1;
  for (j = 0; j < n; ++j) {
    const float v = x[j];
    const double keep = v != 0.0f ? 1.0 : 0.0;
    const double xd = v;
    // floor(xd / w) - base: exact (a power-of-two scaling, then an integer of < 2^53 subtracted),
    // and >= 0 for a value inside the window, where truncation is floor.
    const double t = xd * inv_w - base_d;
    const std::int64_t i = std::min(std::max(static_cast<std::int64_t>(t), std::int64_t{0}), last);
    const double g = static_cast<double>(i) + base_d;
    const double d = (xd - (g + 0.5) * w) * keep;
    const auto idx = static_cast<std::size_t>(i);
    batch_[2 * idx] += keep;
    batch_[2 * idx + 1] += d;
    lane[j & 3] += d * d;
    nonzero += v != 0.0f;
    positive += v > 0.0f;
    if (v > top_floor && v != 0.0f) {
      pending_top.push_back(v);
      if (pending_top.size() >= 4 * k) {
        keep_best(&top_, &pending_top, k, std::greater<float>());
        if (top_.size() == k) top_floor = top_.back();
      }
    }
    if (v < bottom_ceil && v != 0.0f) {
      pending_bottom.push_back(v);
      if (pending_bottom.size() >= 4 * k) {
        keep_best(&bottom_, &pending_bottom, k, std::less<float>());
        if (bottom_.size() == k) bottom_ceil = bottom_.back();
      }
    }
  }
  keep_best(&top_, &pending_top, k, std::greater<float>());
  keep_best(&bottom_, &pending_bottom, k, std::less<float>());
  for (std::size_t i = 0; i < count_.size(); ++i) {
    count_[i] += batch_[2 * i];
    dev_[i] += batch_[2 * i + 1];
    batch_[2 * i] = batch_[2 * i + 1] = 0.0;
  }
  m2_ += (lane[0] + lane[1]) + (lane[2] + lane[3]);
  nonzero_ += nonzero;
  positive_ += positive;
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
