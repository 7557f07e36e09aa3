/* edge-zo CUDA path: add S.x into llama.cpp's CUDA tensors in place.
 * See edge_zo_cuda.h for the contract and edge_zo.c for the host kernels these mirror.
 *
 * Layout on the device, per slot: the rows that have entries ("urows", in row
 * order) are cut into slices of 32 (a slice never spans two experts); a warp
 * takes a slice, one lane per row. Inside a slice the lanes are ordered by
 * their row's entry count, longest first, and the entries are stored step by
 * step ("jagged diagonals"): entry 0 of every lane, then entry 1 of the lanes
 * that have one, and so on. At step j the lanes that still have entries are
 * lanes 0 .. cnt-1 and read cnt consecutive cols/vals: one coalesced load per
 * step, where a row-by-row (CSR) layout had every lane read its own sector.
 * A lane still adds its row's entries in the host kernel's order:
 * y + v0*x[c0] + v1*x[c1] + ... left to right, each product and sum rounded
 * (__fmul_rn/__fadd_rn keep nvcc from contracting them into an FMA); one lane
 * owns one (row, token) output element, so there are no atomics. The caller's
 * values come in CSR order and are permuted into this order on the host, while
 * they are copied into the pinned staging buffer.
 *
 * At 7B widths the MUL_MAT kernel is bound by the latency of its loads, not by
 * bandwidth (Nsight Compute: DRAM 20% busy, warps mostly waiting on L1TEX), so
 * what made it faster (docs/gpu.md) was more loads in flight per SM: 1024
 * threads a block (registers kept under 64), the activations staged column-major
 * so one entry's tokens come in one or two vector loads, and the next slice's
 * y values loaded while this slice's steps run.
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

#define EZ_BLOCK 256   /* threads per block of MUL_MAT_ID and GET_ROWS */
#define EZ_TILE 8      /* tokens per block in MUL_MAT: each entry is loaded once for this many tokens */
#define EZ_FULL 0xffffffffu
/* Launch shape of MUL_MAT, tuned on an H100 with bench/gpu/kernel_check.cu (docs/gpu.md). */
#ifndef EZ_MM_BLOCK
#define EZ_MM_BLOCK 1024 /* threads per block */
#endif
#ifndef EZ_SMEM_SOFT
#define EZ_SMEM_SOFT (200 * 1024) /* staged activations per block, preferably */
#endif
#ifndef EZ_STEP_UNROLL
#define EZ_STEP_UNROLL 4 /* steps of a slice whose loads are in flight together */
#endif
constexpr int kStepUnroll = EZ_STEP_UNROLL;
#ifndef EZ_SLICES_PER_WARP
#define EZ_SLICES_PER_WARP 4 /* slices a warp should own before rows are split over more blocks */
#endif

struct ez_cuda_matrix {
    int device;
    int64_t n, n_urows, n_slices, n_in, n_out, n_expert;
    /* device, one allocation: lane_row | lane_len | slice_start | cols | urows | upos | expert_slice */
    int32_t *ints;
    int32_t *lane_row;      /* [n_slices*32] e*n_out + row of each lane (0 for lanes without a row) */
    int32_t *lane_len;      /* [n_slices*32] entries of that row (0: no row) */
    int32_t *slice_start;   /* [n_slices+1] first entry of each slice */
    int32_t *cols;          /* [n] in slice order */
    int32_t *urows;         /* [n_urows] the rows with entries, ascending (GET_ROWS looks them up) */
    int32_t *upos;          /* [n_urows] lane (s*32 + l) of each of them */
    int32_t *expert_slice;  /* [n_expert+1] first slice of each expert */
    float *vals;            /* device, slice order: n_sets value sets of n, one after another */
    float *h_vals;          /* pinned staging for the values, so their copy is asynchronous */
    int32_t n_sets;         /* value sets vals and h_vals hold (ez_cuda_matrix_reserve) */
    int32_t *src;           /* host: h_vals[p] = values[src[p]] */
};

typedef struct ez_cuda_device {
    int ready;
    cudaStream_t stream;
    int n_sm;
    int smem_optin;         /* largest dynamic shared memory a k_mul_mat block may ask for */
    int smem_sm;            /* shared memory per multiprocessor */
    int threads_sm;         /* resident threads per multiprocessor */
} ez_cuda_device;

