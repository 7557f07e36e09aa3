/* edge-zo CUDA path: add S.x into llama.cpp's CUDA tensors in place.
 * See edge_zo_cuda.h for the contract and edge_zo.c for the host kernels these mirror.
 *
 * Layout on the device, per slot: the entries grouped by output row (CSR over
 * the rows that have entries): urows[u] is the u-th such row, its entries are
 * ustart[u] .. ustart[u+1]) of cols/vals. One thread owns one (row, token)
 * output element, so there are no atomics and the sum order is the host
 * kernel's: y + v0*x[c0] + v1*x[c1] + ... left to right, each product and sum
 * rounded (__fmul_rn/__fadd_rn keep nvcc from contracting them into an FMA).
 *
 * Stream: llama.cpp's CUDA stream is private to ggml-cuda. The scheduler
 * synchronizes it before handing a node to the eval callback, and computes the
 * next node only after the callback returns; so we work on a stream of our own
 * (one per device) and synchronize it before returning (ez_cuda_sync). That
 * keeps the order: llama.cpp's writes -> ours -> llama.cpp's reads. */
#include "edge_zo_cuda.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#define EZ_BLOCK 256   /* threads per block */
#define EZ_TILE 8      /* tokens per block in MUL_MAT: each entry is loaded once for this many tokens */
/* Launch shape of MUL_MAT, tuned on an H100 with bench/gpu/kernel_check.cu (docs/gpu.md). */
#ifndef EZ_SMEM_SOFT
#define EZ_SMEM_SOFT (100 * 1024) /* staged activations per block, preferably */
#endif
#ifndef EZ_ROWS_PER_THREAD
#define EZ_ROWS_PER_THREAD 16
#endif
#ifndef EZ_ROW_UNROLL
#define EZ_ROW_UNROLL 2
#endif
constexpr int kRowUnroll = EZ_ROW_UNROLL;

struct ez_cuda_matrix {
    int device;
    int64_t n, n_urows, n_in, n_out, n_expert;
    int32_t *ints;          /* one allocation: urows | ustart | cols | expert_ustart */
    int32_t *urows, *ustart, *cols, *expert_ustart;
    float *vals;            /* device */
    float *h_vals;          /* pinned staging for the values, so their copy is asynchronous */
};

typedef struct ez_cuda_device {
    int ready;
    cudaStream_t stream;
    int n_sm;
    int smem_optin;         /* largest dynamic shared memory a block may ask for */
} ez_cuda_device;

static ez_cuda_device devices[EZ_CUDA_MAX_DEVICES];
static pthread_mutex_t devices_lock = PTHREAD_MUTEX_INITIALIZER;

#define TRY(call)                                  \
    do {                                           \
        cudaError_t err_ = (call);                 \
        if (err_ != cudaSuccess) return (int)err_; \
    } while (0)

/* ---- kernels ---------------------------------------------------------------- */

/* MUL_MAT. Block (bx, by) takes the token tile by*TILE .. +TILE and the rows
 * bx, bx + gridDim.x, ... (one per thread). With SMEM the tile's activations
 * are staged in shared memory first (16-byte loads where x allows: vec4), so
 * the gathers x[c] hit it instead of L2. */
