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
//
// glibc_expf is glibc's expf (sysdeps/ieee754/flt-32/e_expf.c, glibc 2.27 on) as its x86-64 FMA build
// computes it, which is the one glibc picks on a CPU with AVX2 and FMA (and so the one Caffe's
// std::exp(float) gets there). In double: k = round(x 32/ln2), r = x 32/ln2 - k (both from one fused
// product), 2^(k/32) from a table of 2^(j/32) scaled by 2^(k div 32), times the cubic
// fma(fma(C0, r, C1), r^2, fma(C2, r, 1)), rounded once to float; overflow to inf above 0x1.62e42ep6,
// 0 below -0x1.9fe368p6, 2^-149 just above that (glibc's __math_may_uflowf), NaN stays NaN.
#pragma once

#include <cstddef>

namespace amct {

float fdlibm_expm1f(float x);
float fdlibm_tanhf(float x);

// y[i] = fdlibm_tanhf(x[i]); `threads` workers split the range (per element: same bytes for any count).
void tanhf_array(const float* x, float* y, std::size_t n, int threads);

float glibc_expf(float x);
// y[i] = glibc_expf(x[i]) (an FMA build of the loop where the CPU has it: the same bits, faster);
// expf_array splits the range between `threads` workers from 2^16 elements on.
void expf_span(const float* x, float* y, std::size_t n);
void expf_array(const float* x, float* y, std::size_t n, int threads);

// y[i] = powf(x[i], exponent) and y[i] = logf(x[i]): the machine's glibc, as Caffe's caffe_powx and caffe_log
// call them (BatchNorm's standard deviation, Power, Log). Not correctly rounded: powf(v, 0.5f) is an ulp off
// the square root in about 6 values in 10^4, and a float64 log rounded to float is an ulp off logf in about 5
// in 10^3.
void powf_array(const float* x, float* y, std::size_t n, float exponent, int threads);
void logf_array(const float* x, float* y, std::size_t n, int threads);
// y[i] = (float)(1. / (1. + (double)glibc_expf(-x[i]))): Caffe's CPU sigmoid<float> (sigmoid_layer.cpp,
// lstm_unit_layer.cpp), its literals doubles; one pass, `threads` workers from 2^16 values on.
void caffe_sigmoid_array(const float* x, float* y, std::size_t n, int threads);
// y[i] = x > 0 ? x + log(1. + expf(-x)) : log(1. + expf(x)) (bnll_layer.cpp: glibc's expf rounded to float, the
// rest in double, rounded once); one pass.
void caffe_bnll_array(const float* x, float* y, std::size_t n, int threads);

}  // namespace amct
