/* The CUDA kernels of native/edge_zo_cuda.cu against a plain host reference
 * (the loops of edge_zo.c's host kernels), on fresh random inputs of awkward
 * shapes: strided activations, token counts that are no multiple of the tile,
 * each shared-memory tile size and the global-memory variant, MUL_MAT_ID with
 * out-of-range expert ids, GET_ROWS with repeated and entry-less rows.
 * Both sides do the same float operations in the same order, so the check is
 * bit-exact; every output element is compared, including the ones no entry
 * touches (they must come back unchanged).
 *
 *   nvcc -O2 -std=c++17 -arch=sm_90 -Xcompiler -ffp-contract=off -Inative \
 *        bench/gpu/kernel_check.cu native/edge_zo_cuda.cu -o /tmp/kernel_check && /tmp/kernel_check
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "edge_zo_cuda.h"

static std::mt19937_64 rng(12345);
static int failures = 0;

#define CK(call)                                                                                  \
    do {                                                                                          \
        int rc_ = (int)(call);                                                                    \
        if (rc_) {                                                                                \
            fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #call, ez_cuda_error_string(rc_)); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

static float frand() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }

/* n distinct flat indices of an [n_expert, n_out, n_in] weight, sorted; rows/cols as edge_zo.c keeps them. */
static void entries(int64_t n_in, int64_t n_out, int64_t n_expert, int64_t n, std::vector<int32_t> &rows,
                    std::vector<int32_t> &cols, std::vector<float> &vals) {
    std::vector<int64_t> idx;
    std::uniform_int_distribution<int64_t> d(0, n_in * n_out * n_expert - 1);
    while ((int64_t)idx.size() < n) {
        idx.push_back(d(rng));
        if ((int64_t)idx.size() == n) {
            std::sort(idx.begin(), idx.end());
            idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
        }
    }
    rows.resize(n), cols.resize(n), vals.resize(n);
    for (int64_t i = 0; i < n; i++) {
        rows[i] = (int32_t)(idx[i] / n_in);
        cols[i] = (int32_t)(idx[i] % n_in);
        vals[i] = frand();
    }
}

static void compare(const char *what, const std::vector<float> &got, const std::vector<float> &want) {
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < got.size(); i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0) {
            if (first < 0) first = (int64_t)i;
            bad++;
        }
    if (bad) {
        failures++;
        printf("FAIL %s: %lld of %zu elements differ (first at %lld: %.9g vs %.9g)\n", what, (long long)bad,
               got.size(), (long long)first, got[first], want[first]);
    } else {
        printf("ok   %s (%zu elements)\n", what, got.size());
    }
}

template <class T> static T *to_device(const std::vector<T> &h) {
    T *d;
    CK(cudaMalloc((void **)&d, h.size() * sizeof(T)));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

/* MUL_MAT with y of shape [n_out, ne1, ne2, 1]; x rows padded to `x_row` floats (a strided view). */
static void check_mul_mat(int64_t n_in, int64_t n_out, int64_t ne1, int64_t ne2, int64_t n, int64_t x_row) {
    std::vector<int32_t> rows, cols;
    std::vector<float> vals;
    entries(n_in, n_out, 1, n, rows, cols, vals);
    const int64_t n_tok = ne1 * ne2;
    std::vector<float> x(x_row * n_tok), y(n_out * n_tok);
    for (auto &v : x) v = frand();
    for (auto &v : y) v = frand();
    const size_t xnb[4] = {4, (size_t)x_row * 4, (size_t)(x_row * ne1) * 4, (size_t)(x_row * n_tok) * 4};
    const size_t ynb[4] = {4, (size_t)n_out * 4, (size_t)(n_out * ne1) * 4, (size_t)(n_out * n_tok) * 4};
    const int64_t ne[4] = {n_out, ne1, ne2, 1};
    std::vector<float> want = y;
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t k = 0; k < (int64_t)rows.size(); k++)
            want[t * n_out + rows[k]] += vals[k] * x[t * x_row + cols[k]];
    ez_cuda_matrix *a;
    CK(ez_cuda_matrix_new(0, rows.data(), cols.data(), (int64_t)rows.size(), n_in, n_out, 1, &a));
    CK(ez_cuda_matrix_set_values(a, vals.data()));
    float *dx = to_device(x), *dy = to_device(y);
    CK(ez_cuda_mul_mat(a, 0, dx, xnb, dy, ynb, ne));
    CK(ez_cuda_sync(0));
    std::vector<float> got(y.size());
    CK(cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost));
    char what[160];
    snprintf(what, sizeof what, "mul_mat n_in %lld n_out %lld tokens %lldx%lld entries %zu x_row %lld",
             (long long)n_in, (long long)n_out, (long long)ne1, (long long)ne2, rows.size(), (long long)x_row);
    compare(what, got, want);
    cudaFree(dx), cudaFree(dy);
    ez_cuda_matrix_free(a);
}

