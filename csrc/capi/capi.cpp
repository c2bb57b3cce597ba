// extern "C" wrapper over the C++ core: converts exceptions into status codes plus a
// thread-local message, so no C++ exception crosses into Caffe's code.
#include "amct/capi.h"

#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "amct/arq.h"
#include "amct/fake_quant.h"
#include "amct/ifmr.h"
#include "amct/search_n.h"
#include "amct/snq.h"
#include "amct/ulq.h"

namespace {
thread_local std::string g_last_error;

template <class F>
int guarded(F f) {
  try {
    f();
    g_last_error.clear();
    return AMCT_OK;
  } catch (const std::invalid_argument& e) {
    g_last_error = e.what();
    return AMCT_INVALID_ARGUMENT;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return AMCT_INTERNAL_ERROR;
  } catch (...) {
    g_last_error = "unknown error";
    return AMCT_INTERNAL_ERROR;
  }
}

void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}
}  // namespace

extern "C" {

const char* amct_last_error(void) { return g_last_error.c_str(); }

int amct_ifmr_search(const float* const* chunks, const size_t* chunk_sizes, size_t num_chunks,
                     int num_bits, int with_offset, double max_percentile, double min_percentile,
                     double search_start, double search_end, double search_step, float* scale,
                     int* offset, int* best_index) {
  return guarded([&] {
    require(chunks && chunk_sizes && scale && offset, "amct_ifmr_search: null pointer");
    std::vector<amct::FloatSpan> spans;
    for (size_t i = 0; i < num_chunks; ++i) spans.push_back({chunks[i], chunk_sizes[i]});
    amct::IfmrConfig cfg;
    cfg.num_bits = num_bits;
    cfg.with_offset = with_offset != 0;
    cfg.max_percentile = max_percentile;
    cfg.min_percentile = min_percentile;
    auto r = amct::ifmr_search(spans, cfg, amct::ifmr_ratios(search_start, search_end, search_step));
    *scale = r.scale;
    *offset = r.offset;
    if (best_index) *best_index = r.best_index;
  });
}

int amct_quantize_int8(const float* x, int8_t* q, size_t n, float scale, int offset, int num_bits) {
  return guarded([&] { amct::quantize(x, q, n, scale, offset, num_bits); });
}

int amct_quantize_int16(const float* x, int16_t* q, size_t n, float scale, int offset, int num_bits) {
  return guarded([&] { amct::quantize(x, q, n, scale, offset, num_bits); });
}

int amct_fake_quant(const float* in, float* out, size_t n, float scale, int offset, int num_bits) {
  return guarded([&] { amct::fake_quant(in, out, n, scale, offset, num_bits); });
}

int amct_arq(const float* w, size_t groups, size_t rows, size_t channels, size_t inner,
             int channel_wise, int num_bits, float* scale, int* offset, int8_t* q, float* fake) {
  return guarded([&] {
    require(w && scale && offset, "amct_arq: null pointer");
    amct::ArqLayout layout{groups, rows, channels, inner};
    amct::arq_scales(w, layout, channel_wise != 0, num_bits, scale, offset);
    if (q || fake) amct::arq_quantize(w, layout, channel_wise != 0, num_bits, scale, offset, q, fake);
  });
}

int amct_quantize_bias(const float* bias, size_t n, const float* scale_w, size_t n_scale_w,
                       float scale_d, int32_t* out) {
  return guarded([&] { amct::quantize_bias(bias, n, scale_w, n_scale_w, scale_d, out); });
}

int amct_pack_deq_scale(const float* scale_w, float scale_d, const int8_t* offset_w, uint64_t* out,
                        size_t n) {
  return guarded([&] { amct::pack_deq_scale(scale_w, scale_d, offset_w, out, n); });
}

int amct_unpack_deq_scale(const uint64_t* param, float* deq, int8_t* offset_w, size_t n) {
  return guarded([&] { amct::unpack_deq_scale(param, deq, offset_w, n); });
}

int amct_search_n_accumulate(const float* x, size_t batch, size_t channels, size_t inner,
                             const float* deq, uint64_t* err_hi, uint64_t* err_lo) {
  return guarded([&] {
    std::vector<amct::U128> err(channels * amct::kNumShiftBits);
    for (size_t i = 0; i < err.size(); ++i) err[i] = {err_hi[i], err_lo[i]};
    amct::search_n_accumulate(x, batch, channels, inner, deq, err.data());
    for (size_t i = 0; i < err.size(); ++i) {
      err_hi[i] = err[i].hi;
      err_lo[i] = err[i].lo;
    }
  });
}

int amct_search_n_select(const uint64_t* err_hi, const uint64_t* err_lo, size_t channels, int* best_n) {
  return guarded([&] {
    std::vector<amct::U128> err(channels * amct::kNumShiftBits);
    for (size_t i = 0; i < err.size(); ++i) err[i] = {err_hi[i], err_lo[i]};
    amct::search_n_select(err.data(), channels, best_n);
  });
}

int amct_snq(const float* w, size_t channels, size_t k, int init, int max_iteration,
             double min_distance, uint64_t seed, float* centres, uint8_t* codes) {
  return guarded([&] {
    amct::SnqConfig cfg;
    cfg.init = static_cast<amct::SnqInit>(init);
    cfg.max_iteration = max_iteration;
    cfg.min_distance = min_distance;
    cfg.seed = seed;
    amct::snq(w, channels, k, cfg, centres, codes, nullptr);
  });
}

int amct_ulq_clip_check(float* clip_max, float* clip_min, float* prev_max, float* prev_min) {
  return guarded([&] { amct::ulq_clip_check(*clip_max, *clip_min, *prev_max, *prev_min); });
}

int amct_ulq_scale_offset(float clip_max, float clip_min, int num_bits, float* scale, int* offset) {
  return guarded([&] { amct::ulq_scale_offset(clip_max, clip_min, num_bits, scale, offset); });
}

int amct_ulq_backward(const float* x, const float* grad, float* grad_x, size_t n, float clip_max,
                      float clip_min, float scale, int offset, int num_bits, double* grad_clip_max,
                      double* grad_clip_min) {
  return guarded([&] {
    amct::ulq_backward(x, grad, grad_x, n, clip_max, clip_min, scale, offset, num_bits, grad_clip_max,
                       grad_clip_min);
  });
}

}  // extern "C"
