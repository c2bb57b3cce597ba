// amct_caffe caffe_patch: IFMR calibration layer (installed by caffe_patch/install.py).
// Semantics, checks and messages: amct_caffe/runtime/layers/amct.py (IfmrLayer, _Collector) and
// amct_caffe/quant/ifmr.py (IfmrParams, IfmrObserver); the search itself is libquant's.
#include <cmath>
#include <string>
#include <vector>

#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/ifmr_layer.hpp"

namespace caffe {

template <typename Dtype>
const char* IFMRLayer<Dtype>::ErrorName() const {
  return settings_.with_offset ? "IfmrQuantWithOffset" : "IfmrQuantWithoutOffset";
}

template <typename Dtype>
void IFMRLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                  const vector<Blob<Dtype>*>& top) {
  const IFMRParameter& p = this->layer_param_.ifmr_param();
  settings_ = amct::ReadIfmrSettings(p, this->layer_param_);
  CHECK(p.index_size() == 0 || p.index_size() == p.object_layer_size())
      << amct::Where(this->layer_param_) << "ifmr_param gives " << p.index_size() << " index value(s) for "
      << p.object_layer_size() << " object_layer(s); give one per object_layer or none";
  targets_.clear();
  for (int i = 0; i < p.object_layer_size(); ++i) {
    targets_.push_back(std::make_pair(p.object_layer(i), p.index_size() ? int(p.index(i)) : 0));
  }
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
      VLOG(1) << "IFMR '" << name << "': already calibrated on " << settings_.batch_num
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
  LOG(INFO) << "IFMR '" << name << "': batch " << seen_ << "/" << settings_.batch_num << " recorded";
  if (seen_ == settings_.batch_num) {
    Finish();
    done_ = true;
    std::vector<std::vector<float> >().swap(batches_);  // free the collected data
  }
}

template <typename Dtype>
void IFMRLayer<Dtype>::Finish() {
  float scale = 0;
  int offset = 0;
  amct::IfmrSearch(settings_, batches_, this->layer_param_, &scale, &offset);
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
    act->set_num_bits_d(settings_.num_bits);
    act->set_channels(c);
    act->set_height(h);
    act->set_width(w);
    names += (i ? ", '" : "'") + targets_[i].first + "'";
  }
  amct::WriteRecord(record, path);
  LOG(INFO) << "IFMR '" << this->layer_param_.name() << "': scale_d=" << amct::FloatText(scale) << " offset_d="
            << offset << " written for [" << names << "]";
  for (size_t i = 0; i < targets_.size(); ++i) {  // the guide's completion line (FAQ "Cannot find scale_d")
    LOG(INFO) << "Do layer '" << targets_[i].first << "' activation calibration success!";
  }
}

INSTANTIATE_CLASS(IFMRLayer);
REGISTER_LAYER_CLASS(IFMR);

}  // namespace caffe