template <int TILE, bool SMEM>
__global__ void __launch_bounds__(EZ_BLOCK)
k_mul_mat(const int32_t *__restrict__ urows, const int32_t *__restrict__ ustart, const int32_t *__restrict__ cols,
          const float *__restrict__ vals, int64_t n_urows, int32_t n_in, const char *__restrict__ x, size_t xnb1,
          size_t xnb2, size_t xnb3, char *__restrict__ y, size_t ynb1, size_t ynb2, size_t ynb3, int64_t ne1,
          int64_t ne2, int64_t n_tok, bool vec4) {
    extern __shared__ float xs[];
    for (int64_t t0 = (int64_t)blockIdx.y * TILE; t0 < n_tok; t0 += (int64_t)gridDim.y * TILE) {
        const float *xr[TILE];
        float *yr[TILE];
        bool live[TILE];
#pragma unroll
        for (int k = 0; k < TILE; k++) {
            live[k] = t0 + k < n_tok;
            const int64_t t = live[k] ? t0 + k : t0;
            const int64_t i1 = t % ne1, i2 = (t / ne1) % ne2, i3 = t / (ne1 * ne2);
            xr[k] = (const float *)(x + i1 * xnb1 + i2 * xnb2 + i3 * xnb3);
            yr[k] = (float *)(y + i1 * ynb1 + i2 * ynb2 + i3 * ynb3);
        }
        if (SMEM) {
            __syncthreads(); /* the previous tile's readers are done with xs */
#pragma unroll
            for (int k = 0; k < TILE; k++) {
                if (!live[k]) continue;
                if (vec4) {
                    const float4 *src = (const float4 *)xr[k];
                    float4 *dst = (float4 *)(xs + k * n_in);
#pragma unroll 4
                    for (int32_t i = threadIdx.x; i < n_in / 4; i += blockDim.x) dst[i] = src[i];
                } else {
#pragma unroll 4
                    for (int32_t i = threadIdx.x; i < n_in; i += blockDim.x) xs[k * n_in + i] = xr[k][i];
                }
            }
            __syncthreads();
        }
#pragma unroll kRowUnroll /* several rows' load chains in flight per thread */
        for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < n_urows;
             u += (int64_t)gridDim.x * blockDim.x) {
            const int32_t row = urows[u], j1 = ustart[u + 1];
            float acc[TILE];
#pragma unroll
            for (int k = 0; k < TILE; k++) acc[k] = live[k] ? yr[k][row] : 0.0f;
#pragma unroll 4 /* several entries' loads in flight; the sums stay in entry order */
            for (int32_t j = ustart[u]; j < j1; j++) {
                const int32_t c = cols[j];
                const float v = vals[j];
#pragma unroll
                for (int k = 0; k < TILE; k++) /* dead lanes compute garbage that is never stored */
                    acc[k] = __fadd_rn(acc[k], __fmul_rn(v, SMEM ? xs[k * n_in + c] : xr[k][c]));
            }
#pragma unroll
            for (int k = 0; k < TILE; k++)
                if (live[k]) yr[k][row] = acc[k];
        }
    }
}

/* MUL_MAT_ID: block row by takes the (expert slot k, token t) pairs by, by + gridDim.y, ... */
__global__ void __launch_bounds__(EZ_BLOCK)
k_mul_mat_id(const int32_t *__restrict__ urows, const int32_t *__restrict__ ustart, const int32_t *__restrict__ cols,
             const float *__restrict__ vals, const int32_t *__restrict__ expert_ustart, int32_t n_out,
             int32_t n_expert, const char *__restrict__ x, size_t xnb1, size_t xnb2, int64_t ne11,
             const char *__restrict__ ids, size_t inb0, size_t inb1, char *__restrict__ y, size_t ynb1, size_t ynb2,
             int64_t n_used, int64_t n_tok) {
    for (int64_t p = blockIdx.y; p < n_used * n_tok; p += gridDim.y) {
        const int64_t k = p % n_used, t = p / n_used;
        const int32_t e = *(const int32_t *)(ids + k * inb0 + t * inb1);
        if (e < 0 || e >= n_expert) continue;
        const float *xr = (const float *)(x + (k % ne11) * xnb1 + t * xnb2);
        float *yr = (float *)(y + k * ynb1 + t * ynb2);
        const int32_t base = e * n_out;
        for (int64_t u = expert_ustart[e] + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < expert_ustart[e + 1];
             u += (int64_t)gridDim.x * blockDim.x) {
            const int32_t row = urows[u] - base, j1 = ustart[u + 1];
            float acc = yr[row];
            for (int32_t j = ustart[u]; j < j1; j++) acc = __fadd_rn(acc, __fmul_rn(vals[j], xr[cols[j]]));
            yr[row] = acc;
        }
    }
}

/* GET_ROWS: block p takes looked-up rows p, p + gridDim.x, ...; its threads
 * share the row's entries (distinct columns, so distinct outputs). */