static ez_cuda_device devices[EZ_CUDA_MAX_DEVICES];
static pthread_mutex_t devices_lock = PTHREAD_MUTEX_INITIALIZER;

#define TRY(call)                                  \
    do {                                           \
        cudaError_t err_ = (call);                 \
        if (err_ != cudaSuccess) return (int)err_; \
    } while (0)

/* ---- kernels ---------------------------------------------------------------- */

/* TILE consecutive floats of shared memory into registers, in as few loads as
 * their alignment allows (xs + c*TILE is TILE*4-byte aligned). */
template <int TILE> __device__ __forceinline__ void load_tile(const float *p, float (&v)[TILE]) {
    if constexpr (TILE == 8) {
        const float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else if constexpr (TILE == 4) {
        const float4 a = *(const float4 *)p;
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    } else if constexpr (TILE == 2) {
        const float2 a = *(const float2 *)p;
        v[0] = a.x, v[1] = a.y;
    } else {
        v[0] = p[0];
    }
}

template <int TILE> __device__ __forceinline__ void store_tile(float *p, const float (&v)[TILE]) {
    if constexpr (TILE == 8) {
        ((float4 *)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        ((float4 *)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else if constexpr (TILE == 4) {
        *(float4 *)p = make_float4(v[0], v[1], v[2], v[3]);
    } else if constexpr (TILE == 2) {
        *(float2 *)p = make_float2(v[0], v[1]);
    } else {
        p[0] = v[0];
    }
}

/* One lane's row of a slice, its entry count and its TILE current y values (0 where it has no row). */
template <int TILE>
__device__ __forceinline__ void load_slice(const int32_t *__restrict__ lane_row, const int32_t *__restrict__ lane_len,
                                           const char *__restrict__ y, const size_t *yoff, int n_live, int64_t q,
                                           int32_t &row, int32_t &len, float (&yv)[TILE]) {
    row = lane_row[q];
    len = lane_len[q];
#pragma unroll
    for (int k = 0; k < TILE; k++) yv[k] = len > 0 && k < n_live ? ((const float *)(y + yoff[k]))[row] : 0.0f;
}

/* MUL_MAT. Block (bx, by) takes the token tile by*TILE .. +TILE and, warp by
 * warp, the slices bx*W + w, + gridDim.x*W, ... (W warps per block). With SMEM
 * the tile's activations are staged in shared memory first, column-major
 * (xs[c*TILE + k] = x[token k][c]), so one entry's TILE inputs come in one or
 * two vector loads; without, the gathers x[c] go to global memory. The tokens'
 * byte offsets live in shared memory, not in registers, so that 1024 threads a
 * block fit (see the top of this file). */
template <int TILE, bool SMEM>
__global__ void __launch_bounds__(EZ_MM_BLOCK, 1)
k_mul_mat(const int32_t *__restrict__ lane_row, const int32_t *__restrict__ lane_len,
          const int32_t *__restrict__ slice_start, const int32_t *__restrict__ cols, const float *__restrict__ vals,
          int64_t n_slices, int32_t n_in, const char *__restrict__ x, size_t xnb1, size_t xnb2, size_t xnb3,
          char *__restrict__ y, size_t ynb1, size_t ynb2, size_t ynb3, int64_t ne1, int64_t ne2, int64_t n_tok) {
    extern __shared__ float xs[];
    __shared__ size_t xoff[TILE], yoff[TILE]; /* byte offsets of the tile's tokens in x and y */
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t n_warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t t0 = (int64_t)blockIdx.y * TILE; t0 < n_tok; t0 += (int64_t)gridDim.y * TILE) {
        const int n_live = n_tok - t0 < TILE ? (int)(n_tok - t0) : TILE;
        __syncthreads(); /* the previous tile's readers are done with xs, xoff and yoff */
        if (threadIdx.x < TILE) {
            const int64_t t = t0 + (threadIdx.x < n_live ? threadIdx.x : 0);
            const int64_t i1 = t % ne1, i2 = (t / ne1) % ne2, i3 = t / (ne1 * ne2);
            xoff[threadIdx.x] = i1 * xnb1 + i2 * xnb2 + i3 * xnb3;
            yoff[threadIdx.x] = i1 * ynb1 + i2 * ynb2 + i3 * ynb3;
        }
        __syncthreads();
        if (SMEM) {
            const float *xr[TILE];
#pragma unroll
            for (int k = 0; k < TILE; k++) xr[k] = (const float *)(x + xoff[k]);
#pragma unroll 2
            for (int32_t c = threadIdx.x; c < n_in; c += blockDim.x) { /* coalesced loads along c */
                float v[TILE];
#pragma unroll
                for (int k = 0; k < TILE; k++) v[k] = k < n_live ? xr[k][c] : 0.0f;
                store_tile<TILE>(xs + (size_t)c * TILE, v);
            }
            __syncthreads();
        }
        /* The slice loop and the step loop are the same for the whole warp (the ballots need that).
         * The next slice's rows and y values are loaded while this slice's steps run. */
        int32_t row_n = 0, len_n = 0;
        float y_n[TILE];
        if (warp < n_slices) load_slice<TILE>(lane_row, lane_len, y, yoff, n_live, warp * 32 + lane, row_n, len_n, y_n);
        for (int64_t s = warp; s < n_slices; s += n_warps) {
            const int32_t row = row_n, len = len_n;
            float acc[TILE];
#pragma unroll
            for (int k = 0; k < TILE; k++) acc[k] = y_n[k];
            if (s + n_warps < n_slices)
                load_slice<TILE>(lane_row, lane_len, y, yoff, n_live, (s + n_warps) * 32 + lane, row_n, len_n, y_n);
            const int32_t steps = __shfl_sync(EZ_FULL, len, 0); /* lane 0 has the longest row */
            int32_t p = slice_start[s] + lane;
#pragma unroll kStepUnroll /* several steps' loads in flight; the sums stay in entry order */
            for (int32_t j = 0; j < steps; j++) {
                const int cnt = __popc(__ballot_sync(EZ_FULL, j < len));
                if (j < len) {
                    const int32_t c = cols[p];
                    const float v = vals[p];
                    float xv[TILE];
                    if (SMEM) {
                        load_tile<TILE>(xs + (size_t)c * TILE, xv);
                    } else {
#pragma unroll
                        for (int k = 0; k < TILE; k++) xv[k] = ((const float *)(x + xoff[k]))[c];
                    }
#pragma unroll
                    for (int k = 0; k < TILE; k++) /* dead tokens compute garbage that is never stored */
                        acc[k] = __fadd_rn(acc[k], __fmul_rn(v, xv[k]));
                }
                p += cnt;
            }
            if (len > 0) {
#pragma unroll
                for (int k = 0; k < TILE; k++)
                    if (k < n_live) ((float *)(y + yoff[k]))[row] = acc[k];
            }
        }
    }
}

/* MUL_MAT_ID: block row by takes the (expert slot k, token t) pairs by, by + gridDim.y, ...;
 * its warps take the slices of that pair's expert. */
__global__ void __launch_bounds__(EZ_BLOCK)
k_mul_mat_id(const int32_t *__restrict__ lane_row, const int32_t *__restrict__ lane_len,
             const int32_t *__restrict__ slice_start, const int32_t *__restrict__ cols, const float *__restrict__ vals,
             const int32_t *__restrict__ expert_slice, int32_t n_out, int32_t n_expert, const char *__restrict__ x,
             size_t xnb1, size_t xnb2, int64_t ne11, const char *__restrict__ ids, size_t inb0, size_t inb1,
             char *__restrict__ y, size_t ynb1, size_t ynb2, int64_t n_used, int64_t n_tok) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t n_warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t pr = blockIdx.y; pr < n_used * n_tok; pr += gridDim.y) {
        const int64_t k = pr % n_used, t = pr / n_used;
        const int32_t e = *(const int32_t *)(ids + k * inb0 + t * inb1);
        if (e < 0 || e >= n_expert) continue;
        const float *xr = (const float *)(x + (k % ne11) * xnb1 + t * xnb2);
        float *yr = (float *)(y + k * ynb1 + t * ynb2);
        const int32_t base = e * n_out;
        for (int64_t s = expert_slice[e] + warp; s < expert_slice[e + 1]; s += n_warps) {
            const int32_t row = lane_row[s * 32 + lane] - base, len = lane_len[s * 32 + lane];
            const int32_t steps = __shfl_sync(EZ_FULL, len, 0);
            float acc = len > 0 ? yr[row] : 0.0f;
            int64_t p = slice_start[s] + lane;
            for (int32_t j = 0; j < steps; j++) {
                const int cnt = __popc(__ballot_sync(EZ_FULL, j < len));
                if (j < len) acc = __fadd_rn(acc, __fmul_rn(vals[p], xr[cols[p]]));
                p += cnt;
            }
            if (len > 0) yr[row] = acc;
        }
    }
}

/* GET_ROWS: warp w takes the looked-up rows w, w + (all warps), ...; the row's
 * entries are spread over its lanes (distinct columns, so distinct outputs). */
__global__ void __launch_bounds__(EZ_BLOCK)
k_get_rows(const int32_t *__restrict__ lane_len, const int32_t *__restrict__ slice_start,
           const int32_t *__restrict__ cols, const float *__restrict__ vals, const int32_t *__restrict__ urows,
           const int32_t *__restrict__ upos, int64_t n_urows, const char *__restrict__ ids, size_t inb0, size_t inb1,
           size_t inb2, int64_t ine0, int64_t ine1, int64_t ine2, char *__restrict__ y, size_t ynb1, size_t ynb2,
           size_t ynb3) {
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t n_warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t i = warp; i < ine0 * ine1 * ine2; i += n_warps) {
        const int64_t i0 = i % ine0, i1 = (i / ine0) % ine1, i2 = i / (ine0 * ine1);
        const int32_t r = *(const int32_t *)(ids + i0 * inb0 + i1 * inb1 + i2 * inb2);
        int64_t lo = 0, hi = n_urows; /* first row with entries >= r */
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (urows[mid] < r) lo = mid + 1; else hi = mid;
        }
        if (lo == n_urows || urows[lo] != r) continue;
        const int64_t s = upos[lo] >> 5;
        const int me = upos[lo] & 31;
        const int32_t len = lane_len[s * 32 + lane];
        const int32_t mine = __shfl_sync(EZ_FULL, len, me);
        float *yr = (float *)(y + i0 * ynb1 + i1 * ynb2 + i2 * ynb3);
        int64_t p = slice_start[s] + me; /* entry j of lane me: past the lanes' entries of steps < j */
        for (int32_t j = 0; j < mine; j++) {
            const int cnt = __popc(__ballot_sync(EZ_FULL, j < len));
            if (lane == (j & 31)) yr[cols[p]] = __fadd_rn(yr[cols[p]], vals[p]);
            p += cnt;
        }
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
        dev->smem_optin -= 256; /* k_mul_mat's static shared memory (token offsets) comes out of the same budget */
        if (err == cudaSuccess)
            err = cudaDeviceGetAttribute(&dev->smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, d);
        if (err == cudaSuccess)
            err = cudaDeviceGetAttribute(&dev->threads_sm, cudaDevAttrMaxThreadsPerMultiProcessor, d);
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

void *ez_cuda_stream(int device) {
    return device >= 0 && device < EZ_CUDA_MAX_DEVICES && devices[device].ready ? (void *)devices[device].stream : NULL;
}

const char *ez_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

/* ---- matrices ------------------------------------------------------------------ */

void ez_cuda_matrix_free(ez_cuda_matrix *a) {
    if (!a) return;
    cudaSetDevice(a->device);
    cudaFree(a->ints);
    cudaFree(a->vals);
    cudaFreeHost(a->h_vals);
    free(a->src);
    free(a);
}

/* The slices, on the host: fills the lane/slice arrays and cols of h (laid out
 * as on the device) and src. rows/cols are CSR (rows non-decreasing). */
static void build_slices(const int32_t *rows, const int32_t *cols, int64_t n, int64_t n_out, int64_t n_expert,
                         const int32_t *urows, const int32_t *ustart, int64_t n_urows, int32_t *lane_row,
                         int32_t *lane_len, int32_t *slice_start, int32_t *jcols, int32_t *upos,
                         int32_t *expert_slice, int32_t *src) {
    (void)rows;
    int64_t s = 0, p = 0, u = 0;
    for (int64_t e = 0; e < n_expert; e++) {
        expert_slice[e] = (int32_t)s;
        int64_t u_end = u;
        while (u_end < n_urows && urows[u_end] < (e + 1) * n_out) u_end++;
        for (; u < u_end; s++) {
            const int64_t k = u_end - u < 32 ? u_end - u : 32; /* rows in this slice */
            int32_t order[32];
            for (int l = 0; l < k; l++) { /* stable insertion sort, longest row first */
                const int32_t len = ustart[u + l + 1] - ustart[u + l];
                int m = l;
                while (m > 0 && ustart[u + order[m - 1] + 1] - ustart[u + order[m - 1]] < len) {
                    order[m] = order[m - 1];
                    m--;
                }
                order[m] = l;
            }
            int32_t steps = 0;
            for (int l = 0; l < 32; l++) {
                const int64_t q = s * 32 + l;
                if (l < k) {
                    const int64_t v = u + order[l];
                    lane_row[q] = urows[v];
                    lane_len[q] = ustart[v + 1] - ustart[v];
                    upos[v] = (int32_t)q;
                    if (lane_len[q] > steps) steps = lane_len[q];
                } else {
                    lane_row[q] = 0;
                    lane_len[q] = 0;
                }
            }
            slice_start[s] = (int32_t)p;
            for (int32_t j = 0; j < steps; j++)
                for (int l = 0; l < k && lane_len[s * 32 + l] > j; l++) {
                    const int32_t i = ustart[u + order[l]] + j; /* CSR index of entry j of this lane's row */
                    jcols[p] = cols[i];
                    src[p++] = i;
                }
            u += k;
        }
    }
    expert_slice[n_expert] = (int32_t)s;
    slice_start[s] = (int32_t)p; /* == n */
    (void)n;
}

int ez_cuda_matrix_new(int device, const int32_t *rows, const int32_t *cols, int64_t n, int64_t n_in,
                       int64_t n_out, int64_t n_expert, ez_cuda_matrix **out) {
    *out = NULL;
    if (n < 1 || n > INT32_MAX - 64 || n_in > INT32_MAX) return (int)cudaErrorInvalidValue;
    int rc = device_init(device);
    if (rc) return rc;
    TRY(cudaSetDevice(device));

    /* Host side first: the unique rows and where each one's entries start (CSR),
     * then the slices. */
    int64_t n_urows = 0;
    for (int64_t i = 0; i < n; i++) n_urows += i == 0 || rows[i] != rows[i - 1];
    int32_t *urows_h = (int32_t *)malloc((size_t)n_urows * sizeof(int32_t));
    int32_t *ustart = (int32_t *)malloc((size_t)(n_urows + 1) * sizeof(int32_t));
    if (!urows_h || !ustart) {
        free(urows_h);
        free(ustart);
        return (int)cudaErrorMemoryAllocation;
    }
    int64_t u = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i == 0 || rows[i] != rows[i - 1]) {
            urows_h[u] = rows[i];
            ustart[u++] = (int32_t)i;
        }
    }
    ustart[n_urows] = (int32_t)n;
    /* Slices per expert: its rows, 32 at a time. */
    int64_t n_slices = 0;
    for (int64_t e = 0, v = 0; e < n_expert; e++) {
        const int64_t v0 = v;
        while (v < n_urows && urows_h[v] < (e + 1) * n_out) v++;
        n_slices += (v - v0 + 31) / 32;
    }
    const int64_t n_lanes = n_slices * 32;
    const int64_t n_ints = 2 * n_lanes + (n_slices + 1) + n + 2 * n_urows + (n_expert + 1);
    int32_t *h = (int32_t *)malloc((size_t)n_ints * sizeof *h);
    ez_cuda_matrix *a = (ez_cuda_matrix *)calloc(1, sizeof *a);
    int32_t *src = (int32_t *)malloc((size_t)n * sizeof *src);
    if (!h || !a || !src || n_slices > INT32_MAX / 32) {
        free(urows_h), free(ustart), free(h), free(a), free(src);
        return (int)(n_slices > INT32_MAX / 32 ? cudaErrorInvalidValue : cudaErrorMemoryAllocation);
    }
    int32_t *lane_row = h, *lane_len = lane_row + n_lanes, *slice_start = lane_len + n_lanes,
            *jcols = slice_start + n_slices + 1, *urows = jcols + n, *upos = urows + n_urows,
            *expert_slice = upos + n_urows;
    memcpy(urows, urows_h, (size_t)n_urows * sizeof *urows);
    build_slices(rows, cols, n, n_out, n_expert, urows_h, ustart, n_urows, lane_row, lane_len, slice_start, jcols,
                 upos, expert_slice, src);
    free(urows_h);
    free(ustart);

    a->device = device;
    a->n = n;
    a->n_urows = n_urows;
    a->n_slices = n_slices;
    a->n_in = n_in;
    a->n_out = n_out;
    a->n_expert = n_expert;
    a->src = src;
    cudaError_t err = cudaMalloc((void **)&a->ints, (size_t)n_ints * sizeof *h);
    if (err == cudaSuccess) err = cudaMalloc((void **)&a->vals, (size_t)n * sizeof(float));
    if (err == cudaSuccess) err = cudaMallocHost((void **)&a->h_vals, (size_t)n * sizeof(float));
    a->n_sets = 1;
    if (err == cudaSuccess) err = cudaMemcpy(a->ints, h, (size_t)n_ints * sizeof *h, cudaMemcpyHostToDevice);
    free(h);
    if (err != cudaSuccess) {
        ez_cuda_matrix_free(a);
        return (int)err;
    }
    a->lane_row = a->ints;
    a->lane_len = a->lane_row + n_lanes;
    a->slice_start = a->lane_len + n_lanes;
    a->cols = a->slice_start + n_slices + 1;
    a->urows = a->cols + n;
    a->upos = a->urows + n_urows;
    a->expert_slice = a->upos + n_urows;
    *out = a;
    return 0;
}

