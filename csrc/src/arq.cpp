#include "amct/arq.h"

#include <cmath>
#include <string>
#include <vector>

#include "amct/common.h"

namespace amct {
namespace {

void check_layout(const ArqLayout& layout, int num_bits) {
  check_num_bits(num_bits, 2, 8, "ARQ weight_quant_params");
  if (layout.size() == 0) fail("ArqQuant: empty weight");
}

// Calls f(channel_index, pointer, count) for every contiguous run of `inner` values.
template <class F>
void for_each_run(const ArqLayout& L, F f) {
  std::size_t pos = 0;
  for (std::size_t g = 0; g < L.groups; ++g)
    for (std::size_t a = 0; a < L.rows; ++a)
      for (std::size_t c = 0; c < L.channels; ++c, pos += L.inner) f(g * L.channels + c, pos, L.inner);
}

}  // namespace

void arq_scales(const float* w, const ArqLayout& layout, bool channel_wise, int num_bits,
                float* scale, int* offset) {
  check_layout(layout, num_bits);
  const std::size_t nch = channel_wise ? layout.out_channels() : 1;
  std::vector<float> mx(nch, -INFINITY), mn(nch, INFINITY);
  for_each_run(layout, [&](std::size_t ch, std::size_t pos, std::size_t count) {
    const std::size_t k = channel_wise ? ch : 0;
    float hi = mx[k], lo = mn[k];
    for (std::size_t i = 0; i < count; ++i) {
      const float v = w[pos + i];
      if (std::isnan(v)) fail("ArqQuant: weight contains NaN, cannot quantize");
      hi = v > hi ? v : hi;
      lo = v < lo ? v : lo;
    }
    mx[k] = hi;
    mn[k] = lo;
  });
  const float qmax = static_cast<float>(qmax_of(num_bits)), qmin = static_cast<float>(qmin_of(num_bits));
  for (std::size_t k = 0; k < nch; ++k) {
    const float t = std::fabs(mx[k]) > std::fabs(mn[k]) ? mx[k] : mn[k];
    scale[k] = process_scale(t > 0.0f ? t / qmax : t / qmin, "ArqQuant", k);
    offset[k] = 0;
  }
}

void arq_quantize(const float* w, const ArqLayout& layout, bool channel_wise, int num_bits,
                  const float* scale, const int* offset, std::int8_t* q, float* fake) {
  check_layout(layout, num_bits);
  const std::size_t nch = channel_wise ? layout.out_channels() : 1;
  for (std::size_t k = 0; k < nch; ++k) {
    if (!(scale[k] > 0.0f) || !std::isfinite(scale[k])) fail("ArqQuant: scale must be finite and > 0");
  }
  const float qmax = static_cast<float>(qmax_of(num_bits)), qmin = static_cast<float>(qmin_of(num_bits));
  for_each_run(layout, [&](std::size_t ch, std::size_t pos, std::size_t count) {
    const std::size_t k = channel_wise ? ch : 0;
    const float s = scale[k], off = static_cast<float>(offset[k]);
    for (std::size_t i = 0; i < count; ++i) {
      if (std::isnan(w[pos + i])) fail("ArqQuant: weight contains NaN, cannot quantize");
      const float v = quantize_one(w[pos + i], s, off, qmin, qmax);
      if (q) q[pos + i] = static_cast<std::int8_t>(v);
      if (fake) fake[pos + i] = (v - off) * s;
    }
  });
}

void quantize_bias(const float* bias, std::size_t n, const float* scale_w, std::size_t n_scale_w,
                   float scale_d, std::int32_t* out) {
  if (n_scale_w != 1 && n_scale_w != n) {
    fail("bias quantization: scale_w has " + std::to_string(n_scale_w) + " values for " +
         std::to_string(n) + " bias channels");
  }
  for (std::size_t c = 0; c < n; ++c) {
    const float deq = scale_w[n_scale_w == 1 ? 0 : c] * scale_d;
    if (!(deq > 0.0f) || !std::isfinite(deq)) {
      fail("bias quantization: scale_w * scale_d must be finite and > 0 (channel " + std::to_string(c) + ")");
    }
    const double v = std::round(static_cast<double>(bias[c]) / static_cast<double>(deq));
    if (!(v >= -2147483648.0 && v <= 2147483647.0)) {
      fail("bias quantization: channel " + std::to_string(c) + " bias " + std::to_string(bias[c]) +
           " / deq_scale " + std::to_string(deq) +
           " does not fit in int32; skip quantizing this layer (quant_enable: false)");
    }
    out[c] = static_cast<std::int32_t>(v);
  }
}

}  // namespace amct
