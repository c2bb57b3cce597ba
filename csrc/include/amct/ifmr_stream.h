// Streaming IFMR histogram (math, grid rules and summation orders: amct_caffe/quant/ifmr_stream.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace amct {

class IfmrHistogram {
 public:
  // `bins` a power of two >= 4; the `top_k` largest and smallest nonzero values are kept exactly.
  IfmrHistogram(std::size_t bins, std::size_t top_k);

  // Adds the nonzero values of x[0..n). Throws std::invalid_argument "<what> scale is illegal:
  // input data contains inf or NaN" (and changes nothing) when x holds one. x is cut into chunks of
  // kChunk values, each summed on its own and added in chunk order, so that `threads` workers
  // (filling whole chunks) give the same bits as one.
  void update(const float* x, std::size_t n, const char* what, int threads = 1);

  static constexpr std::size_t kChunk = std::size_t{1} << 16;

  // k-th largest (smallest) nonzero value, 1 <= k <= nonzero: exact for k <= top_k, else
  // interpolated in its bin.
  double kth(std::size_t k, bool largest) const;

  // Sum over all values of (q_i(x) - x)^2 per candidate (clip, lo, scale float32 arrays of k);
  // `threads` workers split the candidates (each sums its own: the result does not depend on them).
  std::vector<double> losses(const float* clip, const float* lo, const float* scale, std::size_t k,
                             int threads) const;

  std::size_t bins() const { return count_.size(); }
  std::size_t top_k() const { return top_k_; }
  bool has_grid() const { return has_grid_; }
  int exp() const { return exp_; }
  std::int64_t base() const { return base_; }
  const std::vector<double>& count() const { return count_; }
  const std::vector<double>& dev() const { return dev_; }
  double m2() const { return m2_; }
  std::uint64_t nonzero() const { return nonzero_; }
  std::uint64_t positive() const { return positive_; }
  const std::vector<float>& top() const { return top_; }        // descending
  const std::vector<float>& bottom() const { return bottom_; }  // ascending

 private:
  struct Pass {  // what one pass over an update's data found, before it is added
    bool bad = false;
    float lo = 0.0f, hi = 0.0f;
    double m2 = 0.0;  // the chunks' sums of d^2, added in chunk order
    std::int64_t b0 = 0, b1 = -1;  // the bins it touched: b0..b1
    std::uint64_t nonzero = 0, positive = 0;
    std::vector<float> top, bottom;  // candidates for the kept extremes
    const std::vector<double>* batch = nullptr;  // the (count, dev) pairs it filled (scratch())
  };
  std::vector<double>& scratch() const;
  // One pass over x into scratch() and *pass; false when x holds an inf/NaN or reaches past the grid.
  bool fill(const float* x, std::size_t n, int threads, Pass* pass);
  void cover(double lo, double hi);
  void shift(std::int64_t base);
  void merge();

  std::size_t top_k_;
  bool has_grid_ = false;
  int exp_ = 0;
  std::int64_t base_ = 0;
  std::vector<double> count_, dev_;
  double m2_ = 0.0;
  std::uint64_t nonzero_ = 0, positive_ = 0;
  std::vector<float> top_, bottom_;
};

}  // namespace amct