__global__ void __launch_bounds__(EZ_BLOCK)
k_get_rows(const int32_t *__restrict__ urows, const int32_t *__restrict__ ustart, const int32_t *__restrict__ cols,
           const float *__restrict__ vals, int64_t n_urows, const char *__restrict__ ids, size_t inb0, size_t inb1,
           size_t inb2, int64_t ine0, int64_t ine1, int64_t ine2, char *__restrict__ y, size_t ynb1, size_t ynb2,
           size_t ynb3) {
    for (int64_t p = blockIdx.x; p < ine0 * ine1 * ine2; p += gridDim.x) {
        const int64_t i0 = p % ine0, i1 = (p / ine0) % ine1, i2 = p / (ine0 * ine1);
        const int32_t r = *(const int32_t *)(ids + i0 * inb0 + i1 * inb1 + i2 * inb2);
        int64_t lo = 0, hi = n_urows; /* first unique row >= r */
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (urows[mid] < r) lo = mid + 1; else hi = mid;
        }
        if (lo == n_urows || urows[lo] != r) continue;
        float *yr = (float *)(y + i0 * ynb1 + i1 * ynb2 + i2 * ynb3);
        for (int32_t j = ustart[lo] + threadIdx.x; j < ustart[lo + 1]; j += blockDim.x)
            yr[cols[j]] = __fadd_rn(yr[cols[j]], vals[j]);
    }
}

/* ---- devices ---------------------------------------------------------------- */

static int device_init(int d) {
    if (d < 0 || d >= EZ_CUDA_MAX_DEVICES) return (int)cudaErrorInvalidDevice;
    pthread_mutex_lock(&devices_lock);
    int rc = 0;
    ez_cuda_device *dev = &devices[d];
    if (!dev->ready) {
        cudaError_t err = cudaSetDevice(d);
        if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&dev->stream, cudaStreamNonBlocking);
        if (err == cudaSuccess) err = cudaDeviceGetAttribute(&dev->n_sm, cudaDevAttrMultiProcessorCount, d);
        if (err == cudaSuccess)
            err = cudaDeviceGetAttribute(&dev->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d);
        /* Per device: let the shared-memory variants ask for all of it. */
        if (err == cudaSuccess)
            err = cudaFuncSetAttribute(k_mul_mat<8, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, dev->smem_optin);
        if (err == cudaSuccess)
            err = cudaFuncSetAttribute(k_mul_mat<4, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, dev->smem_optin);
        if (err == cudaSuccess)
            err = cudaFuncSetAttribute(k_mul_mat<2, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, dev->smem_optin);
        if (err == cudaSuccess)
            err = cudaFuncSetAttribute(k_mul_mat<1, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, dev->smem_optin);
        if (err == cudaSuccess) dev->ready = 1;
        rc = (int)err;
    }
    pthread_mutex_unlock(&devices_lock);
    return rc;
}

int ez_cuda_sync(int device) {
    TRY(cudaSetDevice(device));
    TRY(cudaStreamSynchronize(devices[device].stream));
    return (int)cudaGetLastError();
}

const char *ez_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

/* ---- matrices ------------------------------------------------------------------ */

void ez_cuda_matrix_free(ez_cuda_matrix *a) {
    if (!a) return;
    cudaSetDevice(a->device);
    cudaFree(a->ints);
    cudaFree(a->vals);
    cudaFreeHost(a->h_vals);
    free(a);
}

