/* C ABI of libquant.so, for the Caffe layers of caffe_patch. Every function returns 0 on
 * success or a negative AMCT_* code; amct_last_error() gives the message of the last failure
 * on the calling thread. Arrays are C-contiguous; the caller allocates outputs. */
#ifndef AMCT_CAPI_H_
#define AMCT_CAPI_H_

#include <stddef.h>
#include <stdint.h>

/* libquant is built with hidden visibility; only these functions are exported. */
#if defined(__GNUC__)
#define AMCT_API __attribute__((visibility("default")))
#else
#define AMCT_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define AMCT_OK 0
#define AMCT_INVALID_ARGUMENT (-1) /* bad data or settings: see amct_last_error() */
#define AMCT_INTERNAL_ERROR (-2)   /* unexpected failure (e.g. out of memory) */

AMCT_API const char* amct_last_error(void);

/* IFMR over `num_chunks` arrays (e.g. batch_num stored batches); candidates from
 * start/end/step with the end point included. Outputs scale, offset, best candidate index. */
AMCT_API int amct_ifmr_search(const float* const* chunks, const size_t* chunk_sizes, size_t num_chunks,
                     int num_bits, int with_offset, double max_percentile, double min_percentile,
                     double search_start, double search_end, double search_step, float* scale,
                     int* offset, int* best_index);

AMCT_API int amct_quantize_int8(const float* x, int8_t* q, size_t n, float scale, int offset, int num_bits);
AMCT_API int amct_quantize_int16(const float* x, int16_t* q, size_t n, float scale, int offset, int num_bits);
AMCT_API int amct_fake_quant(const float* in, float* out, size_t n, float scale, int offset, int num_bits);

/* Weight [groups, rows, channels, inner] (see amct/arq.h); scale/offset have groups*channels
 * entries when channel_wise, else 1. q and fake may be NULL. */
AMCT_API int amct_arq(const float* w, size_t groups, size_t rows, size_t channels, size_t inner,
             int channel_wise, int num_bits, float* scale, int* offset, int8_t* q, float* fake);

AMCT_API int amct_quantize_bias(const float* bias, size_t n, const float* scale_w, size_t n_scale_w,
                       float scale_d, int32_t* out);

AMCT_API int amct_pack_deq_scale(const float* scale_w, float scale_d, const int8_t* offset_w, uint64_t* out,
                        size_t n);
AMCT_API int amct_unpack_deq_scale(const uint64_t* param, float* deq, int8_t* offset_w, size_t n);

/* x [batch, channels, inner]; err_hi/err_lo [channels * 16] accumulate the exact 128-bit errors
 * (zero them before the first batch); best_n [channels] receives n in [1, 16]. */
AMCT_API int amct_search_n_accumulate(const float* x, size_t batch, size_t channels, size_t inner,
                             const float* deq, uint64_t* err_hi, uint64_t* err_lo);
AMCT_API int amct_search_n_select(const uint64_t* err_hi, const uint64_t* err_lo, size_t channels, int* best_n);

/* init: 0 uniform, 1 gaussian, 2 d2sampling. centres [channels*16], codes [channels*k]. */
AMCT_API int amct_snq(const float* w, size_t channels, size_t k, int init, int max_iteration,
             double min_distance, uint64_t seed, float* centres, uint8_t* codes);

/* ULQ: clip check (in/out), scale/offset, backward (grad sums in double). */
AMCT_API int amct_ulq_clip_check(float* clip_max, float* clip_min, float* prev_max, float* prev_min);
AMCT_API int amct_ulq_scale_offset(float clip_max, float clip_min, int num_bits, float* scale, int* offset);
AMCT_API int amct_ulq_backward(const float* x, const float* grad, float* grad_x, size_t n, float clip_max,
                      float clip_min, float scale, int offset, int num_bits, double* grad_clip_max,
                      double* grad_clip_min);

#ifdef __cplusplus
}
#endif

#endif /* AMCT_CAPI_H_ */
