// LRN across channels as Caffe's LRNLayer::CrossChannelForward_cpu computes it (src/caffe/layers/lrn_layer.cpp).
//
// Per image: the squares x^2 (rounded) in a channel-padded buffer; the first channel's scale starts at k and
// takes the first `size` squares by saxpy (OpenBLAS's kernels: one fused multiply-add each); every next
// channel copies the previous scale, adds the head square and subtracts the tail one, each by a fused
// multiply-add with alpha / size (a running sum, not a fresh window sum: its roundings are Caffe's). Then
// y = powf(scale, -beta) * x (glibc's powf, as caffe_powx calls it).
//
// x, y: (n, c, hw); scale: the same size (Caffe's scale_, kept for the backward). `threads` workers split the
// images; each value is written by one worker, so the bytes do not depend on `threads`.
#pragma once

#include <cstddef>

namespace amct {

void lrn_across(const float* x, float* y, float* scale, std::size_t n, std::size_t c, std::size_t hw, int size,
                float alpha_over_size, float beta, float k, int threads);

}  // namespace amct
