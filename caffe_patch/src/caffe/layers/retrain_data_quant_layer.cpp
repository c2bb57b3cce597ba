// amct_caffe caffe_patch: RetrainDataQuant layer, ULQ activation retrain (installed by caffe_patch/install.py).
// Semantics: amct_caffe/quant/ulq.py (UlqQuantizer, ulq_forward, ulq_backward); the kernels are libquant's.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "amct/capi.h"
#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/retrain_data_quant_layer.hpp"

namespace caffe {

namespace {
// IFMR settings of ifmr_init: the user guide's defaults (amct_caffe.quant.ifmr.IfmrParams).
const double kIfmrPercentile = 0.999999, kIfmrStart = 0.7, kIfmrEnd = 1.3, kIfmrStep = 0.01;

std::string Text(float value) {
  char text[32];
  snprintf(text, sizeof(text), "%.9g", value);
  return text;
}
}  // namespace

template <typename Dtype>
void RetrainDataQuantLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                              const vector<Blob<Dtype>*>& top) {
  const RetrainDataQuantParameter& p = this->layer_param_.retrain_data_quant_param();
  const std::string where = amct::Where(this->layer_param_);
  num_bits_ = static_cast<int>(p.num_bits());
  CHECK(num_bits_ >= 8 && num_bits_ <= 16) << where
      << "ULQ retrain_data_config: num_bits must be an integer in [8, 16], got " << p.num_bits();
  fixed_min_ = p.fixed_min();
  ifmr_init_ = p.ifmr_init();
  if (!p.with_offset()) {
    LOG(WARNING) << where << "with_offset is false, but ULQ quantizes the clip range "
                 << "asymmetrically (with an offset); with_offset is ignored";
  }
  CHECK(p.record_file_path().empty() || !p.object_layer().empty())
      << where << "record_file_path is set but object_layer (the layer whose record_d it fills) is empty";
  init_max_ = p.clip_max();
  init_min_ = fixed_min_ ? 0.0f : p.clip_min();
  if (this->blobs_.empty()) {
    this->blobs_.resize(2);
    const float init[2] = {init_max_, init_min_};
    for (int i = 0; i < 2; ++i) {
      this->blobs_[i].reset(new Blob<Dtype>(vector<int>(1, 1)));
      this->blobs_[i]->mutable_cpu_data()[0] = static_cast<Dtype>(init[i]);
    }
  } else {
    CHECK_EQ(this->blobs_.size(), 2) << where << "takes 2 blobs [clip_max, clip_min]";
  }
  this->param_propagate_down_.resize(this->blobs_.size(), true);
  started_ = false;
  written_ = false;
  x_saved_ = false;
  scale_ = 1.0f;
  offset_ = 0;
}

template <typename Dtype>
void RetrainDataQuantLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                                           const vector<Blob<Dtype>*>& top) {
  const std::string where = amct::Where(this->layer_param_);
  CHECK_EQ(this->blobs_.size(), 2) << where << "takes 2 blobs [clip_max, clip_min]";
  CHECK(this->blobs_[0]->count() == 1 && this->blobs_[1]->count() == 1)
      << where << "clip_max and clip_min must hold one value each, got "
      << this->blobs_[0]->count() << " and " << this->blobs_[1]->count();
  if (top[0] != bottom[0]) top[0]->ReshapeLike(*bottom[0]);
}

template <typename Dtype>
void RetrainDataQuantLayer<Dtype>::IfmrInit(const float* x, size_t n, float* clip_max, float* clip_min) {
  const float* chunks[1] = {x};
  const size_t sizes[1] = {n};
  float scale = 0;
  int offset = 0, best = 0;
  amct::CheckQuant(amct_ifmr_search(chunks, sizes, 1, num_bits_, 1, kIfmrPercentile, kIfmrPercentile,
                                    kIfmrStart, kIfmrEnd, kIfmrStep, &scale, &offset, &best),
                   this->layer_param_);
  const int qmin = -(1 << (num_bits_ - 1)), qmax = (1 << (num_bits_ - 1)) - 1;
  *clip_max = scale * static_cast<float>(qmax - offset);
  *clip_min = scale * static_cast<float>(qmin - offset);
  LOG(INFO) << amct::Where(this->layer_param_) << "ifmr_init: IFMR scale=" << Text(scale) << " offset="
            << offset << " -> clip_max=" << Text(*clip_max) << " clip_min=" << Text(*clip_min);
}

