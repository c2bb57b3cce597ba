// amct_caffe caffe_patch: RetrainDataQuant layer, ULQ activation retrain (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_RETRAIN_DATA_QUANT_LAYER_HPP_
#define CAFFE_AMCT_RETRAIN_DATA_QUANT_LAYER_HPP_

#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief RetrainDataQuant (retrain_data_quant_param): ULQ quantization-aware retraining of an
 * activation's clip range; the numbers of amct_caffe.quant.ulq.UlqQuantizer (libquant's kernels).
 *
 * Blobs (learnable, shape [1] each): [0] clip_max, [1] clip_min, initialised from the param
 * (clip_min = 0 with fixed_min) unless a caffemodel provides them. Every forward:
 *  1. fixed_min: clip_min = 0;
 *  2. ClipCheck (amct_ulq_clip_check) against the last accepted values: clip_max <= clip_min
 *     restores both, clip_max < 0 restores clip_max, clip_min > 0 restores clip_min, otherwise
 *     the values are accepted. The checked values are written back into the blobs (the Python
 *     quantizer keeps them as its state). The first accepted values are those the first forward
 *     finds in the blobs (the layer's "previous" values are not saved in snapshots);
 *  3. scale/offset = amct_ulq_scale_offset(clip_max, clip_min, num_bits);
 *     y = amct_fake_quant(x, scale, offset, num_bits).
 * Backward (amct_ulq_backward, float64 sums): dL/dx = g inside the range, else 0;
 * dL/dclip_max = sum (e + upper) g; dL/dclip_min = sum (lower - e) g (0 with fixed_min). x's
 * gradient honours propagate_down; the clip gradients are *added* to the blobs' diffs (Caffe's
 * convention; the solver clears them) when param_propagate_down (lr_mult != 0).
 *
 * ifmr_init: on the first forward, while the blobs still hold the prototxt's initial values
 * (so a snapshot's learned values are kept), IFMR runs on that batch (libquant
 * amct_ifmr_search; num_bits, asymmetric, the guide's defaults: percentiles 0.999999, search
 * 0.7 .. 1.3 step 0.01) and its grid [scale*(qmin-offset), scale*(qmax-offset)] becomes the
 * initial clip range.
 *
 * TEST phase with record_file_path (and object_layer) set: scale_d, offset_d, num_bits_d and
 * the bottom's channels/height/width go into record_d index 0 of object_layer in that
 * ScaleOffsetRecord text file whenever they differ from what this layer wrote last.
 *
 * with_offset = false is not supported by ULQ (the range is asymmetric); it is warned about
 * and ignored. num_bits in [8, 16].
 *
 * @param bottom x, any shape
 * @param top    y, the shape of x (may be in place: x is then kept for the backward)
 */
template <typename Dtype>
class RetrainDataQuantLayer : public Layer<Dtype> {
 public:
  explicit RetrainDataQuantLayer(const LayerParameter& param) : Layer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);

  virtual inline const char* type() const { return "RetrainDataQuant"; }
  virtual inline int ExactNumBottomBlobs() const { return 1; }
  virtual inline int ExactNumTopBlobs() const { return 1; }

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
                            const vector<Blob<Dtype>*>& bottom);

  void IfmrInit(const float* x, size_t n, float* clip_max, float* clip_min);
  void WriteRecord(const Blob<Dtype>& bottom);

  int num_bits_;
  bool fixed_min_, ifmr_init_;
  float init_max_, init_min_;   // the prototxt's initial values (for ifmr_init)
  bool started_;                // prev_* hold the last accepted clip values
  float prev_max_, prev_min_;
  float clip_max_, clip_min_;   // the checked values of the last forward (used by backward)
  float scale_;
  int offset_;
  bool x_saved_;                // x_ holds x (in place, or Dtype is double)
  bool written_;                // the record holds (written_scale_, written_offset_)
  float written_scale_;
  int written_offset_;
  std::vector<float> x_, y_, g_, gx_;  // float32 buffers
};

}  // namespace caffe

#endif  // CAFFE_AMCT_RETRAIN_DATA_QUANT_LAYER_HPP_
