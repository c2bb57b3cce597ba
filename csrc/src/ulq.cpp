#include "amct/ulq.h"

#include <cmath>

#include "amct/common.h"

namespace amct {

void ulq_clip_check(float& clip_max, float& clip_min, float& prev_max, float& prev_min) {
  if (clip_max <= clip_min) {
    clip_max = prev_max;
    clip_min = prev_min;
  } else if (clip_max < 0.0f) {
    clip_max = prev_max;
  } else if (clip_min > 0.0f) {
    clip_min = prev_min;
  } else {
    prev_max = clip_max;
    prev_min = clip_min;
  }
}

void ulq_scale_offset(float clip_max, float clip_min, int num_bits, float* scale, int* offset) {
  check_num_bits(num_bits, 2, 16, "ULQ retrain_data_config");
  const float levels = static_cast<float>((1 << num_bits) - 1);
  const float qmin = static_cast<float>(qmin_of(num_bits)), qmax = static_cast<float>(qmax_of(num_bits));
  float s = (clip_max - clip_min) / levels;
  if (std::isfinite(s) && s < kFltEpsilon) {
    *scale = 1.0f;
    *offset = qmin_of(num_bits);
    return;
  }
  s = process_scale(s, "UlqQuant");
  float o = std::round(qmin - clip_min / s);
  o = o < qmin ? qmin : (o > qmax ? qmax : o);
  *scale = s;
  *offset = static_cast<int>(o);
}

void ulq_backward(const float* x, const float* g, float* grad_x, std::size_t n, float clip_max,
                  float clip_min, float scale, int offset, int num_bits, double* grad_clip_max,
                  double* grad_clip_min) {
  check_num_bits(num_bits, 2, 16, "ULQ retrain_data_config");
  const float levels = static_cast<float>((1 << num_bits) - 1);
  const float up_edge = scale * static_cast<float>(qmax_of(num_bits) - offset);
  const float low_edge = scale * static_cast<float>(qmin_of(num_bits) - offset);
  double gmax = 0.0, gmin = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const bool upper = x[i] > up_edge, lower = x[i] < low_edge;
    const float t = (upper ? clip_max : (lower ? clip_min : x[i])) / scale;
    const float e = (std::round(t) - t) / levels;
    const double gi = g[i];
    gmax += static_cast<double>(e + (upper ? 1.0f : 0.0f)) * gi;
    gmin += static_cast<double>((lower ? 1.0f : 0.0f) - e) * gi;
    grad_x[i] = (upper || lower) ? 0.0f : g[i];
  }
  *grad_clip_max = gmax;
  *grad_clip_min = gmin;
}

}  // namespace amct
