// Uniform fake quantization: x -> clamp(round(x / scale) + offset, qmin, qmax) - offset) * scale.
#pragma once
#include <cstddef>
#include <cstdint>

namespace amct {

// Quantize then dequantize `n` floats in place-safe fashion (in may alias out).
// Rounding is half-to-even (std::nearbyint under the default FE_TONEAREST mode),
// matching numpy.round, so the C++ kernel and the NumPy reference agree bit for bit.
void fake_quant(const float* in, float* out, std::size_t n, float scale, int offset,
                int num_bits, bool with_offset);

}  // namespace amct
