// amct_caffe caffe_patch: SearchN calibration layer (installed by caffe_patch/install.py).
// Semantics, checks and messages: amct_caffe/runtime/layers/amct.py (SearchNLayer) and
// amct_caffe/quant/search_n.py; the error sums and the choice of n are libquant's.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "amct/capi.h"
#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/search_n_layer.hpp"

namespace caffe {

namespace {
const size_t kNumShiftBits = 16;

std::string List(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", '" : "'") + names[i] + "'";
  return out + "]";
}
}  // namespace

template <typename Dtype>
void SearchNLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                     const vector<Blob<Dtype>*>& top) {
  const SearchNParameter& p = this->layer_param_.search_n_param();
  const std::string where = amct::Where(this->layer_param_);
  CHECK_GE(p.batch_num(), 1) << where << "search_n_param.batch_num must be >= 1, got " << p.batch_num();
  CHECK(!p.record_file_path().empty()) << where << "search_n_param.record_file_path is empty";
  CHECK_GT(p.layer_name_size(), 0) << where << "search_n_param names no quantized layer";
  CHECK(p.layer_type_size() == 0 || p.layer_type_size() == p.layer_name_size())
      << where << "search_n_param gives " << p.layer_type_size() << " layer_type(s) for "
      << p.layer_name_size() << " layer_name(s)";
  layers_.assign(p.layer_name().begin(), p.layer_name().end());
  layer_types_.assign(layers_.size(), "");
  for (int i = 0; i < p.layer_type_size(); ++i) layer_types_[i] = p.layer_type(i);
  batch_num_ = static_cast<int>(p.batch_num());
  seen_ = 0;
  done_ = told_done_ = false;
}

template <typename Dtype>
void SearchNLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                                  const vector<Blob<Dtype>*>& top) {
  CHECK_GE(bottom[0]->num_axes(), 2) << amct::Where(this->layer_param_)
      << "needs a bottom of at least 2 axes (N, C, ...), got " << bottom[0]->shape_string();
}

template <typename Dtype>
void SearchNLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
                                      const vector<Blob<Dtype>*>& top) {
  const std::string& name = this->layer_param_.name();
  if (done_) {
    if (!told_done_) {
      VLOG(1) << "SearchN '" << name << "': already calibrated on " << batch_num_
              << " batch(es); further forwards are ignored";
      told_done_ = true;
    }
    return;
  }
  const Dtype* x = bottom[0]->cpu_data();
  batches_.push_back(std::vector<float>(x, x + bottom[0]->count()));
  shapes_.push_back(bottom[0]->shape());
  ++seen_;
  LOG(INFO) << "SearchN '" << name << "': batch " << seen_ << "/" << batch_num_ << " recorded";
  if (seen_ == batch_num_) {
    Finish();
    done_ = true;
    std::vector<std::vector<float> >().swap(batches_);
    shapes_.clear();
  }
}

template <typename Dtype>
std::string SearchNLayer<Dtype>::Missing(const std::string& what, const std::string& layer,
                                         const std::string& why) const {
  return "Cannot find " + what + " of layer '" + layer + "' in record file " +
         this->layer_param_.search_n_param().record_file_path() + why + " (SearchN layer '" +
         this->layer_param_.name() + "'); run the calibration for batch_num batches first";
}

