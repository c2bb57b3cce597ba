// amct_caffe caffe_patch: shared helpers of the AMCT layers (installed by caffe_patch/install.py).
#ifndef CAFFE_AMCT_UTIL_HPP_
#define CAFFE_AMCT_UTIL_HPP_

#include <string>
#include <vector>

#include "caffe/blob.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {
namespace amct {

/// The decimal a float proto field was written from, as a double.
///
/// Proto floats are float32 (0.999999 is stored as 0.99999898672...). The shortest decimal that
/// round-trips to the float is the value the user wrote, so IFMR searches the same percentiles
/// and candidates as a run driven by the config itself (amct_caffe.runtime.layers.amct._proto_float).
double ProtoFloat(float value);

/// "layer '<name>' (<type>): " -- the prefix of every error message, as in the Python layers.
std::string Where(const LayerParameter& param);

/// LOG(FATAL) with libquant's last error message when `status` is not AMCT_OK.
void CheckQuant(int status, const LayerParameter& param);

/// Reads a ScaleOffsetRecord text file; returns false (record untouched) if the file does not exist.
bool ReadRecord(const std::string& path, ScaleOffsetRecord* record);

/// Writes the record as protobuf text, atomically (temporary file beside it, then rename).
void WriteRecord(const ScaleOffsetRecord& record, const std::string& path);

/// Writes `data` to `path` atomically (temporary file beside it, then rename), creating its directory.
void WriteFileAtomically(const std::string& path, const std::string& data);

/// The SingleLayerRecord of `layer` (the last entry wins, as protobuf map semantics); NULL if absent
/// and not `create`.
SingleLayerRecord* LayerEntry(ScaleOffsetRecord* record, const std::string& layer, bool create);

/// The record_d of input `index` (the first one); NULL if absent and not `create`.
ActivationQuantParam* ActivationEntry(SingleLayerRecord* entry, int index, bool create);

/// channels, height, width of a blob shape (N, C[, H[, W...]]): missing axes count as 1 and axes
/// past the fourth are folded into width, so C*H*W is the per-sample count.
void ChannelsHeightWidth(const std::vector<int>& shape, int* c, int* h, int* w);

/// The settings of an IFMRParameter, as doubles of the decimals the user wrote (ProtoFloat).
struct IfmrSettings {
  int batch_num, num_bits;
  bool with_offset;
  double max_percentile, min_percentile, start, end, step;
};

/// Reads and checks ifmr_param `p` of `layer` (the IFMR layer, or the recurrent calibration layer
/// holding it): batch_num >= 1, a record file, at least one object_layer, and the checks of
/// amct_caffe.quant.IfmrParams on the same decimal values. LOG(FATAL) names `layer` otherwise.
IfmrSettings ReadIfmrSettings(const IFMRParameter& p, const LayerParameter& layer);

/// libquant's IFMR search (amct_ifmr_search) over `batches`, one chunk per stored batch as the
/// Python observer passes them; LOG(FATAL) with libquant's message on failure.
void IfmrSearch(const IfmrSettings& s, const std::vector<std::vector<float> >& batches,
                const LayerParameter& layer, float* scale, int* offset);

/// "%.9g" of a float: enough digits to read back the same float32, for log lines.
std::string FloatText(float value);

/// "(d1, d2, ...)" like a Python tuple, for messages.
std::string ShapeString(const std::vector<int>& shape);

/// A float32 view of blob data: the data itself for float, a converted copy for double.
inline const float* AsFloat(const float* data, size_t, std::vector<float>*) { return data; }
inline const float* AsFloat(const double* data, size_t n, std::vector<float>* buffer) {
  buffer->assign(data, data + n);
  return buffer->data();
}

}  // namespace amct
}  // namespace caffe

#endif  // CAFFE_AMCT_UTIL_HPP_