template <typename Dtype>
void RetrainDataQuantLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
                                               const vector<Blob<Dtype>*>& top) {
  const size_t n = bottom[0]->count();
  // x as float32; kept for the backward when top overwrites it (in place) or it is a conversion.
  x_saved_ = top[0] == bottom[0] || sizeof(Dtype) != sizeof(float);
  const float* x;
  if (x_saved_) {
    x_.assign(bottom[0]->cpu_data(), bottom[0]->cpu_data() + n);
    x = x_.data();
  } else {
    x = reinterpret_cast<const float*>(bottom[0]->cpu_data());
  }
  float cmax = static_cast<float>(this->blobs_[0]->cpu_data()[0]);
  float cmin = static_cast<float>(this->blobs_[1]->cpu_data()[0]);
  if (fixed_min_) cmin = 0.0f;
  if (!started_) {
    if (ifmr_init_ && cmax == init_max_ && cmin == init_min_) {
      IfmrInit(x, n, &cmax, &cmin);
      if (fixed_min_) cmin = 0.0f;
    }
    prev_max_ = cmax;
    prev_min_ = cmin;
    started_ = true;
  }
  amct::CheckQuant(amct_ulq_clip_check(&cmax, &cmin, &prev_max_, &prev_min_), this->layer_param_);
  this->blobs_[0]->mutable_cpu_data()[0] = static_cast<Dtype>(cmax);
  this->blobs_[1]->mutable_cpu_data()[0] = static_cast<Dtype>(cmin);
  clip_max_ = cmax;
  clip_min_ = cmin;
  amct::CheckQuant(amct_ulq_scale_offset(cmax, cmin, num_bits_, &scale_, &offset_), this->layer_param_);
  Dtype* y = top[0]->mutable_cpu_data();
  if (sizeof(Dtype) == sizeof(float)) {
    amct::CheckQuant(amct_fake_quant(x, reinterpret_cast<float*>(y), n, scale_, offset_, num_bits_),
                     this->layer_param_);
  } else {
    y_.resize(n);
    amct::CheckQuant(amct_fake_quant(x, y_.data(), n, scale_, offset_, num_bits_), this->layer_param_);
    for (size_t i = 0; i < n; ++i) y[i] = static_cast<Dtype>(y_[i]);
  }
  if (this->phase_ == TEST && !this->layer_param_.retrain_data_quant_param().record_file_path().empty()) {
    WriteRecord(*bottom[0]);
  }
}

template <typename Dtype>
void RetrainDataQuantLayer<Dtype>::WriteRecord(const Blob<Dtype>& bottom) {
  if (written_ && written_scale_ == scale_ && written_offset_ == offset_) return;
  const RetrainDataQuantParameter& p = this->layer_param_.retrain_data_quant_param();
  int c, h, w;
  amct::ChannelsHeightWidth(bottom.shape(), &c, &h, &w);
  ScaleOffsetRecord record;
  amct::ReadRecord(p.record_file_path(), &record);
  SingleLayerRecord* entry = amct::LayerEntry(&record, p.object_layer(), true);
  ActivationQuantParam* act = amct::ActivationEntry(entry, 0, true);
  act->set_scale_d(scale_);
  act->set_offset_d(offset_);
  act->set_num_bits_d(num_bits_);
  act->set_channels(c);
  act->set_height(h);
  act->set_width(w);
  amct::WriteRecord(record, p.record_file_path());
  written_ = true;
  written_scale_ = scale_;
  written_offset_ = offset_;
  LOG(INFO) << "RetrainDataQuant '" << this->layer_param_.name() << "': scale_d=" << Text(scale_)
            << " offset_d=" << offset_ << " written for '" << p.object_layer() << "'";
}

template <typename Dtype>
void RetrainDataQuantLayer<Dtype>::Backward_cpu(const vector<Blob<Dtype>*>& top,
                                                const vector<bool>& propagate_down,
                                                const vector<Blob<Dtype>*>& bottom) {
  const bool grad_max = this->param_propagate_down(0);
  const bool grad_min = this->param_propagate_down(1) && !fixed_min_;
  if (!propagate_down[0] && !grad_max && !grad_min) return;
  const size_t n = top[0]->count();
  const float* x = x_saved_ ? x_.data() : reinterpret_cast<const float*>(bottom[0]->cpu_data());
  CHECK_EQ(x_saved_ ? x_.size() : static_cast<size_t>(bottom[0]->count()), n)
      << amct::Where(this->layer_param_) << "backward without a matching forward";
  const float* g = amct::AsFloat(top[0]->cpu_diff(), n, &g_);
  gx_.resize(n);  // not written into the diff directly: in place, top's diff is bottom's
  double dmax = 0.0, dmin = 0.0;
  amct::CheckQuant(amct_ulq_backward(x, g, gx_.data(), n, clip_max_, clip_min_, scale_, offset_,
                                     num_bits_, &dmax, &dmin), this->layer_param_);
  if (propagate_down[0]) {
    Dtype* dx = bottom[0]->mutable_cpu_diff();
    for (size_t i = 0; i < n; ++i) dx[i] = static_cast<Dtype>(gx_[i]);
  }
  if (grad_max) this->blobs_[0]->mutable_cpu_diff()[0] += static_cast<Dtype>(dmax);
  if (grad_min) this->blobs_[1]->mutable_cpu_diff()[0] += static_cast<Dtype>(dmin);
}

INSTANTIATE_CLASS(RetrainDataQuantLayer);
REGISTER_LAYER_CLASS(RetrainDataQuant);

}  // namespace caffe