int ez_cuda_matrix_reserve(ez_cuda_matrix *a, int32_t n_sets) {
    if (n_sets <= a->n_sets) return 0;
    TRY(cudaSetDevice(a->device));
    float *vals = NULL, *h_vals = NULL;
    cudaError_t err = cudaMalloc((void **)&vals, (size_t)n_sets * a->n * sizeof(float));
    if (err == cudaSuccess) err = cudaMallocHost((void **)&h_vals, (size_t)n_sets * a->n * sizeof(float));
    if (err != cudaSuccess) {
        cudaFree(vals);
        return (int)err;
    }
    cudaFree(a->vals);
    cudaFreeHost(a->h_vals);
    a->vals = vals;
    a->h_vals = h_vals;
    a->n_sets = n_sets;
    return 0;
}

void ez_cuda_matrix_stage(ez_cuda_matrix *a, int32_t set, const float *values) {
    const int32_t *src = a->src;
    float *dst = a->h_vals + (size_t)set * a->n;
    for (int64_t p = 0; p < a->n; p++) dst[p] = values[src[p]];
}

int ez_cuda_matrix_upload(ez_cuda_matrix *a, int32_t n_sets) {
    TRY(cudaSetDevice(a->device));
    TRY(cudaMemcpyAsync(a->vals, a->h_vals, (size_t)n_sets * a->n * sizeof(float), cudaMemcpyHostToDevice,
                        devices[a->device].stream));
    return 0;
}

