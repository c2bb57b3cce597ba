// Splitting a loop over independent items between a few std::threads.
#pragma once

#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

namespace amct {

// Calls fn(first, last) on `threads` contiguous slices of [0, total), the first slice on the calling
// thread. Each item is handled by exactly one call, so results that are computed per item do not
// depend on `threads`.
template <class Fn>
void parallel_for(std::size_t total, int threads, Fn fn) {
  const std::size_t workers = std::min<std::size_t>(static_cast<std::size_t>(std::max(threads, 1)), total);
  if (workers <= 1) {
    if (total) fn(std::size_t{0}, total);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t t = 1; t < workers; ++t) {
    pool.emplace_back(fn, total * t / workers, total * (t + 1) / workers);
  }
  fn(std::size_t{0}, total / workers);
  for (auto& th : pool) th.join();
}

}  // namespace amct
