// MAX pooling with its argmax, and its backward (Caffe's PoolingLayer Forward_cpu / Backward_cpu, MAX).
//
// Forward, per (image, channel) plane and output (oy, ox), Caffe's loop: the window rows
// [oy*sh - ph, +kh) and columns [ox*sw - pw, +kw), clipped to the input; y starts at -FLT_MAX and
// mask at -1, and a cell replaces them where it is strictly greater (row-major scan: ties keep the
// first cell, NaN never wins). mask holds the cell's flat index h*W + w in its plane.
//
// Backward: dx = 0, then dx[plane].flat[mask] += dy in output order. A window that picked nothing
// (mask -1) adds its dy at plane index -1, the last cell of the previous plane, as Caffe does (after
// that plane's own additions, in Caffe's order); on the first plane, where Caffe writes before its
// buffer, it is dropped.
//
// Uses Conv2dGeometry (depthwise.h) with dh = dw = 1. `threads` workers split the planes; the bytes do not depend
// on `threads`.
#pragma once

#include <cstdint>

#include "amct/depthwise.h"  // Conv2dGeometry

namespace amct {

void max_pool2d_argmax(const float* x, float* y, std::int32_t* mask, const Conv2dGeometry& g, int threads);
void max_pool2d_backward(const float* dy, const std::int32_t* mask, float* dx, const Conv2dGeometry& g, int threads);

}  // namespace amct