int ez_cuda_matrix_set_values(ez_cuda_matrix *a, const float *values) {
    ez_cuda_matrix_stage(a, 0, values);
    return ez_cuda_matrix_upload(a, 1);
}

/* ---- launchers ------------------------------------------------------------------- */

static unsigned clamp_grid(int64_t want, int64_t lo, int64_t hi) {
    return (unsigned)(want < lo ? lo : want > hi ? hi : want);
}

int ez_cuda_mul_mat(const ez_cuda_matrix *a, int32_t set, const void *x, const size_t *xnb, void *y, const size_t *ynb,
                    const int64_t *ne) {
    const int64_t n_tok = ne[1] * ne[2] * ne[3];
    if (n_tok == 0) return 0;
    const ez_cuda_device *dev = &devices[a->device];
    TRY(cudaSetDevice(a->device));
    const int32_t n_in = (int32_t)a->n_in; /* x's rows: the weight's input width */
    const float *vals = a->vals + (size_t)set * a->n;
    /* The token tile: the largest whose activations fit in EZ_SMEM_SOFT bytes,
     * down to one token; then all of the shared memory if one token needs more;
     * past that, gathers from global memory. A bigger tile reads each entry for
     * more tokens; a smaller one leaves room for more blocks per multiprocessor. */
    int tile = EZ_TILE;
    while (tile > 1 && ((size_t)tile * n_in * sizeof(float) > EZ_SMEM_SOFT || tile / 2 >= n_tok)) tile /= 2;
    const bool smem = (size_t)tile * n_in * sizeof(float) <= (size_t)dev->smem_optin;
    const size_t shmem = smem ? (size_t)tile * n_in * sizeof(float) : 0;
    const int64_t warps = EZ_MM_BLOCK / 32;
    const int64_t slice_blocks = (a->n_slices + warps - 1) / warps;
    dim3 grid;
    grid.y = clamp_grid((n_tok + tile - 1) / tile, 1, 65535);
    /* Slices are split over blocks until a warp owns about EZ_SLICES_PER_WARP of
     * them and every multiprocessor has as many blocks as fit on it; every extra
     * block stages its tile again. (The sweep behind the constants: docs/gpu.md.) */
    const int64_t want = (a->n_slices + warps * EZ_SLICES_PER_WARP - 1) / (warps * EZ_SLICES_PER_WARP);
    int64_t per_sm = dev->threads_sm / EZ_MM_BLOCK;
    if (shmem && (int64_t)(dev->smem_sm / (shmem + 1024)) < per_sm) per_sm = dev->smem_sm / (shmem + 1024);
    if (per_sm < 1) per_sm = 1;
    const int64_t fill = (dev->n_sm * per_sm + grid.y - 1) / grid.y;
    grid.x = smem ? clamp_grid(want > fill ? want : fill, 1, slice_blocks) : clamp_grid(slice_blocks, 1, 65535);
    const char *xc = (const char *)x;
    char *yc = (char *)y;
#define EZ_LAUNCH(T, S)                                                                                    \
    k_mul_mat<T, S><<<grid, EZ_MM_BLOCK, shmem, dev->stream>>>(a->lane_row, a->lane_len, a->slice_start,   \
                                                               a->cols, vals, a->n_slices, n_in, xc,      \
                                                               xnb[1], xnb[2], xnb[3], yc, ynb[1], ynb[2], \
                                                               ynb[3], ne[1], ne[2], n_tok)
    if (!smem) EZ_LAUNCH(EZ_TILE, false);
    else if (tile == 8) EZ_LAUNCH(8, true);
    else if (tile == 4) EZ_LAUNCH(4, true);
    else if (tile == 2) EZ_LAUNCH(2, true);
    else EZ_LAUNCH(1, true);
#undef EZ_LAUNCH
    return (int)cudaGetLastError();
}

