// Greedy non-maximum suppression as bbox_util's ApplyNMSFast runs it (SSD's DetectionOutput).
//
// `cand` holds the candidate box indices already in descending score order (cut to top_k). A candidate is kept
// when its JaccardOverlap with every box kept before it is <= the adaptive threshold, which is multiplied by
// `eta` after each keep while eta < 1 and it is > 0.5. The overlap is the NumPy reference's
// (runtime/layers/detection.py _jaccard), operation for operation in float32, NaN-propagating min / max as
// NumPy's: 0 when the boxes are apart or the intersection is empty, else inter / (size_i + size_j - inter).
//
// boxes: (P, 4) xmin, ymin, xmax, ymax; sizes: (P,) each box's BBoxSize. Returns the kept indices in order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace amct {

std::vector<std::int64_t> nms_fast(const float* boxes, const float* sizes, const std::int64_t* cand, std::size_t n,
                                   float threshold, float eta);

}  // namespace amct