static void check_mul_mat_id(int64_t n_in, int64_t n_out, int64_t n_expert, int64_t n_used, int64_t ne11,
                             int64_t n_tok, int64_t n) {
    std::vector<int32_t> rows, cols;
    std::vector<float> vals;
    entries(n_in, n_out, n_expert, n, rows, cols, vals);
    std::vector<int64_t> estart(n_expert + 1, 0);
    for (int32_t r : rows) estart[r / n_out + 1]++;
    for (int64_t e = 0; e < n_expert; e++) estart[e + 1] += estart[e];
    std::vector<float> x(n_in * ne11 * n_tok), y(n_out * n_used * n_tok);
    std::vector<int32_t> ids(n_used * n_tok);
    for (auto &v : x) v = frand();
    for (auto &v : y) v = frand();
    std::uniform_int_distribution<int32_t> de(-1, (int32_t)n_expert); /* -1 and n_expert: skipped */
    for (auto &v : ids) v = de(rng);
    const size_t xnb[4] = {4, (size_t)n_in * 4, (size_t)(n_in * ne11) * 4, 0};
    const size_t ynb[4] = {4, (size_t)n_out * 4, (size_t)(n_out * n_used) * 4, 0};
    const size_t inb[4] = {4, (size_t)n_used * 4, 0, 0};
    std::vector<float> want = y;
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t k = 0; k < n_used; k++) {
            const int32_t e = ids[t * n_used + k];
            if (e < 0 || e >= n_expert) continue;
            for (int64_t j = estart[e]; j < estart[e + 1]; j++)
                want[(t * n_used + k) * n_out + rows[j] - e * n_out] += vals[j] * x[(t * ne11 + k % ne11) * n_in + cols[j]];
        }
    ez_cuda_matrix *a;
    CK(ez_cuda_matrix_new(0, rows.data(), cols.data(), (int64_t)rows.size(), n_in, n_out, n_expert, &a));
    CK(ez_cuda_matrix_set_values(a, vals.data()));
    float *dx = to_device(x), *dy = to_device(y);
    int32_t *di = to_device(ids);
    CK(ez_cuda_mul_mat_id(a, 0, dx, xnb, ne11, di, inb, dy, ynb, n_used, n_tok));
    CK(ez_cuda_sync(0));
    std::vector<float> got(y.size());
    CK(cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost));
    char what[160];
    snprintf(what, sizeof what, "mul_mat_id n_in %lld n_out %lld experts %lld used %lld ne11 %lld tokens %lld",
             (long long)n_in, (long long)n_out, (long long)n_expert, (long long)n_used, (long long)ne11,
             (long long)n_tok);
    compare(what, got, want);
    cudaFree(dx), cudaFree(dy), cudaFree(di);
    ez_cuda_matrix_free(a);
}

