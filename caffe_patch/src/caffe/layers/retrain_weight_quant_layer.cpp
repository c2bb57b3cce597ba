// amct_caffe caffe_patch: RetrainWeightQuant layer, ARQ retrain (installed by caffe_patch/install.py).
// Semantics: amct_caffe/quant/arq.py (arq_layout, arq_retrain_forward, arq_retrain_backward).
#include <string>
#include <vector>

#include "amct/capi.h"
#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/retrain_weight_quant_layer.hpp"
#include "caffe/util/math_functions.hpp"

namespace caffe {

template <typename Dtype>
void RetrainWeightQuantLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                                const vector<Blob<Dtype>*>& top) {
  const RetrainWeightQuantParameter& p = this->layer_param_.retrain_weight_quant_param();
  const std::string where = amct::Where(this->layer_param_);
  const std::string& type = p.layer_type();
  CHECK(type == "Convolution" || type == "DepthwiseConv" || type == "Deconvolution" || type == "InnerProduct")
      << where << "ARQ supports layer types ('Convolution', 'DepthwiseConv', 'Deconvolution', "
      << "'InnerProduct'), got '" << type << "' (retrain_weight_quant_param.layer_type)";
  channel_wise_ = p.channel_wise();
  CHECK(!(type == "InnerProduct" && channel_wise_))
      << where << "InnerProduct supports only channel_wise=false for weight quantization";
  CHECK(!p.with_offset()) << where << "ARQ retrain is symmetric (offset_w = 0); with_offset must be false";
  num_bits_ = static_cast<int>(p.num_bits());
  CHECK(num_bits_ >= 2 && num_bits_ <= 8) << where
      << "ARQ weight_quant_params: num_bits must be an integer in [2, 8], got " << p.num_bits();
  shape_.clear();
  shape_.push_back(static_cast<int>(p.cout()));
  shape_.push_back(static_cast<int>(p.cin()));
  if (p.has_h() && p.has_w()) {
    shape_.push_back(static_cast<int>(p.h()));
    shape_.push_back(static_cast<int>(p.w()));
  }
  for (size_t i = 0; i < shape_.size(); ++i) {
    CHECK_GT(shape_[i], 0) << where << "weight shape " << amct::ShapeString(shape_)
                           << " (cout, cin[, h, w]) must be positive";
  }
  size_t inner = 1;
  for (size_t i = 2; i < shape_.size(); ++i) inner *= shape_[i];
  if (type == "Deconvolution") {  // [Cin, Cout, kh, kw], group 1
    groups_ = 1;
    rows_ = shape_[0];
    channels_ = shape_[1];
    inner_ = inner;
  } else {  // [Cout, Cin/G, ...]
    groups_ = 1;
    rows_ = 1;
    channels_ = shape_[0];
    inner_ = shape_[1] * inner;
  }
  if (this->blobs_.empty()) {
    this->blobs_.resize(2);
    for (int i = 0; i < 2; ++i) this->blobs_[i].reset(new Blob<Dtype>(shape_));  // zeros
  }
  this->param_propagate_down_.resize(this->blobs_.size(), true);
  started_ = false;
}

template <typename Dtype>
void RetrainWeightQuantLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                                             const vector<Blob<Dtype>*>& top) {
  const std::string where = amct::Where(this->layer_param_);
  CHECK_EQ(this->blobs_.size(), 2) << where << "takes 2 blobs [fake-quantized weight, float weight]";
  for (int i = 0; i < 2; ++i) {
    CHECK(this->blobs_[i]->shape() == shape_) << where << "blob " << i << " has shape "
        << amct::ShapeString(this->blobs_[i]->shape()) << "; retrain_weight_quant_param gives "
        << amct::ShapeString(shape_);
  }
  if (top[0] != bottom[0]) {
    top[0]->ReshapeLike(*bottom[0]);
    top[0]->ShareData(*bottom[0]);
    top[0]->ShareDiff(*bottom[0]);
  }
}

template <typename Dtype>
void RetrainWeightQuantLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
                                                 const vector<Blob<Dtype>*>& top) {
  Blob<Dtype>& fake = *this->blobs_[0];
  Blob<Dtype>& weight = *this->blobs_[1];
  const size_t n = weight.count();
  if (!started_) {
    const Dtype* w = weight.cpu_data();
    bool zero = true;
    for (size_t i = 0; i < n && zero; ++i) zero = w[i] == Dtype(0);
    if (zero) {
      caffe_copy(static_cast<int>(n), fake.cpu_data(), weight.mutable_cpu_data());
      LOG(INFO) << amct::Where(this->layer_param_) << "float weights (blob 1) initialised from blob 0";
    }
    started_ = true;
  }
  const size_t n_scale = channel_wise_ ? groups_ * channels_ : 1;
  scale_.resize(n_scale);
  offset_.resize(n_scale);
  const float* w = amct::AsFloat(weight.cpu_data(), n, &w_);
  float* out;
  if (sizeof(Dtype) == sizeof(float)) {
    out = reinterpret_cast<float*>(fake.mutable_cpu_data());
  } else {
    fake_.resize(n);
    out = fake_.data();
  }
  amct::CheckQuant(amct_arq(w, groups_, rows_, channels_, inner_, channel_wise_ ? 1 : 0, num_bits_,
                            scale_.data(), offset_.data(), NULL, out), this->layer_param_);
  if (sizeof(Dtype) != sizeof(float)) {
    Dtype* dst = fake.mutable_cpu_data();
    for (size_t i = 0; i < n; ++i) dst[i] = static_cast<Dtype>(fake_[i]);
  }
}

template <typename Dtype>
void RetrainWeightQuantLayer<Dtype>::Backward_cpu(const vector<Blob<Dtype>*>& top,
                                                  const vector<bool>& propagate_down,
                                                  const vector<Blob<Dtype>*>& bottom) {
  // x's diff: top shares it (or is in place). The weight: straight through.
  if (this->param_propagate_down(1)) {
    caffe_copy(this->blobs_[1]->count(), this->blobs_[0]->cpu_diff(), this->blobs_[1]->mutable_cpu_diff());
  }
}

INSTANTIATE_CLASS(RetrainWeightQuantLayer);
REGISTER_LAYER_CLASS(RetrainWeightQuant);

}  // namespace caffe