int ez_cuda_matrix_new(int device, const int32_t *rows, const int32_t *cols, int64_t n, int64_t n_in,
                       int64_t n_out, int64_t n_expert, ez_cuda_matrix **out) {
    *out = NULL;
    if (n < 1 || n > INT32_MAX || n_in > INT32_MAX) return (int)cudaErrorInvalidValue;
    int rc = device_init(device);
    if (rc) return rc;
    TRY(cudaSetDevice(device));

    /* Host side first: the unique rows, where each one's entries start, and
     * where each expert's rows start. */
    int64_t n_urows = 0;
    for (int64_t i = 0; i < n; i++) n_urows += i == 0 || rows[i] != rows[i - 1];
    const int64_t n_ints = n_urows + (n_urows + 1) + n + (n_expert + 1);
    int32_t *h = (int32_t *)malloc((size_t)n_ints * sizeof *h);
    ez_cuda_matrix *a = (ez_cuda_matrix *)calloc(1, sizeof *a);
    if (!h || !a) {
        free(h);
        free(a);
        return (int)cudaErrorMemoryAllocation;
    }
    int32_t *urows = h, *ustart = urows + n_urows, *hcols = ustart + n_urows + 1, *estart = hcols + n;
    int64_t u = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i == 0 || rows[i] != rows[i - 1]) {
            urows[u] = rows[i];
            ustart[u++] = (int32_t)i;
        }
    }
    ustart[n_urows] = (int32_t)n;
    memcpy(hcols, cols, (size_t)n * sizeof *cols);
    for (int64_t e = 0, v = 0; e <= n_expert; e++) {
        while (v < n_urows && urows[v] < e * n_out) v++;
        estart[e] = (int32_t)v;
    }

    a->device = device;
    a->n = n;
    a->n_urows = n_urows;
    a->n_in = n_in;
    a->n_out = n_out;
    a->n_expert = n_expert;
    cudaError_t err = cudaMalloc((void **)&a->ints, (size_t)n_ints * sizeof *h);
    if (err == cudaSuccess) err = cudaMalloc((void **)&a->vals, (size_t)n * sizeof(float));
    if (err == cudaSuccess) err = cudaMallocHost((void **)&a->h_vals, (size_t)n * sizeof(float));
    if (err == cudaSuccess) err = cudaMemcpy(a->ints, h, (size_t)n_ints * sizeof *h, cudaMemcpyHostToDevice);
    free(h);
    if (err != cudaSuccess) {
        ez_cuda_matrix_free(a);
        return (int)err;
    }
    a->urows = a->ints;
    a->ustart = a->urows + n_urows;
    a->cols = a->ustart + n_urows + 1;
    a->expert_ustart = a->cols + n;
    *out = a;
    return 0;
}

void ez_cuda_matrix_stage(ez_cuda_matrix *a, const float *values) {
    memcpy(a->h_vals, values, (size_t)a->n * sizeof(float));
}

int ez_cuda_matrix_upload(ez_cuda_matrix *a) {
    TRY(cudaSetDevice(a->device));
    TRY(cudaMemcpyAsync(a->vals, a->h_vals, (size_t)a->n * sizeof(float), cudaMemcpyHostToDevice,
                        devices[a->device].stream));
    return 0;
}

int ez_cuda_matrix_set_values(ez_cuda_matrix *a, const float *values) {
    ez_cuda_matrix_stage(a, values);
    return ez_cuda_matrix_upload(a);
}

/* ---- launchers ------------------------------------------------------------------- */

static unsigned clamp_grid(int64_t want, int64_t lo, int64_t hi) {
    return (unsigned)(want < lo ? lo : want > hi ? hi : want);
}

