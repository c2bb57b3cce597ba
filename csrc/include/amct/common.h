// Numeric conventions shared by every kernel (mirrors amct_caffe/quant/_common.py).
//
// * Rounding is to nearest with halves away from zero (std::round), as in the vendor's C++
//   library that the Caffe layers used.
// * num_bits signed range: [-2^(b-1), 2^(b-1)-1].
// * process_scale: scale < FLT_EPSILON -> 1; non-finite, or 1/scale < FLT_EPSILON -> error.
// * Bad data or arguments throw std::invalid_argument (pybind11 turns it into ValueError; the
//   C API returns an error code and keeps the message).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace amct {

constexpr float kFltEpsilon = FLT_EPSILON;

// Largest float below 0.5: trunc(t + copysign(kHalfBelow, t)) == std::round(t) for every float t
// (checked exhaustively for |t| < 2^24; above that t is already an integer). Used by the
// vectorized loops, which have no round-half-away instruction.
constexpr float kHalfBelow = 0.49999997f;

// Returns v unchanged but hides it from the optimizer, so that an expression such as a*b+c is
// not fused into one FMA (which rounds once instead of twice and would differ from NumPy).
inline float no_fuse(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#endif
  return v;
}

inline int qmin_of(int num_bits) { return -(1 << (num_bits - 1)); }
inline int qmax_of(int num_bits) { return (1 << (num_bits - 1)) - 1; }

[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

inline void check_num_bits(int num_bits, int low, int high, const char* what) {
  if (num_bits < low || num_bits > high) {
    fail(std::string(what) + ": num_bits must be an integer in [" + std::to_string(low) + ", " +
         std::to_string(high) + "], got " + std::to_string(num_bits));
  }
}

// Returns the usable scale or throws "<what> scale is illegal ...".
inline float process_scale(float scale, const char* what, std::size_t index = 0) {
  bool bad = !std::isfinite(scale);
  if (!bad && scale < kFltEpsilon) scale = 1.0f;
  if (!bad && 1.0f / scale < kFltEpsilon) bad = true;
  if (bad) {
    fail(std::string(what) + " scale is illegal: scale=" + std::to_string(scale) + " (index " +
         std::to_string(index) +
         "); the data range must be finite and below about 2^23 quantization steps, check the input "
         "for inf or huge values");
  }
  return scale;
}

// q = clamp(round(x / scale) + offset, qmin, qmax), computed in float32 like the reference.
inline float quantize_one(float x, float scale, float offset, float qmin, float qmax) {
  float q = std::round(x / scale) + offset;
  return q < qmin ? qmin : (q > qmax ? qmax : q);
}

}  // namespace amct
