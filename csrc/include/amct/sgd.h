// One learned blob's step of Caffe's SGDSolver with momentum (SGDSolver::ApplyUpdate, L2 or no weight
// decay, then Net::Update), in float32, every product and sum rounded on its own as NumPy's
// elementwise operations round them (no fused multiply-add):
//
//   g = g + decay * w      (Regularize; skipped when decay == 0, so an infinite w gives no NaN)
//   h = momentum * h;  h = h + rate * g;  g = h      (ComputeUpdateValue: the update goes to the diff)
//   w = w - g              (Net::Update)
//
// w (weights), g (diff) and h (history) hold n floats each. `threads` workers split the elements.
#pragma once

#include <cstddef>

namespace amct {

void sgd_update(float* w, float* g, float* h, std::size_t n, float decay, float momentum, float rate, int threads);

}  // namespace amct
