// amct_caffe caffe_patch: RetrainWeightQuant layer, ARQ retrain (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_RETRAIN_WEIGHT_QUANT_LAYER_HPP_
#define CAFFE_AMCT_RETRAIN_WEIGHT_QUANT_LAYER_HPP_

#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief RetrainWeightQuant (retrain_weight_quant_param): ARQ retrain of the weights of the
 * layer it precedes (object layer: Convolution, DepthwiseConv, Deconvolution, InnerProduct);
 * the numbers of amct_caffe.quant.arq.arq_retrain_forward / arq_retrain_backward.
 *
 * Contract (the vendor layer's): bottom = the object layer's input x, top = x unchanged (shared
 * data and diff, or in place). Blobs, shape (cout, cin[, h, w]) (h and w only when both are
 * given; InnerProduct has none):
 *   [0] the fake-quantized weight. Give it the same ParamSpec name as the object layer's weight
 *       so that Caffe shares the blob (this layer comes first, so it owns it), e.g.
 *         layer { type: "RetrainWeightQuant" param { name: "conv1_w" lr_mult: 0 decay_mult: 0 }
 *                 param { lr_mult: 1 } ... }
 *         layer { name: "conv1" type: "Convolution" param { name: "conv1_w" } ... }
 *       lr_mult 0 / decay_mult 0 keep the solver from moving it (it is recomputed anyway);
 *   [1] the float weight that is trained.
 * Forward: on the first forward, if blob 1 holds only zeros (a fresh net; a snapshot restores
 * it) it takes blob 0's values (the object layer's weights from the caffemodel). Then blob 0 =
 * ARQ fake-quant of blob 1 (libquant amct_arq: symmetric, per output channel when
 * channel_wise, scales recomputed every forward).
 * Backward (straight-through): blob 1's diff = blob 0's diff (which the object layer's backward
 * accumulated; copied, not added, so iter_size accumulation stays right); x's diff is top's.
 *
 * Layouts as amct_caffe.quant.arq.arq_layout with group 1 (the param has no group: channel-wise
 * ARQ of a grouped Deconvolution is not supported). with_offset must be false; num_bits in
 * [2, 8] (the guide allows 8).
 */
template <typename Dtype>
class RetrainWeightQuantLayer : public Layer<Dtype> {
 public:
  explicit RetrainWeightQuantLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "RetrainWeightQuant"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom);

  std::vector<int> shape_;
  size_t groups_, rows_, channels_, inner_;  // libquant's ArqLayout
  bool channel_wise_;
  int num_bits_;
  bool started_;
  std::vector<float> w_, fake_, scale_;  // float32 buffers
  std::vector<int> offset_;
};

}  // namespace caffe

#endif  // CAFFE_AMCT_RETRAIN_WEIGHT_QUANT_LAYER_HPP_