static void check_get_rows(int64_t n_in, int64_t n_rows, int64_t n_ids, int64_t n) {
    std::vector<int32_t> rows, cols;
    std::vector<float> vals;
    entries(n_in, n_rows, 1, n, rows, cols, vals);
    std::vector<int32_t> ids(n_ids);
    std::uniform_int_distribution<int32_t> dr(0, (int32_t)n_rows - 1);
    for (auto &v : ids) v = dr(rng);
    std::vector<float> y(n_in * n_ids);
    for (auto &v : y) v = frand();
    const size_t inb[4] = {4, (size_t)n_ids * 4, (size_t)n_ids * 4, 0};
    const int64_t ine[4] = {n_ids, 1, 1, 1};
    const size_t ynb[4] = {4, (size_t)n_in * 4, (size_t)(n_in * n_ids) * 4, (size_t)(n_in * n_ids) * 4};
    std::vector<float> want = y;
    for (int64_t i = 0; i < n_ids; i++)
        for (size_t j = 0; j < rows.size(); j++)
            if (rows[j] == ids[i]) want[i * n_in + cols[j]] += vals[j];
    ez_cuda_matrix *a;
    CK(ez_cuda_matrix_new(0, rows.data(), cols.data(), (int64_t)rows.size(), n_in, n_rows, 1, &a));
    CK(ez_cuda_matrix_set_values(a, vals.data()));
    int32_t *di = to_device(ids);
    float *dy = to_device(y);
    CK(ez_cuda_get_rows(a, 0, di, inb, ine, dy, ynb));
    CK(ez_cuda_sync(0));
    std::vector<float> got(y.size());
    CK(cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost));
    char what[160];
    snprintf(what, sizeof what, "get_rows n_in %lld rows %lld ids %lld entries %zu", (long long)n_in,
             (long long)n_rows, (long long)n_ids, rows.size());
    compare(what, got, want);
    cudaFree(di), cudaFree(dy);
    ez_cuda_matrix_free(a);
}

