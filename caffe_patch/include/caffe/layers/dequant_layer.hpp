// amct_caffe caffe_patch: DeQuant layer (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_DEQUANT_LAYER_HPP_
#define CAFFE_AMCT_DEQUANT_LAYER_HPP_

#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief DeQuant (dequant_param) of the fake-quant model, after a quantized Convolution,
 * Deconvolution or InnerProduct.
 *
 * Blobs: [0] deq_scale = scale_w * scale_d, [1] shift_bit, [2] offset_w, each of C values
 * (channel axis 1) or one; a new layer gets shape (C,) when channel_wise else (1,), filled with
 * deq_scale = 1, shift_bit = 0, offset_w = 0. When every shift_bit is 0 the layer is the identity
 * (the layer before it already ran on fake-quantized weights and input). When every shift_bit n
 * is an integer in [1, 16] it emulates the hardware's int16 requantization, rounding halves away
 * from zero, in float32:
 *   t = round(x / deq[c]);  t = clamp(round(t / 2^n[c]), -32768, 32767);  y = t * deq[c] * 2^n[c]
 * Backward is the identity. The deploy model's single packed uint64 blob cannot be held by a
 * Caffe Blob; that model is for the SoC compiler (the Python executor simulates it).
 *
 * @param bottom x, (N, C, ...)
 * @param top    y, the shape of x
 */
template <typename Dtype>
class DeQuantLayer : public Layer<Dtype> {
 public:
  explicit DeQuantLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "DeQuant"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom);

  bool shift_;                     // false: identity
  std::vector<float> deq_, pow2_;  // float32 deq_scale and 2^shift_bit, C or 1 values each
};

}  // namespace caffe

#endif  // CAFFE_AMCT_DEQUANT_LAYER_HPP_