int ez_cuda_mul_mat(const ez_cuda_matrix *a, const void *x, const size_t *xnb, void *y, const size_t *ynb,
                    const int64_t *ne) {
    const int64_t n_tok = ne[1] * ne[2] * ne[3];
    if (n_tok == 0) return 0;
    const ez_cuda_device *dev = &devices[a->device];
    TRY(cudaSetDevice(a->device));
    const int32_t n_in = (int32_t)a->n_in; /* x's rows: the weight's input width */
    /* The token tile: the largest whose activations fit in EZ_SMEM_SOFT bytes,
     * down to one token; then all of the shared memory if one token needs more;
     * past that, gathers from global memory. A bigger tile reads each entry for
     * more tokens; a smaller one leaves room for more blocks per multiprocessor. */
    int tile = EZ_TILE;
    while (tile > 1 && ((size_t)tile * n_in * sizeof(float) > EZ_SMEM_SOFT || tile / 2 >= n_tok)) tile /= 2;
    const bool smem = (size_t)tile * n_in * sizeof(float) <= (size_t)dev->smem_optin;
    const size_t shmem = smem ? (size_t)tile * n_in * sizeof(float) : 0;
    const bool vec4 = n_in % 4 == 0 && (uintptr_t)x % 16 == 0 && xnb[1] % 16 == 0 && xnb[2] % 16 == 0 &&
                      xnb[3] % 16 == 0;
    const int64_t row_blocks = (a->n_urows + EZ_BLOCK - 1) / EZ_BLOCK;
    dim3 grid;
    grid.y = clamp_grid((n_tok + tile - 1) / tile, 1, 65535);
    /* Rows are split over blocks until a thread owns about EZ_ROWS_PER_THREAD of
     * them and the GPU has two blocks per multiprocessor; every extra block
     * stages its tile again. (The sweep behind both constants: docs/gpu.md.) */
    const int64_t want = (a->n_urows + EZ_BLOCK * EZ_ROWS_PER_THREAD - 1) / (EZ_BLOCK * EZ_ROWS_PER_THREAD);
    const int64_t fill = (2 * dev->n_sm + grid.y - 1) / grid.y;
    grid.x = smem ? clamp_grid(want > fill ? want : fill, 1, row_blocks) : clamp_grid(row_blocks, 1, 65535);
    const char *xc = (const char *)x;
    char *yc = (char *)y;
#define EZ_LAUNCH(T, S)                                                                                   \
    k_mul_mat<T, S><<<grid, EZ_BLOCK, shmem, dev->stream>>>(a->urows, a->ustart, a->cols, a->vals,        \
                                                            a->n_urows, n_in, xc, xnb[1], xnb[2], xnb[3], \
                                                            yc, ynb[1], ynb[2], ynb[3], ne[1], ne[2], n_tok, vec4)
    if (!smem) EZ_LAUNCH(EZ_TILE, false);
    else if (tile == 8) EZ_LAUNCH(8, true);
    else if (tile == 4) EZ_LAUNCH(4, true);
    else if (tile == 2) EZ_LAUNCH(2, true);
    else EZ_LAUNCH(1, true);
#undef EZ_LAUNCH
    return (int)cudaGetLastError();
}

int ez_cuda_mul_mat_id(const ez_cuda_matrix *a, const void *x, const size_t *xnb, int64_t ne11, const void *ids,
                       const size_t *inb, void *y, const size_t *ynb, int64_t n_used, int64_t n_tok) {
    if (n_used * n_tok == 0) return 0;
    const ez_cuda_device *dev = &devices[a->device];
    TRY(cudaSetDevice(a->device));
    const int64_t rows_per_expert = (a->n_urows + a->n_expert - 1) / a->n_expert;
    dim3 grid;
    grid.y = clamp_grid(n_used * n_tok, 1, 65535);
    grid.x = clamp_grid((rows_per_expert + EZ_BLOCK - 1) / EZ_BLOCK, 1, 8);
    k_mul_mat_id<<<grid, EZ_BLOCK, 0, dev->stream>>>(a->urows, a->ustart, a->cols, a->vals, a->expert_ustart,
                                                     (int32_t)a->n_out, (int32_t)a->n_expert, (const char *)x,
                                                     xnb[1], xnb[2], ne11, (const char *)ids, inb[0], inb[1],
                                                     (char *)y, ynb[1], ynb[2], n_used, n_tok);
    return (int)cudaGetLastError();
}

int ez_cuda_get_rows(const ez_cuda_matrix *a, const void *ids, const size_t *inb, const int64_t *ine, void *y,
                     const size_t *ynb) {
    const int64_t n_ids = ine[0] * ine[1] * ine[2];
    if (n_ids == 0) return 0;
    const ez_cuda_device *dev = &devices[a->device];
    TRY(cudaSetDevice(a->device));
    k_get_rows<<<clamp_grid(n_ids, 1, 1 << 20), EZ_BLOCK, 0, dev->stream>>>(
        a->urows, a->ustart, a->cols, a->vals, a->n_urows, (const char *)ids, inb[0], inb[1], inb[2], ine[0], ine[1],
        ine[2], (char *)y, ynb[1], ynb[2], ynb[3]);
    return (int)cudaGetLastError();
}
