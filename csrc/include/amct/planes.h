// What the 2-D window kernels share (depthwise convolution, im2col / col2im, max pooling): the
// geometry of a window sliding over the (image, channel) planes of an (N, C, H, W) array, and the
// split of those planes between threads.
#pragma once

#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

namespace amct {

// A kh x kw window at strides (sh, sw), zero padding (ph, pw) and dilation (dh, dw) over an
// (N, C, H, W) input gives an (N, C, Ho, Wo) output. Output (oy, ox), tap (i, j) reads input cell
// (oy*sh - ph + i*dh, ox*sw - pw + j*dw), or nothing when that lies outside the input.
struct Conv2dGeometry {
  int n, c, h, w;       // input (N, C, H, W)
  int kh, kw;           // kernel
  int sh, sw, ph, pw, dh, dw;
  int ho, wo;           // output (N, C, Ho, Wo)
};

// Runs run(first, last) on [0, total) split into `threads` contiguous parts, one thread each (the
// calling thread takes the first). Each index is handled by exactly one call, so a kernel whose
// results per index do not depend on the others gives the same bytes with any thread count.
template <class Run>
void parallel_ranges(std::size_t total, int threads, Run run) {
  const std::size_t workers = std::min<std::size_t>(static_cast<std::size_t>(std::max(threads, 1)), total);
  if (workers <= 1) {
    if (total) run(std::size_t{0}, total);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t t = 1; t < workers; ++t) pool.emplace_back(run, total * t / workers, total * (t + 1) / workers);
  run(std::size_t{0}, total / workers);
  for (auto& th : pool) th.join();
}

// The outputs [lo, hi) along one axis whose tap at offset `tap` (i*d - p) reads a cell of [0, size):
// o*s + tap in [0, size).
inline void valid_outputs(int tap, int s, int size, int n_out, int* lo, int* hi) {
  int first = tap >= 0 ? 0 : (-tap + s - 1) / s;
  int last = size - 1 - tap < 0 ? -1 : (size - 1 - tap) / s;  // the last o with o*s + tap < size
  *lo = std::min(first, n_out);
  *hi = std::max(*lo, std::min(last + 1, n_out));
}

}  // namespace amct
