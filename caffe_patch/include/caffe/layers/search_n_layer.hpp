// amct_caffe caffe_patch: SearchN calibration layer (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_SEARCH_N_LAYER_HPP_
#define CAFFE_AMCT_SEARCH_N_LAYER_HPP_

#include <string>
#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief SearchN (search_n_param): shift-bit search for the quantized layers layer_name[] that
 * share the observed output blob.
 *
 * Keeps the first batch_num batches (deq needs scale_d, which the IFMR layers of the same run
 * write only at their last batch), then reads the record: every named layer needs scale_w and
 * record_d index 0, the same number of scale_w (1 or C) and the same deq = scale_w * scale_d
 * (float32). An InnerProduct has one scale_w. A "global" convolution (C > 1, 1x1 output) is
 * searched as one channel with max(deq), and its scale_w is rewritten to max(deq) / scale_d.
 * The exact per-channel errors (libquant amct_search_n_accumulate, 128-bit sums) pick n in
 * [1, 16], the smallest on ties; shift_bit gets one value per scale_w in every named entry.
 *
 * @param bottom the quantized layer's float output, (N, C, ...)
 * (no top)
 */
template <typename Dtype>
class SearchNLayer : public Layer<Dtype> {
 public:
  explicit SearchNLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "SearchN"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 0; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {}

  void Finish();
  std::string Missing(const std::string& what, const std::string& layer, const std::string& why) const;

  std::vector<std::string> layers_, layer_types_;
  int batch_num_, seen_;
  bool done_, told_done_;
  std::vector<std::vector<int> > shapes_;
  std::vector<std::vector<float> > batches_;
};

}  // namespace caffe

#endif  // CAFFE_AMCT_SEARCH_N_LAYER_HPP_
