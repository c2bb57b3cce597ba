// ARQ weight quantization and int32 bias quantization (math: amct_caffe/quant/arq.py, bias.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace amct {

// The weight viewed as [groups, rows, channels, inner]; element (g, a, c, b) belongs to output
// channel g*channels + c. Convolution/DepthwiseConv [Cout, Cin/G, kh, kw]: {1, 1, Cout, Cin/G*kh*kw};
// Deconvolution [Cin, Cout/G, kh, kw]: {G, Cin/G, Cout/G, kh*kw}; InnerProduct: {1, 1, Cout, Cin}.
struct ArqLayout {
  std::size_t groups = 1, rows = 1, channels = 1, inner = 1;
  std::size_t out_channels() const { return groups * channels; }
  std::size_t size() const { return groups * rows * channels * inner; }
};

// Symmetric scales: per output channel (scale/offset have out_channels() entries) or one for
// the tensor. t = |max| > |min| ? max : min;  scale = t > 0 ? t/(2^(b-1)-1) : t/(-2^(b-1));
// then process_scale. offset = 0. num_bits in [2, 8]. Throws on NaN ("ArqQuant ...").
void arq_scales(const float* w, const ArqLayout& layout, bool channel_wise, int num_bits,
                float* scale, int* offset);

// q = clamp(round(w / scale[ch]) + offset[ch]); optional fake = (q - offset) * scale.
void arq_quantize(const float* w, const ArqLayout& layout, bool channel_wise, int num_bits,
                  const float* scale, const int* offset, std::int8_t* q, float* fake);

// bias_q[c] = round(f64(b[c]) / f64(float32(scale_w[c or 0] * scale_d))), must fit in int32.
void quantize_bias(const float* bias, std::size_t n, const float* scale_w, std::size_t n_scale_w,
                   float scale_d, std::int32_t* out);

}  // namespace amct
