#include "amct/fake_quant.h"

#include <cmath>
#include <cstring>
#include <string>

#include "amct/common.h"

namespace amct {

void check_uniform_args(float scale, int offset, int num_bits) {
  check_num_bits(num_bits, 2, 16, "quantize");
  if (!(scale > 0.0f) || !std::isfinite(scale)) fail("scale must be finite and > 0");
  if (offset < qmin_of(num_bits) || offset > qmax_of(num_bits)) {
    fail("offset " + std::to_string(offset) + " is outside the " + std::to_string(num_bits) + "-bit range");
  }
}

namespace {
template <class Int>
void quantize_to(const float* x, Int* q, std::size_t n, float scale, int offset, int num_bits) {
  check_uniform_args(scale, offset, num_bits);
  if (num_bits > 8 * static_cast<int>(sizeof(Int))) fail("quantize: num_bits too large for the output type");
  const float qmin = static_cast<float>(qmin_of(num_bits)), qmax = static_cast<float>(qmax_of(num_bits));
  const float off = static_cast<float>(offset);
  for (std::size_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) fail("quantize: input data contains NaN");
    q[i] = static_cast<Int>(quantize_one(x[i], scale, off, qmin, qmax));
  }
}
}  // namespace

void quantize(const float* x, std::int8_t* q, std::size_t n, float scale, int offset, int num_bits) {
  quantize_to(x, q, n, scale, offset, num_bits);
}

void quantize(const float* x, std::int16_t* q, std::size_t n, float scale, int offset, int num_bits) {
  quantize_to(x, q, n, scale, offset, num_bits);
}

void fake_quant(const float* in, float* out, std::size_t n, float scale, int offset, int num_bits) {
  check_uniform_args(scale, offset, num_bits);
  const float qmin = static_cast<float>(qmin_of(num_bits)), qmax = static_cast<float>(qmax_of(num_bits));
  const float off = static_cast<float>(offset);
  for (std::size_t i = 0; i < n; ++i) out[i] = (quantize_one(in[i], scale, off, qmin, qmax) - off) * scale;
}

void pack_deq_scale(const float* scale_w, float scale_d, const std::int8_t* offset_w,
                    std::uint64_t* out, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) {
    const float deq = scale_w[c] * scale_d;
    std::uint32_t bits;
    std::memcpy(&bits, &deq, sizeof bits);
    const auto off = static_cast<std::uint8_t>(offset_w ? offset_w[c] : 0);
    out[c] = (static_cast<std::uint64_t>(off) << 32) | bits;
  }
}

void unpack_deq_scale(const std::uint64_t* param, float* deq, std::int8_t* offset_w, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) {
    const auto bits = static_cast<std::uint32_t>(param[c] & 0xFFFFFFFFu);
    std::memcpy(deq + c, &bits, sizeof bits);
    offset_w[c] = static_cast<std::int8_t>(static_cast<std::uint8_t>((param[c] >> 32) & 0xFFu));
  }
}

}  // namespace amct