int ez_cuda_mul_mat_id(const ez_cuda_matrix *a, int32_t set, const void *x, const size_t *xnb, int64_t ne11, const void *ids,
                       const size_t *inb, void *y, const size_t *ynb, int64_t n_used, int64_t n_tok) {
    if (n_used * n_tok == 0) return 0;
    const ez_cuda_device *dev = &devices[a->device];
    TRY(cudaSetDevice(a->device));
    const int64_t slices_per_expert = (a->n_slices + a->n_expert - 1) / a->n_expert;
    dim3 grid;
    grid.y = clamp_grid(n_used * n_tok, 1, 65535);
    grid.x = clamp_grid((slices_per_expert + EZ_BLOCK / 32 - 1) / (EZ_BLOCK / 32), 1, 8);
    k_mul_mat_id<<<grid, EZ_BLOCK, 0, dev->stream>>>(a->lane_row, a->lane_len, a->slice_start, a->cols,
                                                     a->vals + (size_t)set * a->n,
                                                     a->expert_slice, (int32_t)a->n_out, (int32_t)a->n_expert,
                                                     (const char *)x, xnb[1], xnb[2], ne11, (const char *)ids, inb[0],
                                                     inb[1], (char *)y, ynb[1], ynb[2], n_used, n_tok);
    return (int)cudaGetLastError();
}

int ez_cuda_get_rows(const ez_cuda_matrix *a, int32_t set, const void *ids, const size_t *inb, const int64_t *ine, void *y,
                     const size_t *ynb) {
    const int64_t n_ids = ine[0] * ine[1] * ine[2];
    if (n_ids == 0) return 0;
    const ez_cuda_device *dev = &devices[a->device];
    TRY(cudaSetDevice(a->device));
    k_get_rows<<<clamp_grid((n_ids + EZ_BLOCK / 32 - 1) / (EZ_BLOCK / 32), 1, 1 << 20), EZ_BLOCK, 0, dev->stream>>>(
        a->lane_len, a->slice_start, a->cols, a->vals + (size_t)set * a->n, a->urows, a->upos, a->n_urows, (const char *)ids, inb[0],
        inb[1], inb[2], ine[0], ine[1], ine[2], (char *)y, ynb[1], ynb[2], ynb[3]);
    return (int)cudaGetLastError();
}
