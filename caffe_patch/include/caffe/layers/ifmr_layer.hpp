// amct_caffe caffe_patch: IFMR calibration layer (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_IFMR_LAYER_HPP_
#define CAFFE_AMCT_IFMR_LAYER_HPP_

#include <string>
#include <utility>
#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/layers/amct_util.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief IFMR (ifmr_param): activation calibration of the calibration model.
 *
 * Keeps a float32 copy of its bottom on each of the first batch_num forwards, then runs the IFMR
 * search (libquant amct_ifmr_search: percentile start points, candidates search_range_start ..
 * search_range_end by search_step, least squared quantization error) and writes scale_d,
 * offset_d, num_bits_d, channels, height, width into record_d (input `index`) of every
 * object_layer of the record file record_file_path (a ScaleOffsetRecord in protobuf text
 * format, read, updated and replaced atomically). Later forwards do nothing.
 *
 * @param bottom the observed blob, (N, C, ...); the sample shape must not change between batches
 * (no top)
 */
template <typename Dtype>
class IFMRLayer : public Layer<Dtype> {
 public:
  explicit IFMRLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "IFMR"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 0; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom) {}

  void Finish();
  const char* ErrorName() const;

  std::vector<std::pair<std::string, int> > targets_;  // (object_layer, index)
  amct::IfmrSettings settings_;
  int seen_;
  bool done_, told_done_;
  std::vector<int> shape_;                    // first batch's shape
  std::vector<std::vector<float> > batches_;  // one flattened float32 copy per batch
};

}  // namespace caffe

#endif  // CAFFE_AMCT_IFMR_LAYER_HPP_
