// Uniform quantize / fake-quant and the deploy deq_scale packing
// (math: amct_caffe/quant/fake_quant.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace amct {

// q = clamp(round(x / scale) + offset, qmin, qmax); num_bits in [2, 8] for int8, [2, 16] for
// int16. Throws std::invalid_argument on NaN input or bad scale/offset/num_bits.
void quantize(const float* x, std::int8_t* q, std::size_t n, float scale, int offset, int num_bits);
void quantize(const float* x, std::int16_t* q, std::size_t n, float scale, int offset, int num_bits);

// out = (q - offset) * scale with q as above, computed in float32; `in` may alias `out`.
// NaN stays NaN.
void fake_quant(const float* in, float* out, std::size_t n, float scale, int offset, int num_bits);

// out[c] = (uint64(uint8(offset_w[c])) << 32) | bits(float32(scale_w[c] * scale_d)).
void pack_deq_scale(const float* scale_w, float scale_d, const std::int8_t* offset_w,
                    std::uint64_t* out, std::size_t n);
void unpack_deq_scale(const std::uint64_t* param, float* deq, std::int8_t* offset_w, std::size_t n);

// Shared argument check for the uniform kernels (throws std::invalid_argument).
void check_uniform_args(float scale, int offset, int num_bits);

}  // namespace amct