template <typename Dtype>
void SearchNLayer<Dtype>::Finish() {
  const std::string& path = this->layer_param_.search_n_param().record_file_path();
  const std::string& name = this->layer_param_.name();
  ScaleOffsetRecord record;
  if (!amct::ReadRecord(path, &record)) {
    LOG(FATAL) << Missing("scale_d", layers_[0], " (the file does not exist)");
  }
  // deq = scale_w * scale_d of every named layer (amct.py SearchNLayer._deq).
  const std::vector<int>& shape = shapes_[0];
  const int channels = shape[1];
  std::vector<std::vector<float> > deqs;
  float scale_d = 0;
  size_t n_w = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    SingleLayerRecord* entry = amct::LayerEntry(&record, layers_[i], false);
    ActivationQuantParam* act = entry ? amct::ActivationEntry(entry, 0, false) : NULL;
    if (act == NULL || !act->has_scale_d()) LOG(FATAL) << Missing("scale_d", layers_[i], "");
    if (entry->scale_w_size() == 0) LOG(FATAL) << Missing("scale_w", layers_[i], "");
    const int size = entry->scale_w_size();
    CHECK(layer_types_[i] != "InnerProduct" || size == 1) << "SearchN layer '" << name
        << "': InnerProduct '" << layers_[i] << "' must have one scale_w (C = 1), the record has " << size;
    CHECK(size == 1 || size == channels) << "SearchN layer '" << name << "': '" << layers_[i] << "' has "
        << size << " scale_w in the record but its output has " << channels << " channels";
    const float sd = act->scale_d();
    std::vector<float> deq(size);
    for (int c = 0; c < size; ++c) deq[c] = entry->scale_w(c) * sd;  // a float32 product
    if (i == 0) {
      scale_d = sd;
      n_w = size;
    }
    deqs.push_back(deq);
  }
  for (size_t i = 1; i < deqs.size(); ++i) {
    CHECK(deqs[i] == deqs[0]) << "SearchN layer '" << name << "': layers " << List(layers_)
        << " share one output but their deq_scale = scale_w * scale_d differ";
  }
  std::vector<float> deq = deqs[0];
  long long spatial = shape.size() > 2 ? 1 : 0;  // NOLINT(runtime/int)
  for (size_t a = 2; a < shape.size(); ++a) spatial *= shape[a];
  bool is_global = deq.size() > 1 && spatial == 1;
  for (size_t i = 0; i < layer_types_.size(); ++i) is_global = is_global && layer_types_[i] != "InnerProduct";
  if (is_global) deq.assign(1, *std::max_element(deq.begin(), deq.end()));
  for (size_t c = 0; c < deq.size(); ++c) {
    CHECK(std::isfinite(deq[c]) && deq[c] > 0)
        << amct::Where(this->layer_param_) << "SearchN: deq_scale must be finite and > 0";
  }
  // Exact error sums over the batches, then the best n per searched channel.
  const size_t k = deq.size();
  std::vector<uint64_t> err_hi(k * kNumShiftBits, 0), err_lo(k * kNumShiftBits, 0);
  for (size_t b = 0; b < batches_.size(); ++b) {
    const size_t batch = static_cast<size_t>(shapes_[b][0]);
    const size_t inner = batches_[b].size() / (batch * k);
    amct::CheckQuant(amct_search_n_accumulate(batches_[b].data(), batch, k, inner, deq.data(),
                                              err_hi.data(), err_lo.data()), this->layer_param_);
  }
  std::vector<int> best(k);
  amct::CheckQuant(amct_search_n_select(err_hi.data(), err_lo.data(), k, best.data()), this->layer_param_);
  std::vector<int> shift(n_w, best[0]);
  if (k > 1) shift = best;
  for (size_t i = 0; i < layers_.size(); ++i) {
    SingleLayerRecord* entry = amct::LayerEntry(&record, layers_[i], false);
    if (is_global) {  // searched as one channel: every channel dequantizes with max(deq)
      entry->clear_scale_w();
      for (size_t c = 0; c < n_w; ++c) entry->add_scale_w(deq[0] / scale_d);
    }
    entry->clear_shift_bit();
    for (size_t c = 0; c < shift.size(); ++c) entry->add_shift_bit(shift[c]);
  }
  amct::WriteRecord(record, path);
  std::ostringstream shifts;
  for (size_t c = 0; c < shift.size(); ++c) shifts << (c ? ", " : "[") << shift[c];
  shifts << "]";
  LOG(INFO) << "SearchN '" << name << "': shift_bit=" << shifts.str() << " written for " << List(layers_)
            << (is_global ? " (global conv: searched as one channel, scale_w rewritten)" : "");
}

INSTANTIATE_CLASS(SearchNLayer);
REGISTER_LAYER_CLASS(SearchN);

}  // namespace caffe
