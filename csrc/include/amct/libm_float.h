// glibc's float tanh as Caffe's TanH layer gets it (tanh(float) is glibc's tanhf).
//
// Up to glibc 2.40 tanhf is the Sun fdlibm algorithm (s_tanhf.c on s_expm1f.c) in float
// arithmetic, which is not correctly rounded; NumPy's tanh is an ulp off it for about 40 % of
// values. This is that algorithm, operation for operation, built without contraction
// (-ffp-contract=off), so it gives those bits on any machine, whatever its own libm:
//   tanhf(x) = sign(x) (1 - 2 / (expm1f(2|x|) + 2))   for 1 <= |x| < 22
//              sign(x) (-t / (t + 2)), t = expm1f(-2|x|)  for 2^-55 <= |x| < 1
//              x (1 + x) below, sign(x) (1 - 1e-30) above, NaN for NaN.
// amct_caffe/runtime/layers/libm_float.py holds the NumPy reference it is tested against.
#pragma once

#include <cstddef>

namespace amct {

float fdlibm_expm1f(float x);
float fdlibm_tanhf(float x);

// y[i] = fdlibm_tanhf(x[i]); `threads` workers split the range (per element: same bytes for any count).
void tanhf_array(const float* x, float* y, std::size_t n, int threads);

}  // namespace amct