/* Values changed after a forward: the next upload replaces them. */
static void check_values_update() {
    std::vector<int32_t> rows, cols;
    std::vector<float> vals;
    entries(64, 32, 1, 100, rows, cols, vals);
    const int64_t n_tok = 5;
    std::vector<float> x(64 * n_tok), y(32 * n_tok, 0.0f);
    for (auto &v : x) v = frand();
    const size_t xnb[4] = {4, 64 * 4, 64 * 4 * n_tok, 64 * 4 * n_tok}, ynb[4] = {4, 32 * 4, 32 * 4 * n_tok, 32 * 4 * n_tok};
    const int64_t ne[4] = {32, n_tok, 1, 1};
    ez_cuda_matrix *a;
    CK(ez_cuda_matrix_new(0, rows.data(), cols.data(), (int64_t)rows.size(), 64, 32, 1, &a));
    float *dx = to_device(x), *dy = to_device(y);
    CK(ez_cuda_matrix_set_values(a, vals.data()));
    CK(ez_cuda_sync(0));
    for (auto &v : vals) v = -v;
    CK(ez_cuda_matrix_set_values(a, vals.data()));
    CK(ez_cuda_mul_mat(a, 0, dx, xnb, dy, ynb, ne));
    CK(ez_cuda_sync(0));
    for (auto &v : vals) v = -v;
    CK(ez_cuda_matrix_set_values(a, vals.data()));
    CK(ez_cuda_mul_mat(a, 0, dx, xnb, dy, ynb, ne)); /* y = -Sx + Sx: exactly 0 where rows have one entry... */
    CK(ez_cuda_sync(0));
    std::vector<float> got(y.size());
    CK(cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (float v : got) worst = fmax(worst, fabs(v));
    if (worst > 1e-5) {
        failures++;
        printf("FAIL values update: |y| up to %g after adding -S x and S x\n", worst);
    } else {
        printf("ok   values update (|y| <= %g)\n", worst);
    }
    cudaFree(dx), cudaFree(dy);
    ez_cuda_matrix_free(a);
}


/* ---- the previous MUL_MAT kernel (CSR: a thread per row, a row's entries stored together), kept
 * here only to time it beside the current one on the same inputs (docs/gpu.md) ---- */
template <int TILE, bool SMEM>
__global__ void __launch_bounds__(256)
legacy_k_mul_mat(const int32_t *__restrict__ urows, const int32_t *__restrict__ ustart, const int32_t *__restrict__ cols,
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
#pragma unroll 2 /* several rows' load chains in flight per thread */
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

struct legacy_matrix {
    int32_t *urows, *ustart, *cols;
    float *vals;
    int64_t n_urows;
};

static legacy_matrix legacy_new(const std::vector<int32_t> &rows, const std::vector<int32_t> &cols,
                                const std::vector<float> &vals) {
    std::vector<int32_t> ur, us;
    for (size_t i = 0; i < rows.size(); i++)
        if (i == 0 || rows[i] != rows[i - 1]) ur.push_back(rows[i]), us.push_back((int32_t)i);
    us.push_back((int32_t)rows.size());
    legacy_matrix m;
    m.urows = to_device(ur), m.ustart = to_device(us), m.cols = to_device(cols), m.vals = to_device(vals);
    m.n_urows = (int64_t)ur.size();
    return m;
}

static void legacy_free(legacy_matrix &m) { cudaFree(m.urows), cudaFree(m.ustart), cudaFree(m.cols), cudaFree(m.vals); }

/* The old launcher's choices: tile by 100 KB, rows split until a thread owns 16, two blocks per SM. */
static void legacy_launch(const legacy_matrix &m, int32_t n_in, const float *x, float *y, int64_t n_out, int64_t n_tok,
                          cudaStream_t st) {
    static int n_sm = 0, optin = 0;
    if (!n_sm) {
        CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, 0));
        CK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
        CK(cudaFuncSetAttribute(legacy_k_mul_mat<8, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        CK(cudaFuncSetAttribute(legacy_k_mul_mat<4, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        CK(cudaFuncSetAttribute(legacy_k_mul_mat<2, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        CK(cudaFuncSetAttribute(legacy_k_mul_mat<1, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    }
    int tile = 8;
    while (tile > 1 && ((size_t)tile * n_in * 4 > 100 * 1024 || tile / 2 >= n_tok)) tile /= 2;
    const size_t shmem = (size_t)tile * n_in * 4;
    const int64_t row_blocks = (m.n_urows + 255) / 256;
    dim3 grid;
    grid.y = (unsigned)std::min<int64_t>((n_tok + tile - 1) / tile, 65535);
    const int64_t want = (m.n_urows + 256 * 16 - 1) / (256 * 16), fill = (2 * n_sm + grid.y - 1) / grid.y;
    grid.x = (unsigned)std::max<int64_t>(1, std::min<int64_t>(std::max(want, fill), row_blocks));
    const size_t xb = (size_t)n_in * 4, yb = (size_t)n_out * 4;
    const bool vec4 = n_in % 4 == 0;
#define LEG(T) legacy_k_mul_mat<T, true><<<grid, 256, shmem, st>>>(m.urows, m.ustart, m.cols, m.vals, m.n_urows, n_in, \
        (const char *)x, xb, xb * n_tok, xb * n_tok, (char *)y, yb, yb * n_tok, yb * n_tok, n_tok, 1, n_tok, vec4)
    if (tile == 8) LEG(8); else if (tile == 4) LEG(4); else if (tile == 2) LEG(2); else LEG(1);
#undef LEG
    CK(cudaGetLastError());
}

/* Host-clock time of one apply as edge_zo.c does it: launch + synchronize (median of `reps`), and of
 * one values upload. Shapes: the block matmuls of SmolLM2-135M and Llama-2-7B, 0.1% entries. */
static double now_us() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

/* Per shape: the host-clock time of one apply as edge_zo.c does it (launch + synchronize, warm
 * caches), the GPU time of the kernel alone with the L2 cache flushed first (in a forward, x and y
 * were last touched by llama.cpp's matmul, and the entries by nobody for a whole layer), the same
 * for the previous CSR kernel, and one values upload (stage + copy). Medians of 30. */
static void time_mul_mat(const char *name, int64_t n_in, int64_t n_out, int64_t n_tok) {
    std::vector<int32_t> rows, cols;
    std::vector<float> vals;
    entries(n_in, n_out, 1, n_in * n_out / 1000, rows, cols, vals);
    std::vector<float> x(n_in * n_tok), y(n_out * n_tok, 0.0f);
    for (auto &v : x) v = frand();
    const size_t xnb[4] = {4, (size_t)n_in * 4, (size_t)(n_in * n_tok) * 4, (size_t)(n_in * n_tok) * 4};
    const size_t ynb[4] = {4, (size_t)n_out * 4, (size_t)(n_out * n_tok) * 4, (size_t)(n_out * n_tok) * 4};
    const int64_t ne[4] = {n_out, n_tok, 1, 1};
    ez_cuda_matrix *a;
    CK(ez_cuda_matrix_new(0, rows.data(), cols.data(), (int64_t)rows.size(), n_in, n_out, 1, &a));
    legacy_matrix lm = legacy_new(rows, cols, vals);
    float *dx = to_device(x), *dy = to_device(y);
    static char *flush = nullptr;
    const size_t flush_bytes = 256u << 20; /* well over the 50 MB L2 of an H100 */
    if (!flush) CK(cudaMalloc((void **)&flush, flush_bytes));
    cudaStream_t st;
    cudaEvent_t e0, e1;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<double> t_apply, t_upload, t_gpu, t_legacy;
    for (int r = 0; r < 30; r++) {
        double t = now_us();
        CK(ez_cuda_matrix_set_values(a, vals.data()));
        CK(ez_cuda_sync(0));
        t_upload.push_back(now_us() - t);
        t = now_us();
        CK(ez_cuda_mul_mat(a, 0, dx, xnb, dy, ynb, ne));
        CK(ez_cuda_sync(0));
        t_apply.push_back(now_us() - t);
        /* GPU time, L2 flushed: events on the library's own stream around the kernel. */
        float ms;
        cudaStream_t ls = (cudaStream_t)ez_cuda_stream(0);
        CK(cudaMemsetAsync(flush, r & 0xff, flush_bytes, ls));
        CK(cudaEventRecord(e0, ls));
        CK(ez_cuda_mul_mat(a, 0, dx, xnb, dy, ynb, ne));
        CK(cudaEventRecord(e1, ls));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms, e0, e1));
        t_gpu.push_back(ms * 1e3);
        CK(cudaMemsetAsync(flush, r & 0xff, flush_bytes, st));
        CK(cudaEventRecord(e0, st));
        legacy_launch(lm, (int32_t)n_in, dx, dy, n_out, n_tok, st);
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms, e0, e1));
        t_legacy.push_back(ms * 1e3);
    }
    std::sort(t_apply.begin(), t_apply.end());
    std::sort(t_upload.begin(), t_upload.end());
    std::sort(t_gpu.begin(), t_gpu.end());
    std::sort(t_legacy.begin(), t_legacy.end());
    printf("time %-22s n_in %6lld n_out %6lld tokens %5lld entries %6zu: apply %7.1f us, cold %7.1f us "
           "(previous kernel %7.1f us), values upload %7.1f us\n",
           name, (long long)n_in, (long long)n_out, (long long)n_tok, rows.size(), t_apply[15], t_gpu[15],
           t_legacy[15], t_upload[15]);
    cudaEventDestroy(e0), cudaEventDestroy(e1), cudaStreamDestroy(st);
    cudaFree(dx), cudaFree(dy);
    legacy_free(lm);
    ez_cuda_matrix_free(a);
}

/* `kernel_check profile`: one launch of the current and of the previous MUL_MAT kernel per 7B shape at
 * 1024 tokens and nothing else, for a profiler (ncu -k regex:k_mul_mat). */
static void profile_shapes() {
    const int64_t shapes[3][2] = {{4096, 4096}, {4096, 11008}, {11008, 4096}};
    for (auto &sh : shapes) {
        const int64_t n_in = sh[0], n_out = sh[1], n_tok = 1024;
        std::vector<int32_t> rows, cols;
        std::vector<float> vals;
        entries(n_in, n_out, 1, n_in * n_out / 1000, rows, cols, vals);
        std::vector<float> x(n_in * n_tok, 0.5f), y(n_out * n_tok, 0.0f);
        const size_t xnb[4] = {4, (size_t)n_in * 4, (size_t)(n_in * n_tok) * 4, (size_t)(n_in * n_tok) * 4};
        const size_t ynb[4] = {4, (size_t)n_out * 4, (size_t)(n_out * n_tok) * 4, (size_t)(n_out * n_tok) * 4};
        const int64_t ne[4] = {n_out, n_tok, 1, 1};
        ez_cuda_matrix *a;
        CK(ez_cuda_matrix_new(0, rows.data(), cols.data(), (int64_t)rows.size(), n_in, n_out, 1, &a));
        CK(ez_cuda_matrix_set_values(a, vals.data()));
        legacy_matrix lm = legacy_new(rows, cols, vals);
        float *dx = to_device(x), *dy = to_device(y);
        CK(ez_cuda_mul_mat(a, 0, dx, xnb, dy, ynb, ne));
        CK(ez_cuda_sync(0));
        legacy_launch(lm, (int32_t)n_in, dx, dy, n_out, n_tok, 0);
        CK(cudaDeviceSynchronize());
        cudaFree(dx), cudaFree(dy);
        legacy_free(lm);
        ez_cuda_matrix_free(a);
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "profile") == 0) {
        profile_shapes();
        return 0;
    }
    int smem = 0;
    CK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    printf("device 0: %d bytes of shared memory per block\n", smem);
    check_mul_mat(576, 576, 64, 16, 331, 576);          /* SmolLM2 q: tile 8 in shared memory */
    check_mul_mat(64, 48, 3, 1, 1, 64);                 /* one entry, three tokens */
    check_mul_mat(4096, 4096, 37, 2, 16777, 4100);      /* strided rows, 74 tokens */
    check_mul_mat(11008, 4096, 13, 1, 45000, 11008);    /* tile 4 */
    check_mul_mat(30000, 256, 5, 3, 7000, 30000);       /* tile 1 */
    check_mul_mat(70000, 64, 9, 1, 4000, 70000);        /* no tile fits: global gathers */
    check_mul_mat(128, 100000, 1, 1, 20000, 128);       /* one token, many rows */
    check_mul_mat(64, 48, 5, 1, 2000, 64);              /* about 42 entries a row: more steps than lanes */
    check_mul_mat(4096, 4096, 1024, 1, 16777, 4096);    /* a whole 16 x 64 batch in one graph */
    check_mul_mat_id(256, 128, 8, 2, 1, 33, 5000);      /* ne11 = 1: input shared by the used experts */
    check_mul_mat_id(256, 128, 8, 4, 4, 20, 5000);
    check_mul_mat_id(256, 100, 5, 2, 2, 17, 3000);      /* slices end at each expert's last row */
    check_mul_mat_id(256, 128, 1, 1, 1, 9, 2000);       /* one expert */
    check_get_rows(576, 49152, 300, 28000);
    check_get_rows(64, 10, 50, 400);                    /* dense rows, many repeats */
    check_values_update();
    for (int64_t n_tok : {1024, 512, 64}) {
        time_mul_mat("smollm2 attn_q/output", 576, 576, n_tok);
        time_mul_mat("smollm2 ffn_gate/up", 576, 1536, n_tok);
        time_mul_mat("smollm2 ffn_down", 1536, 576, n_tok);
        time_mul_mat("7b attn_q/k/v/output", 4096, 4096, n_tok);
        time_mul_mat("7b ffn_gate/up", 4096, 11008, n_tok);
        time_mul_mat("7b ffn_down", 11008, 4096, n_tok);
    }
    printf(failures ? "%d FAILED\n" : "all kernel checks passed\n", failures);
    return failures != 0;
}
