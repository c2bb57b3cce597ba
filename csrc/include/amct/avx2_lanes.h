// Lanes of AVX2 vectors of 8 floats shared by winograd_avx2.cpp, register_block.h and depthwise.cpp: the
// first `count` lanes, loaded reading no float past them (masked lanes are not read, so never fault) and
// stored writing none past them; and the even / odd floats of 16 (a stride-2 row). A full vector is a plain load / store; a partial store goes through the stack, as AMD's
// masked store is microcoded and many times slower than a copy. Always inlined into AVX2 callers.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace amct {
namespace avx2_lanes {

constexpr int kLanes = 8;

// The first `count` lanes (clamped to 0..8) as a maskload mask.
__attribute__((target("avx2"), always_inline)) inline __m256i first(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(std::clamp(count, 0, kLanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2"), always_inline)) inline __m256 load_first(const float* p, int count) {
  return count >= kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first(count));
}

__attribute__((target("avx2"), always_inline)) inline void store_first(float* p, int count, __m256 v) {
  if (count >= kLanes) {
    _mm256_storeu_ps(p, v);
    return;
  }
  if (count <= 0) return;
  alignas(32) float part[kLanes];
  _mm256_store_ps(part, v);
  std::memcpy(p, part, static_cast<std::size_t>(count) * sizeof(float));
}

// Lane l of the result: p[2 l + Odd] (p must have 16 readable floats).
template <bool Odd>
__attribute__((target("avx2"), always_inline)) inline __m256 stride2(const float* p) {
  const __m256 lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
  // the picked floats come in 64-bit pairs ordered (0, 2, 1, 3)
  const __m256 pick = Odd ? _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)) : _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pick), _MM_SHUFFLE(3, 1, 2, 0)));
}

}  // namespace avx2_lanes
}  // namespace amct
