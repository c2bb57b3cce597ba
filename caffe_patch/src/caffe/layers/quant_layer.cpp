// amct_caffe caffe_patch: Quant and AntiQuant layers (installed by caffe_patch/install.py).
// Semantics: amct_caffe/runtime/layers/amct.py (Quant, AntiQuant) and docs/formats.md.
#include <cmath>
#include <vector>

#include "amct/capi.h"
#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/quant_layer.hpp"
#include "caffe/util/math_functions.hpp"

namespace caffe {

template <typename Dtype>
void QuantLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                   const vector<Blob<Dtype>*>& top) {
  const QuantParameter& qp = this->layer_param_.quant_param();
  const std::string where = amct::Where(this->layer_param_);
  num_bits_d_ = qp.has_num_bits_d() ? qp.num_bits_d() : 8;
  CHECK(num_bits_d_ >= 8 && num_bits_d_ <= 16)
      << where << "num_bits_d must be in [8, 16], got " << num_bits_d_;
  const float scale = qp.scale();
  CHECK(std::isfinite(scale) && scale > 0)
      << where << "quant_param.scale (= 1/scale_d) must be finite and > 0, got " << scale;
  scale_d_ = static_cast<float>(1.0 / static_cast<double>(scale));
  CHECK(std::isfinite(scale_d_) && scale_d_ > 0)
      << where << "scale_d = 1/quant_param.scale = 1/" << scale << " is not a finite float32 > 0";
  offset_d_ = qp.offset();
  const int lo = -(1 << (num_bits_d_ - 1)), hi = (1 << (num_bits_d_ - 1)) - 1;
  CHECK(offset_d_ >= lo && offset_d_ <= hi) << where << "quant_param.offset " << offset_d_
      << " is outside [" << lo << ", " << hi << "] for " << num_bits_d_ << " bits";
  if (!qp.with_offset() && offset_d_ != 0) {
    LOG(WARNING) << "layer '" << this->layer_param_.name() << "' (Quant): with_offset is false but "
                 << "offset is " << offset_d_ << "; using the offset";
  }
}

template <typename Dtype>
void QuantLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                                const vector<Blob<Dtype>*>& top) {
  top[0]->ReshapeLike(*bottom[0]);
}

template <typename Dtype>
void QuantLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
                                    const vector<Blob<Dtype>*>& top) {
  const size_t n = bottom[0]->count();
  const float* in = amct::AsFloat(bottom[0]->cpu_data(), n, &in_buffer_);
  Dtype* y = top[0]->mutable_cpu_data();
  if (sizeof(Dtype) == sizeof(float)) {
    amct::CheckQuant(amct_fake_quant(in, reinterpret_cast<float*>(y), n, scale_d_, offset_d_,
                                     num_bits_d_), this->layer_param_);
    return;
  }
  out_buffer_.resize(n);
  amct::CheckQuant(amct_fake_quant(in, out_buffer_.data(), n, scale_d_, offset_d_, num_bits_d_),
                   this->layer_param_);
  for (size_t i = 0; i < n; ++i) y[i] = static_cast<Dtype>(out_buffer_[i]);
}

template <typename Dtype>
void QuantLayer<Dtype>::Backward_cpu(const vector<Blob<Dtype>*>& top,
                                     const vector<bool>& propagate_down,
                                     const vector<Blob<Dtype>*>& bottom) {
  if (propagate_down[0]) {
    caffe_copy(top[0]->count(), top[0]->cpu_diff(), bottom[0]->mutable_cpu_diff());
  }
}

template <typename Dtype>
void AntiQuantLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                                    const vector<Blob<Dtype>*>& top) {
  CHECK_NE(top[0], bottom[0]) << this->type() << " Layer does not allow in-place computation.";
  top[0]->ReshapeLike(*bottom[0]);
  top[0]->ShareData(*bottom[0]);
  top[0]->ShareDiff(*bottom[0]);
}

INSTANTIATE_CLASS(QuantLayer);
REGISTER_LAYER_CLASS(Quant);
INSTANTIATE_CLASS(AntiQuantLayer);
REGISTER_LAYER_CLASS(AntiQuant);

}  // namespace caffe
