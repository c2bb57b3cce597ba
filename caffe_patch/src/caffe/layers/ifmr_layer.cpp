// amct_caffe caffe_patch: IFMR calibration layer (installed by caffe_patch/install.py).
// Semantics, checks and messages: amct_caffe/runtime/layers/amct.py (IfmrLayer, _Collector) and
// amct_caffe/quant/ifmr.py (IfmrParams, IfmrObserver); the search itself is libquant's.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "amct/capi.h"
#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/ifmr_layer.hpp"

namespace caffe {

template <typename Dtype>
const char* IFMRLayer<Dtype>::ErrorName() const {
  return with_offset_ ? "IfmrQuantWithOffset" : "IfmrQuantWithoutOffset";
}

template <typename Dtype>
void IFMRLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                  const vector<Blob<Dtype>*>& top) {
  const IFMRParameter& p = this->layer_param_.ifmr_param();
  const std::string where = amct::Where(this->layer_param_);
  CHECK_GE(p.batch_num(), 1) << where << "ifmr_param.batch_num must be >= 1, got " << p.batch_num();
  CHECK(!p.record_file_path().empty()) << where << "ifmr_param.record_file_path is empty";
  CHECK_GT(p.object_layer_size(), 0) << where << "ifmr_param names no quantized layer";
  CHECK(p.index_size() == 0 || p.index_size() == p.object_layer_size())
      << where << "ifmr_param gives " << p.index_size() << " index value(s) for "
      << p.object_layer_size() << " object_layer(s); give one per object_layer or none";
  targets_.clear();
  for (int i = 0; i < p.object_layer_size(); ++i) {
    targets_.push_back(std::make_pair(p.object_layer(i), p.index_size() ? int(p.index(i)) : 0));
  }
  batch_num_ = static_cast<int>(p.batch_num());
  num_bits_ = static_cast<int>(p.num_bits());
  with_offset_ = p.with_offset();
  max_percentile_ = amct::ProtoFloat(p.max_percentile());
  min_percentile_ = amct::ProtoFloat(p.min_percentile());
  start_ = amct::ProtoFloat(p.search_range_start());
  end_ = amct::ProtoFloat(p.search_range_end());
  step_ = amct::ProtoFloat(p.search_step());
  // The checks of amct_caffe.quant.IfmrParams, on the same decimal values.
  CHECK(num_bits_ >= 8 && num_bits_ <= 16) << where
      << "IFMR activation_quant_params: num_bits must be an integer in [8, 16], got " << num_bits_;
  CHECK(max_percentile_ > 0.5 && max_percentile_ <= 1.0)
      << where << "IFMR max_percentile must be in (0.5, 1], got " << max_percentile_;
  CHECK(min_percentile_ > 0.5 && min_percentile_ <= 1.0)
      << where << "IFMR min_percentile must be in (0.5, 1], got " << min_percentile_;
  CHECK(0 < start_ && start_ < end_) << where << "IFMR search_range must satisfy 0 < start < end, got ["
      << start_ << ", " << end_ << "]";
  CHECK(0 < step_ && step_ <= end_ - start_) << where << "IFMR search_step must be in (0, "
      << end_ - start_ << "] (end - start), got " << step_;
  seen_ = 0;
  done_ = told_done_ = false;
}

template <typename Dtype>
void IFMRLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                               const vector<Blob<Dtype>*>& top) {
  CHECK_GE(bottom[0]->num_axes(), 2) << amct::Where(this->layer_param_)
      << "needs a bottom of at least 2 axes (N, C, ...), got " << bottom[0]->shape_string();
}

template <typename Dtype>
void IFMRLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
                                   const vector<Blob<Dtype>*>& top) {
  const std::string& name = this->layer_param_.name();
  if (done_) {
    if (!told_done_) {
      VLOG(1) << "IFMR '" << name << "': already calibrated on " << batch_num_
              << " batch(es); further forwards are ignored";
      told_done_ = true;
    }
    return;
  }
  const std::string where = amct::Where(this->layer_param_);
  const std::vector<int>& shape = bottom[0]->shape();
  if (batches_.empty()) {
    shape_ = shape;
  } else {
    const std::vector<int> before(shape_.begin() + 1, shape_.end()), now(shape.begin() + 1, shape.end());
    CHECK(before == now) << where << "IfmrObserver: sample shapes changed from "
        << amct::ShapeString(before) << " to " << amct::ShapeString(now);
  }
  const Dtype* x = bottom[0]->cpu_data();
  const int n = bottom[0]->count();
  for (int i = 0; i < n; ++i) {
    CHECK(std::isfinite(x[i])) << where << ErrorName() << " scale is illegal: input data contains inf or NaN";
  }
  batches_.push_back(std::vector<float>(x, x + n));
  ++seen_;
  LOG(INFO) << "IFMR '" << name << "': batch " << seen_ << "/" << batch_num_ << " recorded";
  if (seen_ == batch_num_) {
    Finish();
    done_ = true;
    std::vector<std::vector<float> >().swap(batches_);  // free the collected data
  }
}

template <typename Dtype>
void IFMRLayer<Dtype>::Finish() {
  std::vector<const float*> chunks;
  std::vector<size_t> sizes;
  for (size_t i = 0; i < batches_.size(); ++i) {  // one chunk per batch, as the Python observer
    chunks.push_back(batches_[i].data());
    sizes.push_back(batches_[i].size());
  }
  float scale = 0;
  int offset = 0, best = 0;
  amct::CheckQuant(amct_ifmr_search(chunks.data(), sizes.data(), chunks.size(), num_bits_,
                                    with_offset_ ? 1 : 0, max_percentile_, min_percentile_, start_,
                                    end_, step_, &scale, &offset, &best), this->layer_param_);
  int c, h, w;
  amct::ChannelsHeightWidth(shape_, &c, &h, &w);
  const std::string& path = this->layer_param_.ifmr_param().record_file_path();
  ScaleOffsetRecord record;
  amct::ReadRecord(path, &record);
  std::string names;
  for (size_t i = 0; i < targets_.size(); ++i) {
    SingleLayerRecord* entry = amct::LayerEntry(&record, targets_[i].first, true);
    ActivationQuantParam* act = amct::ActivationEntry(entry, targets_[i].second, true);
    act->set_scale_d(scale);
    act->set_offset_d(offset);
    act->set_num_bits_d(num_bits_);
    act->set_channels(c);
    act->set_height(h);
    act->set_width(w);
    names += (i ? ", '" : "'") + targets_[i].first + "'";
  }
  amct::WriteRecord(record, path);
  char scale_text[32];
  snprintf(scale_text, sizeof(scale_text), "%.9g", scale);
  LOG(INFO) << "IFMR '" << this->layer_param_.name() << "': scale_d=" << scale_text << " offset_d="
            << offset << " written for [" << names << "]";
  for (size_t i = 0; i < targets_.size(); ++i) {  // the guide's completion line (FAQ "Cannot find scale_d")
    LOG(INFO) << "Do layer '" << targets_[i].first << "' activation calibration success!";
  }
}

INSTANTIATE_CLASS(IFMRLayer);
REGISTER_LAYER_CLASS(IFMR);

}  // namespace caffe
