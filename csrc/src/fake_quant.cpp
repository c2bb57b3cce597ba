#include "amct/fake_quant.h"

#include <cmath>
#include <cstdint>
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

// out = (clamp(round(x / scale) + offset, qmin, qmax) - offset) * scale, as quantize_one, in a form the
// compiler vectorizes (quantize_one's std::round is a libm call per value): with v = x / scale (the same
// division) and lo = qmin - offset, hi = qmax - offset (integers, exact in float),
//   * v is first clamped to [lo - 1, hi + 1]: the rounded value is clamped to [lo, hi] anyway, and the
//     clamp keeps v within int range for the truncation below (inf clamps like any large value);
//   * round half away from zero = t + [d >= 0.5] - [d <= -0.5], t = trunc(v) (an int conversion), d = v - t
//     (exact: v and t are within 1 of each other and below 2^17);
//   * (q - offset) with q = r + offset is r exactly (small integers), so out = r * scale;
//   * a NaN x gives v, the NaN quantize_one's arithmetic would carry through, bit for bit.
// The bytes equal quantize_one's for every float32 input (tests/quant/test_fake_quant_kernel.py).
void fake_quant(const float* in, float* out, std::size_t n, float scale, int offset, int num_bits) {
  check_uniform_args(scale, offset, num_bits);
  const float off = static_cast<float>(offset);
  const float lo = static_cast<float>(qmin_of(num_bits)) - off, hi = static_cast<float>(qmax_of(num_bits)) - off;
  const float below = lo - 1.0f, above = hi + 1.0f;
  for (std::size_t i = 0; i < n; ++i) {
    const float v = in[i] / scale;
    const bool nan = v != v;
    float c = v < below ? below : v;
    c = c > above ? above : c;
    c = nan ? 0.0f : c;
    const float t = static_cast<float>(static_cast<std::int32_t>(c));
    const float d = c - t;
    float r = t + (d >= 0.5f ? 1.0f : 0.0f) - (d <= -0.5f ? 1.0f : 0.0f);
    r = r < lo ? lo : r;
    r = r > hi ? hi : r;
    out[i] = nan ? v : r * scale;
  }
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
