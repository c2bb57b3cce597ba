// amct_caffe caffe_patch: DeQuant layer (installed by caffe_patch/install.py).
// Semantics: amct_caffe/runtime/layers/amct.py (DeQuant, _dequant_kind) and docs/formats.md.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <vector>

#include "caffe/layers/amct_util.hpp"
#include "caffe/layers/dequant_layer.hpp"
#include "caffe/util/math_functions.hpp"

namespace caffe {

namespace {
const int kMinShiftBit = 1, kMaxShiftBit = 16;
const float kInt16Min = -32768.0f, kInt16Max = 32767.0f;

template <typename Dtype>
std::string Values(const Blob<Dtype>& blob) {
  std::ostringstream out;
  out << "[";
  for (int i = 0; i < blob.count(); ++i) out << (i ? ", " : "") << blob.cpu_data()[i];
  out << "]";
  return out.str();
}
}  // namespace

template <typename Dtype>
void DeQuantLayer<Dtype>::LayerSetUp(const vector<Blob<Dtype>*>& bottom,
                                     const vector<Blob<Dtype>*>& top) {
  CHECK_GE(bottom[0]->num_axes(), 2) << amct::Where(this->layer_param_)
      << "needs a bottom of at least 2 axes (N, C, ...), got " << bottom[0]->shape_string();
  if (this->blobs_.empty()) {  // an identity until a caffemodel provides the factors
    const int c = this->layer_param_.dequant_param().channel_wise() ? bottom[0]->shape(1) : 1;
    this->blobs_.resize(3);
    for (int i = 0; i < 3; ++i) {
      this->blobs_[i].reset(new Blob<Dtype>(vector<int>(1, c)));
      caffe_set(c, Dtype(i == 0 ? 1 : 0), this->blobs_[i]->mutable_cpu_data());
    }
  }
  this->param_propagate_down_.resize(this->blobs_.size(), false);
}

template <typename Dtype>
void DeQuantLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
                                  const vector<Blob<Dtype>*>& top) {
  // Called before every forward, so factors loaded from a caffemodel after SetUp are checked.
  const std::string where = amct::Where(this->layer_param_);
  CHECK_GE(bottom[0]->num_axes(), 2) << where
      << "needs a bottom of at least 2 axes (N, C, ...), got " << bottom[0]->shape_string();
  const int channels = bottom[0]->shape(1);
  CHECK_EQ(this->blobs_.size(), 3) << where << "DeQuant takes 3 float blobs [deq_scale, shift_bit, "
      "offset_w] (the packed uint64 blob of the deploy model cannot run in Caffe)";
  const char* names[3] = {"deq_scale", "shift_bit", "offset_w"};
  for (int i = 0; i < 3; ++i) {
    const int n = this->blobs_[i]->count();
    CHECK(n == 1 || n == channels) << where << names[i] << " has " << n
        << " values; the bottom has " << channels << " channels (give " << channels << " or 1)";
  }
  const Blob<Dtype>& deq = *this->blobs_[0];
  const Blob<Dtype>& shift = *this->blobs_[1];
  bool any = false, all_valid = true;
  for (int i = 0; i < shift.count(); ++i) {
    const double n = static_cast<double>(shift.cpu_data()[i]);
    any = any || n != 0;
    all_valid = all_valid && n >= kMinShiftBit && n <= kMaxShiftBit && n == std::floor(n);
  }
  shift_ = any;
  if (!shift_) return top[0]->ReshapeLike(*bottom[0]);
  CHECK(all_valid) << where << "shift_bit values must be all 0 or all integers in [" << kMinShiftBit
      << ", " << kMaxShiftBit << "] (mixed zero/non-zero is not allowed), got " << Values(shift);
  deq_.resize(deq.count());
  for (int i = 0; i < deq.count(); ++i) {
    deq_[i] = static_cast<float>(deq.cpu_data()[i]);
    CHECK(std::isfinite(deq_[i]) && deq_[i] > 0)
        << where << "deq_scale must be finite and > 0 to emulate the shift, got " << Values(deq);
  }
  pow2_.resize(shift.count());
  for (int i = 0; i < shift.count(); ++i) {
    pow2_[i] = std::ldexp(1.0f, static_cast<int>(shift.cpu_data()[i]));
  }
  top[0]->ReshapeLike(*bottom[0]);
}

template <typename Dtype>
void DeQuantLayer<Dtype>::Forward_cpu(const vector<Blob<Dtype>*>& bottom,
                                      const vector<Blob<Dtype>*>& top) {
  const Dtype* x = bottom[0]->cpu_data();
  Dtype* y = top[0]->mutable_cpu_data();
  const int count = bottom[0]->count();
  if (!shift_) {
    if (y != x) caffe_copy(count, x, y);
    return;
  }
  const int channels = bottom[0]->shape(1);
  const int inner = bottom[0]->count(2);
  const bool deq_per_channel = deq_.size() > 1, pow2_per_channel = pow2_.size() > 1;
  for (int i = 0; i < count; ++i) {
    const int c = (i / inner) % channels;
    const float deq = deq_[deq_per_channel ? c : 0];
    const float pow2 = pow2_[pow2_per_channel ? c : 0];
    // Each step is one float32 operation, as in the NumPy layer.
    float t = std::round(static_cast<float>(x[i]) / deq);
    t = std::min(std::max(std::round(t / pow2), kInt16Min), kInt16Max);
    const float scaled = t * deq;
    y[i] = static_cast<Dtype>(scaled * pow2);
  }
}

template <typename Dtype>
void DeQuantLayer<Dtype>::Backward_cpu(const vector<Blob<Dtype>*>& top,
                                       const vector<bool>& propagate_down,
                                       const vector<Blob<Dtype>*>& bottom) {
  if (propagate_down[0] && top[0] != bottom[0]) {
    caffe_copy(top[0]->count(), top[0]->cpu_diff(), bottom[0]->mutable_cpu_diff());
  }
}

INSTANTIATE_CLASS(DeQuantLayer);
REGISTER_LAYER_CLASS(DeQuant);

}  // namespace caffe
