// ULQ: retraining of the activation clip range (math: amct_caffe/quant/ulq.py).
#pragma once

#include <cstddef>

namespace amct {

// ClipCheck: if clip_max <= clip_min restore both from prev; else if clip_max < 0 restore
// clip_max; else if clip_min > 0 restore clip_min; else store both into prev.
void ulq_clip_check(float& clip_max, float& clip_min, float& prev_max, float& prev_min);

// scale = f32(clip_max - clip_min) / f32(2^b - 1); offset = round(-2^(b-1) - clip_min / scale)
// clamped into the int range; scale < FLT_EPSILON -> (1, -2^(b-1)); illegal -> throws.
void ulq_scale_offset(float clip_max, float clip_min, int num_bits, float* scale, int* offset);

// Gradients of the ULQ forward (fake_quant with the scale/offset above):
//   upper = x > s*(qmax - o), lower = x < s*(qmin - o)
//   t = (upper ? clip_max : lower ? clip_min : x) / s,  e = (round(t) - t) / (2^b - 1)
//   grad_x = (upper || lower) ? 0 : g
//   grad_clip_max = sum f64(e + upper) * f64(g),  grad_clip_min = sum f64(lower - e) * f64(g)
void ulq_backward(const float* x, const float* g, float* grad_x, std::size_t n, float clip_max,
                  float clip_min, float scale, int offset, int num_bits, double* grad_clip_max,
                  double* grad_clip_min);

}  // namespace amct
