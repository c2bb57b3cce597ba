// amct_caffe caffe_patch: BNUpdate layer of update_bn (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_BN_UPDATE_LAYER_HPP_
#define CAFFE_AMCT_BN_UPDATE_LAYER_HPP_

#include <stdint.h>

#include <string>
#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief BNUpdate (bn_update_param): refreshes the statistics of BatchNorm bn_layer behind the
 * quantized weights of the calibration model (update_bn).
 *
 * Blobs: mean (C,), variance (C,), moving-average factor (1,), copies of the BatchNorm's. On each
 * of the first `iterations` forwards the layer applies Caffe's BatchNorm moving-average update
 * (batch_norm_layer.cpp with use_global_stats false, the same BLAS calls in the same order, so the
 * blobs are bit for bit those a training-mode BatchNorm would hold):
 *   factor = factor * f + 1; mean = batch_mean + f * mean; variance = m/(m-1) * batch_var + f * variance
 * (f = moving_average_fraction, m = count / C). After the last one it writes
 * <dump_dir>/<bn_layer with '/' -> '_'>.npz (NumPy's savez layout, stored) holding
 * mean = blobs[0] / factor and var = blobs[1] / factor (float32, (C,)), bn_layer (a 0-d unicode
 * array) and iterations (a 0-d int64 array), atomically. Later forwards do nothing.
 * Semantics, checks and messages: amct_caffe/runtime/layers/amct.py (BnUpdateLayer).
 *
 * @param bottom the BatchNorm's input, (N, C, ...) or (N,)
 * (no top)
 */
template <typename Dtype>
class BNUpdateLayer : public Layer<Dtype> {
 public:
  explicit BNUpdateLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "BNUpdate"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 0; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {}

  void Dump();

  std::string bn_layer_, dump_file_;
  uint32_t iterations_, seen_;
  Dtype fraction_;
  int channels_;
  // BatchNorm's work blobs, same names and roles (batch_norm_layer.hpp).
  Blob<Dtype> mean_, variance_, temp_;
  Blob<Dtype> batch_sum_multiplier_, num_by_chans_, spatial_sum_multiplier_;
};

}  // namespace caffe

#endif  // CAFFE_AMCT_BN_UPDATE_LAYER_HPP_
