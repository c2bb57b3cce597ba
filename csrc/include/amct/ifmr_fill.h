// The per-block loops of the streaming IFMR histogram's fill (amct/ifmr_stream.h): portable, AVX2 and
// AVX-512 versions that give the same bits, picked by ifmr_simd_level().
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace amct {
namespace ifmr_fill {

constexpr std::size_t kBlock = 512;  // values per block (a multiple of 8)
constexpr std::size_t kTrash = 8;    // slots after the bins that the zeros may be sent to
constexpr std::size_t kSlack = 8;    // entries a block may write past its m (whole vector stores)

// The grid of a fill: value v goes to bin trunc(clamp(v / w - base, 0, last)), whose centre is
// (that + base + 1/2) w. w and 1/w are powers of two, so v / w is exact.
struct Grid {
  double inv_w, base_d, w, last_d;
};

struct BlockStats {
  bool bad = false;  // an inf or NaN seen
  std::uint64_t nonzero = 0, positive = 0;
  float max = -std::numeric_limits<float>::infinity();  // of the nonzero values
  float min = std::numeric_limits<float>::infinity();
};

// Bins and deviations of the values x[0..m), m <= kBlock, for the scatter into a histogram: writes
// entries (bin[i], dev[i]) for i < the returned count, one per nonzero value, in data order, with
// dev = v - centre; a path may also write entries for zeros, with bins last + 1 + (0..7) (the trash
// slots) and dev +-0. lane[l] += dev^2 over the values at the positions j = l (mod 4), in order of j.
// bin and dev hold kBlock + kSlack entries.
std::size_t block(const float* x, std::size_t m, const Grid& g, std::int32_t* bin, double* dev, double* lane,
                  BlockStats* st);

// Whether x[0..n) holds an inf or NaN, and the range [lo, hi] of its nonzero values (lo > hi when
// there is none).
bool scan(const float* x, std::size_t n, float* lo, float* hi);

// Appends the nonzero x[j], j < m, above (`above`) or below `bound` to `out`, in data order.
void collect(const float* x, std::size_t m, float bound, bool above, std::vector<float>* out);

}  // namespace ifmr_fill
}  // namespace amct
