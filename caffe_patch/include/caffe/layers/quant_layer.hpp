// amct_caffe caffe_patch: Quant and AntiQuant layers (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_QUANT_LAYER_HPP_
#define CAFFE_AMCT_QUANT_LAYER_HPP_

#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief Quant (quant_param): fake-quantizes its input in the fake-quant model.
 *
 * With scale_d = 1 / quant_param.scale (float32), offset_d = quant_param.offset,
 * b = quant_param.num_bits_d (default 8, range [8, 16]) and rounding halves away from zero:
 *   y = (clamp(round(x / scale_d) + offset_d, -2^(b-1), 2^(b-1)-1) - offset_d) * scale_d
 * computed by libquant (amct_fake_quant), the kernel the Python executor uses.
 * Backward is the identity (straight-through estimator).
 *
 * @param bottom input x, any shape
 * @param top    y, the shape of x
 */
template <typename Dtype>
class QuantLayer : public Layer<Dtype> {
 public:
  explicit QuantLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "Quant"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom);

  float scale_d_;
  int offset_d_;
  int num_bits_d_;
  std::vector<float> in_buffer_, out_buffer_;  // float32 copies when Dtype is double
};

/**
 * @brief AntiQuant (quant_param, unused): the identity; it marks where data leaves the quantized
 * domain (after a quantized layer without weights). Top shares bottom's data and diff.
 */
template <typename Dtype>
class AntiQuantLayer : public Layer<Dtype> {
 public:
  explicit AntiQuantLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "AntiQuant"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {}
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {}
};

}  // namespace caffe

#endif  // CAFFE_AMCT_QUANT_LAYER_HPP_
