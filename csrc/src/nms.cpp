#include "amct/nms.h"

#include <cmath>

namespace amct {
namespace {

// NumPy's minimum / maximum: NaN if either operand is NaN.
inline float nan_min(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : (b < a ? b : a); }
inline float nan_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : (b > a ? b : a); }

// _jaccard(box, size, other, other_size) of detection.py for one pair.
inline float jaccard(const float* b, float size, const float* o, float other_size) {
  const bool apart = (o[0] > b[2]) | (o[2] < b[0]) | (o[1] > b[3]) | (o[3] < b[1]);
  const float iw = nan_min(b[2], o[2]) - nan_max(b[0], o[0]);
  const float ih = nan_min(b[3], o[3]) - nan_max(b[1], o[1]);
  if (apart || !(iw > 0.0f) || !(ih > 0.0f)) return 0.0f;
  const float inter = iw * ih;
  const float uni = (size + other_size) - inter;
  return inter / uni;
}

}  // namespace

std::vector<std::int64_t> nms_fast(const float* boxes, const float* sizes, const std::int64_t* cand, std::size_t n,
                                   float threshold, float eta) {
  std::vector<std::int64_t> kept;
  float thr = threshold;
  for (std::size_t c = 0; c < n; ++c) {
    const std::int64_t i = cand[c];
    bool keep = true;
    for (const std::int64_t j : kept) {
      // (a NaN overlap is not <= the threshold: the candidate goes, as in Caffe's loop)
      if (!(jaccard(boxes + 4 * i, sizes[i], boxes + 4 * j, sizes[j]) <= thr)) {
        keep = false;
        break;
      }
    }
    if (!keep) continue;
    kept.push_back(i);
    if (eta < 1.0f && thr > 0.5f) thr = thr * eta;
  }
  return kept;
}

}  // namespace amct
