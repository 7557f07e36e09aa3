/* edge-zo CUDA path: S.x added on device pointers (native/edge_zo_cuda.cu).
 *
 * Internal to the native core, not part of edge_zo.h (cffi's header): only
 * edge_zo.c includes it, and only when built with EDGE_ZO_CUDA. The kernels
 * mirror edge_zo.c's host kernels argument for argument and do the same float
 * operations in the same order per output element (no FMA contraction), so on
 * equal inputs the two paths agree bit for bit (where the host compiler does not
 * contract a*b+c either, as on x86-64 without -mfma).
 *
 * Functions return 0 or a cudaError_t code; ez_cuda_error_string() names it. */
#ifndef EDGE_ZO_CUDA_H
#define EDGE_ZO_CUDA_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EZ_CUDA_MAX_DEVICES 16 /* GGML_CUDA_MAX_DEVICES */

/* One slot's entries on one device: rows (e*n_out + row, non-decreasing) and
 * cols are uploaded once; values are uploaded by ez_cuda_matrix_set_values. */
typedef struct ez_cuda_matrix ez_cuda_matrix;

int ez_cuda_matrix_new(int device, const int32_t *rows, const int32_t *cols, int64_t n, int64_t n_in,
                       int64_t n_out, int64_t n_expert, ez_cuda_matrix **out);
void ez_cuda_matrix_free(ez_cuda_matrix *a);
/* The slot's current n values to the device, in two steps: stage copies them
 * into the matrix's pinned host buffer, in the device layout's order (host
 * work only: several matrices may
 * be staged at once from several threads), upload queues the copy to the
 * device on the device's stream. Stage only while no upload of the same
 * matrix is pending, i.e. after ez_cuda_sync. set_values does both. */
/* A matrix holds n_sets value sets (1 when made; perturbation groups need more): reserve grows
 * that, keeping nothing (call it only while no upload is pending). stage(set) and upload(n_sets)
 * work on sets 0 .. n_sets-1; set_values is stage(0) + upload(1). */
int ez_cuda_matrix_reserve(ez_cuda_matrix *a, int32_t n_sets);
void ez_cuda_matrix_stage(ez_cuda_matrix *a, int32_t set, const float *values);
int ez_cuda_matrix_upload(ez_cuda_matrix *a, int32_t n_sets);
int ez_cuda_matrix_set_values(ez_cuda_matrix *a, const float *values);

/* The kernels read value set `set`. */
/* y[:, t] += S x[:, t] for every token t; ne is y's shape, nb in bytes. */
int ez_cuda_mul_mat(const ez_cuda_matrix *a, int32_t set, const void *x, const size_t *xnb, void *y, const size_t *ynb,
                    const int64_t *ne);
/* MUL_MAT_ID: y[:, k, t] += S_e x[:, k % ne11, t] with e = ids[k, t]. */
int ez_cuda_mul_mat_id(const ez_cuda_matrix *a, int32_t set, const void *x, const size_t *xnb, int64_t ne11, const void *ids,
                       const size_t *inb, void *y, const size_t *ynb, int64_t n_used, int64_t n_tok);
/* GET_ROWS: y[:, i] += S[ids[i], :]. */
int ez_cuda_get_rows(const ez_cuda_matrix *a, int32_t set, const void *ids, const size_t *inb, const int64_t *ine, void *y,
                     const size_t *ynb);

/* Wait for everything queued on the device's stream. */
int ez_cuda_sync(int device);
/* The device's stream (a cudaStream_t), once a matrix exists there: for timing in bench/gpu/kernel_check.cu. */
void *ez_cuda_stream(int device);
const char *ez_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
#endif
