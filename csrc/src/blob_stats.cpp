#include "amct/blob_stats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "amct/parallel.h"

namespace amct {

namespace {

struct ChunkSums {
  double dot = 0, aa = 0, bb = 0, dd = 0, max_abs = 0;
  bool nan = false;
};

// One lane's running sums.
struct Lane {
  double dot = 0, aa = 0, bb = 0, dd = 0, max_abs = 0;
  bool nan = false;

  void add(double x, double y) {
    const double d = x - y, ad = std::fabs(d);
    dot += x * y;
    aa += x * x;
    bb += y * y;
    dd += d * d;
    max_abs = ad > max_abs ? ad : max_abs;
    nan |= d != d;
  }
};

// Eight lanes, lane k summing values k, k + 8, ...; combined in lane order at the end.
ChunkSums chunk_sums(const float* a, const float* b, std::size_t n) {
  constexpr std::size_t kLanes = 8;
  Lane lanes[kLanes];
  std::size_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (std::size_t k = 0; k < kLanes; ++k) lanes[k].add(a[j + k], b[j + k]);
  }
  for (std::size_t k = 0; j < n; ++j, ++k) lanes[k].add(a[j], b[j]);
  ChunkSums s;
  for (const Lane& lane : lanes) {
    s.dot += lane.dot;
    s.aa += lane.aa;
    s.bb += lane.bb;
    s.dd += lane.dd;
    s.max_abs = std::max(s.max_abs, lane.max_abs);
    s.nan |= lane.nan;
  }
  return s;
}

}  // namespace

double blob_stats(const float* a, const float* b, std::size_t rows, std::size_t cols, const RowSums& out,
                  int threads) {
  const std::size_t per_row = cols ? (cols + kBlobStatsChunk - 1) / kBlobStatsChunk : 0;
  std::vector<ChunkSums> chunks(rows * per_row);
  parallel_for(chunks.size(), threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) {
      const std::size_t r = i / per_row, c0 = (i % per_row) * kBlobStatsChunk;
      const std::size_t n = std::min(kBlobStatsChunk, cols - c0);
      chunks[i] = chunk_sums(a + r * cols + c0, b + r * cols + c0, n);
    }
  });
  double max_abs = 0;
  bool nan = false;
  for (std::size_t r = 0; r < rows; ++r) {
    double dot = 0, aa = 0, bb = 0, dd = 0;
    for (std::size_t k = 0; k < per_row; ++k) {
      const ChunkSums& s = chunks[r * per_row + k];
      dot += s.dot;
      aa += s.aa;
      bb += s.bb;
      dd += s.dd;
      max_abs = std::max(max_abs, s.max_abs);
      nan |= s.nan;
    }
    out.dot[r] = dot;
    out.aa[r] = aa;
    out.bb[r] = bb;
    out.dd[r] = dd;
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : max_abs;
}

}  // namespace amct
