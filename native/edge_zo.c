/* edge-zo native core. See edge_zo.h for the contract.
 *
 * The sparse deltas S are applied through llama.cpp's scheduler eval callback:
 * we answer "yes" for every MUL_MAT / MUL_MAT_ID / GET_ROWS node whose weight
 * (src[0]) has sparse entries; the scheduler then computes the graph up to that
 * node and hands it back to us, and we add S.x into its output before any later
 * node reads it. The weight itself is never written (it may be mmapped or
 * repacked); the values live in memory the Python side owns.
 *
 * Where the node's output lives decides the path (see apply): host memory ->
 * the kernels below; a CUDA buffer -> the kernels of edge_zo_cuda.cu on the
 * device pointers (builds with EDGE_ZO_CUDA); any other device buffer (Metal,
 * Vulkan, ...) -> copies to the host and back, correct everywhere but slow
 * over PCIe. With --gpu-layers N each node takes the path of its own buffer. */
#include "edge_zo.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef EDGE_ZO_CUDA
#include "edge_zo_cuda.h"
#endif

/* Below this many multiply-adds a kernel runs on one thread: waking a team
 * costs more than it saves. */
#define EZ_PARALLEL_MIN_WORK 65536

typedef struct ez_slot {
    int64_t id;
    char name[GGML_MAX_NAME];
    int64_t n_in, n_out, n_expert;
    int64_t n;
    int32_t *rows;           /* e*n_out + row, non-decreasing */
    int32_t *cols;
    int64_t *expert_start;   /* n_expert+1 offsets into rows/cols */
    const float *values;     /* borrowed from the caller */
    int64_t group_off;       /* while groups are set: values - groups base, or -1 (not grouped) */
#ifdef EDGE_ZO_CUDA
    /* Per CUDA device, made when the slot first meets a tensor there. The
     * values are copied once per llama_decode (the caller may change them
     * between decodes, never during one): cuda_epoch[d] == model epoch. */
    ez_cuda_matrix *cuda[EZ_CUDA_MAX_DEVICES];
    int64_t cuda_epoch[EZ_CUDA_MAX_DEVICES];
#endif
    struct ez_slot *next;
} ez_slot;

struct ez_model {
    struct llama_model *model;
    struct llama_context *ctx;
    const struct llama_vocab *vocab;
    struct llama_batch batch;
    struct llama_sampler *sampler;
    int32_t n_threads;
    int32_t n_batch;
    ez_slot *slots;
    int64_t next_slot_id;
    int64_t fallback_count;  /* tensors copied from a device buffer to the host */
    int64_t host_count;      /* nodes patched by the host kernels */
    int64_t cuda_count;      /* nodes patched by the CUDA kernels */
    int64_t epoch;           /* llama_decode calls so far */
    int kv_unified;          /* llama.cpp splits a decode into micro-batches by split_simple if so, */
    int32_t n_ubatch;        /* else by split_equal (see plan_ubatches) */
    int can_group;           /* 0 for recurrent and hybrid models, whose splits differ */
    /* Perturbation groups (ez_groups_set): the value sets, borrowed. */
    const float *const *group_sets;
    int32_t n_groups;
    /* The micro-batches of the decode being run, when its sequences carry groups: for micro-batch
     * u, plan_tok[u*n_groups + g] columns of group g (they come in group order), plan_out[...] the
     * same among the columns that produce logits (what the last layer keeps). plan_cur: the
     * micro-batch being computed, advanced at each graph's token-embedding lookup. */
    int32_t plan_n, plan_cap, plan_cur;
    int32_t plan_width;      /* the n_groups the plan arrays were sized for */
    int32_t *plan_tok, *plan_out, *plan_ntok, *plan_nout;
#ifdef EDGE_ZO_CUDA
    int64_t cuda_epoch[EZ_CUDA_MAX_DEVICES]; /* the epoch whose values each device holds */
#endif
    /* An error raised inside the eval callback, reported after llama_decode. */
    int cb_failed;
    char cb_error[256];
    /* Set only during ez_activation_sumsq: the weights whose inputs it gathers. */
    struct ez_stats *stats;
    /* Generation state. */
    int gen_active;
    int32_t gen_pos;
};

/* ---- errors and logging ------------------------------------------------- */

static _Thread_local char ez_error[1024];
static char ez_log_last[512]; /* last warning or error llama.cpp logged */
static int ez_log_verbose;

const char *ez_last_error(void) { return ez_error; }

static int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ez_error, sizeof ez_error, fmt, ap);
    va_end(ap);
    return code;
}

static void ez_log(enum ggml_log_level level, const char *text, void *user_data) {
    (void)user_data;
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        snprintf(ez_log_last, sizeof ez_log_last, "%s", text);
        size_t n = strlen(ez_log_last);
        while (n > 0 && (ez_log_last[n - 1] == '\n' || ez_log_last[n - 1] == '\r')) ez_log_last[--n] = 0;
    }
    if (ez_log_verbose || level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static void callback_fail(ez_model *m, const char *fmt, ...) {
    if (m->cb_failed) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->cb_error, sizeof m->cb_error, fmt, ap);
    va_end(ap);
    m->cb_failed = 1;
}

/* ---- tensor access ------------------------------------------------------ */

/* Weights copied to another backend are named "CUDA0#blk.0.attn_q.weight#0". */
static void weight_name(const char *name, char *out) {
    const char *a = strchr(name, '#');
    if (!a) {
        snprintf(out, GGML_MAX_NAME, "%s", name);
        return;
    }
    a++;
    const char *b = strchr(a, '#');
    size_t n = b ? (size_t)(b - a) : strlen(a);
    if (n >= GGML_MAX_NAME) n = GGML_MAX_NAME - 1;
    memcpy(out, a, n);
    out[n] = 0;
}

static bool on_host(const struct ggml_tensor *t) {
    return t->buffer == NULL || ggml_backend_buffer_is_host(t->buffer);
}

/* A host pointer to t's bytes: the tensor itself, or a copy (set *owned). */
static void *host_bytes(ez_model *m, const struct ggml_tensor *t, void **owned) {
    *owned = NULL;
    if (on_host(t)) return t->data;
    size_t n = ggml_nbytes(t);
    void *p = malloc(n);
    if (!p) return NULL;
    ggml_backend_tensor_get(t, p, 0, n);
    m->fallback_count++;
    *owned = p;
    return p;
}

/* The CUDA device index of t's buffer ("CUDA0", "CUDA1", ...), or -1 for any
 * other buffer (host, Metal, Vulkan, CUDA's split buffers). */
static int cuda_device(const struct ggml_tensor *t) {
    if (!t->buffer || ggml_backend_buffer_is_host(t->buffer)) return -1;
    const char *name = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
    if (strncmp(name, "CUDA", 4) != 0 || name[4] < '0' || name[4] > '9') return -1;
    const int d = atoi(name + 4);
    return d < 16 ? d : -1; /* GGML_CUDA_MAX_DEVICES */
}

/* Once per process: say that a device buffer goes through host copies. */
static void note_fallback(const struct ggml_tensor *t, bool is_cuda) {
    static int noted;
    if (noted) return;
    noted = 1;
    const char *buft = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
    if (is_cuda)
        fprintf(stderr, "edge-zo: this build has no CUDA kernels: sparse deltas on %s tensors go through host "
                "copies (correct, slow). Rebuild with EDGE_ZO_CUDA=1 (docs/gpu.md).\n", buft);
    else
        fprintf(stderr, "edge-zo: sparse deltas on %s tensors go through host copies (the generic fallback for "
                "non-CUDA device buffers).\n", buft);
}

/* ---- kernels ------------------------------------------------------------ */

/* y[:, t] += S x[:, t] for every column t (token) of a 2-D-weight MUL_MAT. */
static void kernel_mul_mat(const ez_slot *s, const float *v, const char *x, const size_t *xnb, char *y,
                           const size_t *ynb, const int64_t *ne, int n_threads) {
    const int64_t n_tok = ne[1] * ne[2] * ne[3];
    const int64_t n = s->n;
    const int32_t *rows = s->rows, *cols = s->cols;
    (void)n_threads;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_tok * n >= EZ_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < n_tok; t++) {
        const int64_t i1 = t % ne[1], i2 = (t / ne[1]) % ne[2], i3 = t / (ne[1] * ne[2]);
        const float *xr = (const float *)(x + i1 * xnb[1] + i2 * xnb[2] + i3 * xnb[3]);
        float *yr = (float *)(y + i1 * ynb[1] + i2 * ynb[2] + i3 * ynb[3]);
        for (int64_t k = 0; k < n; k++) yr[rows[k]] += v[k] * xr[cols[k]];
    }
}

/* MUL_MAT_ID: y[:, k, t] += S_e x[:, k % ne11, t] with e = ids[k, t]. */
static void kernel_mul_mat_id(const ez_slot *s, const char *x, const size_t *xnb, int64_t ne11,
                              const char *ids, const size_t *inb, char *y, const size_t *ynb,
                              int64_t n_used, int64_t n_tok, int n_threads) {
    const float *v = s->values;
    (void)n_threads;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_tok * s->n >= EZ_PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < n_tok; t++) {
        for (int64_t k = 0; k < n_used; k++) {
            const int32_t e = *(const int32_t *)(ids + k * inb[0] + t * inb[1]);
            if (e < 0 || e >= s->n_expert) continue;
            const float *xr = (const float *)(x + (k % ne11) * xnb[1] + t * xnb[2]);
            float *yr = (float *)(y + k * ynb[1] + t * ynb[2]);
            const int32_t base = (int32_t)(e * s->n_out);
            for (int64_t j = s->expert_start[e]; j < s->expert_start[e + 1]; j++)
                yr[s->rows[j] - base] += v[j] * xr[s->cols[j]];
        }
    }
}

/* First entry whose row is >= row (rows are sorted). */
static int64_t lower_bound(const int32_t *rows, int64_t n, int32_t row) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (rows[mid] < row) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* GET_ROWS: out[:, i] = W[ids[i], :], so add the entries of row ids[i]. */
static void kernel_get_rows(const ez_slot *s, const float *v, const char *ids, const size_t *inb,
                            const int64_t *ine, char *y, const size_t *ynb) {
    for (int64_t i2 = 0; i2 < ine[2]; i2++)
        for (int64_t i1 = 0; i1 < ine[1]; i1++)
            for (int64_t i0 = 0; i0 < ine[0]; i0++) {
                const int32_t r = *(const int32_t *)(ids + i0 * inb[0] + i1 * inb[1] + i2 * inb[2]);
                float *yr = (float *)(y + i0 * ynb[1] + i1 * ynb[2] + i2 * ynb[3]);
                for (int64_t j = lower_bound(s->rows, s->n, r); j < s->n && s->rows[j] == r; j++)
                    yr[s->cols[j]] += v[j];
            }
}

/* ---- eval callback -------------------------------------------------------- */

static bool is_observed_op(const struct ggml_tensor *t) {
    return (t->op == GGML_OP_MUL_MAT || t->op == GGML_OP_MUL_MAT_ID || t->op == GGML_OP_GET_ROWS) &&
           t->src[0] != NULL;
}

static ez_slot *first_slot(ez_model *m, const char *name) {
    for (ez_slot *s = m->slots; s; s = s->next)
        if (strcmp(s->name, name) == 0) return s;
    return NULL;
}

static bool shape_matches(ez_model *m, const ez_slot *s, const struct ggml_tensor *w) {
    if (w->ne[0] == s->n_in && w->ne[1] == s->n_out && w->ne[2] == s->n_expert) return true;
    callback_fail(m, "weight %s has shape [%lld, %lld, %lld] but its sparse deltas were made for "
                  "[%lld, %lld, %lld]", s->name, (long long)w->ne[0], (long long)w->ne[1],
                  (long long)w->ne[2], (long long)s->n_in, (long long)s->n_out, (long long)s->n_expert);
    return false;
}

/* ---- perturbation groups (ez_groups_set) ------------------------------------- */

static bool grouped(const ez_model *m, const ez_slot *s) { return m->plan_n > 0 && s->group_off >= 0; }

/* The values the tokens of group g read in slot s. */
static const float *slot_values(const ez_model *m, const ez_slot *s, int32_t g) {
    return grouped(m, s) ? m->group_sets[g] + s->group_off : s->values;
}

/* Each graph of a decode starts by looking up its micro-batch's tokens: the next planned
 * micro-batch begins, and its size must be the one planned. */
static void plan_next(ez_model *m, const struct ggml_tensor *t) {
    m->plan_cur++;
    if (m->plan_cur >= m->plan_n || t->src[1]->ne[0] != m->plan_ntok[m->plan_cur])
        callback_fail(m, "grouped decode: llama.cpp split the batch otherwise than planned (micro-batch %d of %d "
                      "has %lld tokens)", m->plan_cur + 1, m->plan_n, (long long)t->src[1]->ne[0]);
}

/* Columns per group of a node with n_col token columns in the current micro-batch: all of its
 * tokens, or only those that produce logits (llama.cpp's last layer drops the others). */
static const int32_t *plan_columns(ez_model *m, const char *name, int64_t n_col) {
    const int32_t u = m->plan_cur;
    if (u < 0 || u >= m->plan_n) {
        callback_fail(m, "grouped decode: %s computed outside the planned micro-batches", name);
        return NULL;
    }
    if (n_col == m->plan_ntok[u]) return m->plan_tok + (size_t)u * m->n_groups;
    if (n_col == m->plan_nout[u]) return m->plan_out + (size_t)u * m->n_groups;
    callback_fail(m, "grouped decode: %s has %lld token columns where micro-batch %d has %d tokens and %d outputs",
                  name, (long long)n_col, u + 1, m->plan_ntok[u], m->plan_nout[u]);
    return NULL;
}

/* Token columns of an observed node: y's second dimension (GET_ROWS: its ids'). */
static int64_t column_count(const struct ggml_tensor *t) {
    return t->op == GGML_OP_GET_ROWS ? t->src[1]->ne[0] : t->ne[1];
}

/* The node's columns per group, or NULL (with callback_fail) where groups cannot apply. */
static const int32_t *group_columns(ez_model *m, const struct ggml_tensor *t, const char *name) {
    if (t->op == GGML_OP_MUL_MAT_ID) {
        callback_fail(m, "%s: perturbation groups do not support expert weights (MUL_MAT_ID)", name);
        return NULL;
    }
    if (t->ne[2] * t->ne[3] != 1 || (t->op == GGML_OP_GET_ROWS && t->src[1]->ne[1] * t->src[1]->ne[2] != 1)) {
        callback_fail(m, "grouped decode: %s has batched token dimensions", name);
        return NULL;
    }
    return plan_columns(m, name, column_count(t));
}

#ifdef EDGE_ZO_CUDA
/* Value sets a slot needs on a device during this decode. */
static int32_t slot_sets(const ez_model *m, const ez_slot *s) { return grouped(m, s) ? m->n_groups : 1; }

/* Copy the values of every slot that lives on CUDA device dev, once per decode:
 * host copies into pinned buffers on all threads, then the uploads, queued on
 * the device's stream ahead of the first kernel. (One slot at a time, the
 * copies of a 7B-shaped 0.1% adapter, 26 MB, cost about 5 ms per decode.) */
static int refresh_values(ez_model *m, int dev) {
    int64_t n = 0, work = 0;
    for (ez_slot *s = m->slots; s; s = s->next) n += s->cuda[dev] != NULL;
    ez_slot **list = malloc((size_t)(n > 0 ? n : 1) * sizeof *list);
    if (!list) return 2; /* cudaErrorMemoryAllocation */
    n = 0;
    int rc = 0;
    for (ez_slot *s = m->slots; s && !rc; s = s->next)
        if (s->cuda[dev]) {
            list[n++] = s;
            work += s->n * slot_sets(m, s);
            rc = ez_cuda_matrix_reserve(s->cuda[dev], slot_sets(m, s));
        }
    (void)work;
#pragma omp parallel for num_threads(m->n_threads) schedule(dynamic, 4) if (!rc && work >= 1 << 20)
    for (int64_t i = 0; i < n; i++)
        for (int32_t g = 0; g < slot_sets(m, list[i]); g++)
            ez_cuda_matrix_stage(list[i]->cuda[dev], g, slot_values(m, list[i], g));
    for (int64_t i = 0; i < n && !rc; i++) {
        rc = ez_cuda_matrix_upload(list[i]->cuda[dev], slot_sets(m, list[i]));
        list[i]->cuda_epoch[dev] = m->epoch;
    }
    free(list);
    if (!rc) m->cuda_epoch[dev] = m->epoch;
    return rc;
}

/* The same three kernels on CUDA device pointers, on the device's own stream,
 * which is synchronized before returning (edge_zo_cuda.cu says why). */
static void apply_cuda(ez_model *m, struct ggml_tensor *t, const char *name, int dev) {
    const struct ggml_tensor *w = t->src[0], *x = t->src[1], *ids = t->src[2];
    if (cuda_device(x) != dev || (t->op == GGML_OP_MUL_MAT_ID && cuda_device(ids) != dev)) {
        callback_fail(m, "%s: output on CUDA%d but its inputs are elsewhere", name, dev);
        return;
    }
    const int32_t *cols = NULL;
    if (m->plan_n > 0 && !(cols = group_columns(m, t, name))) return;
    int rc = 0, launched = 0;
    for (ez_slot *s = m->slots; s && !rc; s = s->next) {
        if (strcmp(s->name, name) != 0 || s->n == 0) continue;
        if (!shape_matches(m, s, w)) break;
        if (t->op == GGML_OP_MUL_MAT && s->n_expert != 1) {
            callback_fail(m, "%s: 3-D weights in MUL_MAT are not supported", name);
            break;
        }
        if (t->op == GGML_OP_GET_ROWS && x->type != GGML_TYPE_I32) {
            callback_fail(m, "%s: GET_ROWS with non-I32 ids", name);
            break;
        }
        if (!s->cuda[dev]) {
            rc = ez_cuda_matrix_new(dev, s->rows, s->cols, s->n, s->n_in, s->n_out, s->n_expert, &s->cuda[dev]);
            if (rc) break;
            s->cuda_epoch[dev] = 0;
        }
        if (m->cuda_epoch[dev] != m->epoch) { /* first CUDA node of this decode on dev */
            rc = refresh_values(m, dev);
            if (rc) break;
        }
        if (s->cuda_epoch[dev] != m->epoch) { /* made during this decode */
            rc = ez_cuda_matrix_reserve(s->cuda[dev], slot_sets(m, s));
            for (int32_t g = 0; g < slot_sets(m, s) && !rc; g++)
                ez_cuda_matrix_stage(s->cuda[dev], g, slot_values(m, s, g));
            if (!rc) rc = ez_cuda_matrix_upload(s->cuda[dev], slot_sets(m, s));
            if (rc) break;
            s->cuda_epoch[dev] = m->epoch;
        }
        if (t->op == GGML_OP_MUL_MAT_ID) {
            rc = ez_cuda_mul_mat_id(s->cuda[dev], 0, x->data, x->nb, x->ne[1], ids->data, ids->nb, t->data, t->nb,
                                    t->ne[1], t->ne[2]);
        } else { /* one run of columns per group; without groups, all columns with set 0 */
            const int32_t n_runs = grouped(m, s) ? m->n_groups : 1;
            int64_t c0 = 0;
            for (int32_t g = 0; g < n_runs && !rc; g++) {
                const int64_t nc = grouped(m, s) ? cols[g] : column_count(t);
                if (t->op == GGML_OP_MUL_MAT) {
                    const int64_t ne[4] = {t->ne[0], grouped(m, s) ? nc : t->ne[1], t->ne[2], t->ne[3]};
                    rc = ez_cuda_mul_mat(s->cuda[dev], g, (const char *)x->data + c0 * x->nb[1], x->nb,
                                         (char *)t->data + c0 * t->nb[1], t->nb, ne);
                } else {
                    const int64_t ine[4] = {grouped(m, s) ? nc : x->ne[0], x->ne[1], x->ne[2], x->ne[3]};
                    rc = ez_cuda_get_rows(s->cuda[dev], g, (const char *)x->data + c0 * x->nb[0], x->nb, ine,
                                          (char *)t->data + c0 * t->nb[1], t->nb);
                }
                c0 += nc;
            }
        }
        launched = 1;
    }
    if (launched) { /* also after a failure: nothing of ours may still run when we return */
        const int rs = ez_cuda_sync(dev);
        rc = rc ? rc : rs;
    }
    if (rc) {
        callback_fail(m, "%s: CUDA error on CUDA%d: %s", name, dev, ez_cuda_error_string(rc));
        return;
    }
    m->cuda_count += launched;
}
#endif

static void apply(ez_model *m, struct ggml_tensor *t, const char *name) {
    const struct ggml_tensor *w = t->src[0], *x = t->src[1], *ids = t->src[2];
    if (t->type != GGML_TYPE_F32 || (t->op != GGML_OP_GET_ROWS && x->type != GGML_TYPE_F32)) {
        callback_fail(m, "%s: sparse deltas need F32 activations (got %s)", name, ggml_type_name(t->type));
        return;
    }
    if (t->nb[0] != sizeof(float) || (t->op != GGML_OP_GET_ROWS && x->nb[0] != sizeof(float))) {
        callback_fail(m, "%s: activations with a strided first dimension are not supported", name);
        return;
    }
    if (!on_host(t)) {
        const int dev = cuda_device(t);
#ifdef EDGE_ZO_CUDA
        if (dev >= 0) {
            apply_cuda(m, t, name, dev);
            return;
        }
#endif
        note_fallback(t, dev >= 0);
    } else {
        m->host_count++;
    }
    void *own_x = NULL, *own_y = NULL, *own_i = NULL;
    char *y = host_bytes(m, t, &own_y);
    const char *xb = NULL, *ib = NULL;
    if (t->op == GGML_OP_GET_ROWS) ib = host_bytes(m, x, &own_i);
    else xb = host_bytes(m, x, &own_x);
    if (t->op == GGML_OP_MUL_MAT_ID) ib = host_bytes(m, ids, &own_i);
    if (!y || (t->op == GGML_OP_GET_ROWS ? !ib : !xb) || (t->op == GGML_OP_MUL_MAT_ID && !ib)) {
        callback_fail(m, "%s: out of memory copying activations to the host", name);
        goto done;
    }
    const int32_t *cols = NULL;
    if (m->plan_n > 0 && !(cols = group_columns(m, t, name))) goto done;
    for (ez_slot *s = m->slots; s; s = s->next) {
        if (strcmp(s->name, name) != 0 || s->n == 0) continue;
        if (!shape_matches(m, s, w)) goto done;
        if (t->op == GGML_OP_MUL_MAT_ID) {
            kernel_mul_mat_id(s, xb, x->nb, x->ne[1], ib, ids->nb, y, t->nb, t->ne[1], t->ne[2], m->n_threads);
            continue;
        }
        if (t->op == GGML_OP_MUL_MAT && s->n_expert != 1) {
            callback_fail(m, "%s: 3-D weights in MUL_MAT are not supported", name);
            goto done;
        }
        if (t->op == GGML_OP_GET_ROWS && x->type != GGML_TYPE_I32) {
            callback_fail(m, "%s: GET_ROWS with non-I32 ids", name);
            goto done;
        }
        /* One run of columns per group; without groups, all columns with the slot's values. */
        const int32_t n_runs = grouped(m, s) ? m->n_groups : 1;
        int64_t c0 = 0;
        for (int32_t g = 0; g < n_runs; g++) {
            const int64_t nc = grouped(m, s) ? cols[g] : column_count(t);
            if (t->op == GGML_OP_MUL_MAT) {
                const int64_t ne[4] = {t->ne[0], grouped(m, s) ? nc : t->ne[1], t->ne[2], t->ne[3]};
                kernel_mul_mat(s, slot_values(m, s, g), xb + c0 * x->nb[1], x->nb, y + c0 * t->nb[1], t->nb, ne,
                               m->n_threads);
            } else {
                const int64_t ine[4] = {grouped(m, s) ? nc : x->ne[0], x->ne[1], x->ne[2], x->ne[3]};
                kernel_get_rows(s, slot_values(m, s, g), ib + c0 * x->nb[0], x->nb, ine, y + c0 * t->nb[1], t->nb);
            }
            c0 += nc;
        }
    }
    if (own_y) ggml_backend_tensor_set(t, y, 0, ggml_nbytes(t));
done:
    free(own_x);
    free(own_y);
    free(own_i);
}

/* ---- activation statistics (ez_activation_sumsq) ---------------------------- */

typedef struct ez_stats {
    int32_t n_w;
    const char *const *names; /* borrowed from the caller for the duration of the call */
    const int64_t *n_in;
    int64_t *offset;          /* n_w + 1 offsets into sumsq */
    double *sumsq;
    int64_t *count;
} ez_stats;

static int32_t stats_find(const ez_stats *st, const char *name) {
    for (int32_t w = 0; w < st->n_w; w++)
        if (strcmp(st->names[w], name) == 0) return w;
    return -1;
}

/* Columns per block of the sums below: each thread owns whole blocks, and every column is
 * summed in token order, so the result does not depend on the thread count. */
#define EZ_STATS_BLOCK 64

/* sumsq[j] += sum over tokens of x[j]^2, x = t->src[1] (the matmul's input), in double. */
static void stats_add(ez_model *m, const struct ggml_tensor *t, int32_t w) {
    ez_stats *st = m->stats;
    const struct ggml_tensor *x = t->src[1];
    if (t->op != GGML_OP_MUL_MAT) {
        callback_fail(m, "%s: activation statistics of expert weights (%s) are not supported", st->names[w],
                      ggml_op_name(t->op));
        return;
    }
    if (x->type != GGML_TYPE_F32 || x->nb[0] != sizeof(float)) {
        callback_fail(m, "%s: activation statistics need F32 inputs with a unit stride (got %s)", st->names[w],
                      ggml_type_name(x->type));
        return;
    }
    if (x->ne[0] != st->n_in[w]) {
        callback_fail(m, "%s: its input has %lld columns but %lld were given", st->names[w], (long long)x->ne[0],
                      (long long)st->n_in[w]);
        return;
    }
    void *own = NULL;
    const char *xb = x->data;
    if (!on_host(x)) { /* a device buffer: copy it to the host (correct everywhere, not fast) */
        own = malloc(ggml_nbytes(x));
        if (!own) {
            callback_fail(m, "%s: out of memory copying activations to the host", st->names[w]);
            return;
        }
        ggml_backend_tensor_get(x, own, 0, ggml_nbytes(x));
        xb = own;
    }
    const int64_t n_in = x->ne[0], n_tok = x->ne[1] * x->ne[2] * x->ne[3];
    const int64_t n_blocks = (n_in + EZ_STATS_BLOCK - 1) / EZ_STATS_BLOCK;
    double *acc = st->sumsq + st->offset[w];
#pragma omp parallel for num_threads(m->n_threads) schedule(static) if (n_tok * n_in >= EZ_PARALLEL_MIN_WORK)
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t j0 = b * EZ_STATS_BLOCK, j1 = j0 + EZ_STATS_BLOCK < n_in ? j0 + EZ_STATS_BLOCK : n_in;
        double sum[EZ_STATS_BLOCK] = {0};
        for (int64_t k = 0; k < n_tok; k++) {
            const int64_t i1 = k % x->ne[1], i2 = (k / x->ne[1]) % x->ne[2], i3 = k / (x->ne[1] * x->ne[2]);
            const float *row = (const float *)(xb + i1 * x->nb[1] + i2 * x->nb[2] + i3 * x->nb[3]);
            for (int64_t j = j0; j < j1; j++) sum[j - j0] += (double)row[j] * (double)row[j];
        }
        for (int64_t j = j0; j < j1; j++) acc[j] += sum[j - j0];
    }
    st->count[w] += n_tok;
    free(own);
}

static bool eval_callback(struct ggml_tensor *t, bool ask, void *user_data) {
    ez_model *m = user_data;
    if (ask && m->plan_n > 0 && t->op == GGML_OP_GET_ROWS && t->src[0] && t->src[1]) {
        char w[GGML_MAX_NAME];
        weight_name(t->src[0]->name, w);
        if (strcmp(w, "token_embd.weight") == 0) plan_next(m, t);
    }
    if ((!m->slots && !m->stats) || !is_observed_op(t)) return !ask; /* not ours: keep computing */
    char name[GGML_MAX_NAME];
    weight_name(t->src[0]->name, name);
    const bool patch = first_slot(m, name) != NULL;
    /* GET_ROWS reads token ids, not activations: no statistics there. */
    const int32_t stat = m->stats && t->op != GGML_OP_GET_ROWS ? stats_find(m->stats, name) : -1;
    if (!patch && stat < 0) return !ask;
    if (ask) return true;
    if (stat >= 0) stats_add(m, t, stat); /* reads the input, which apply leaves alone */
    if (patch) apply(m, t, name);
    return true;
}

/* ---- model lifecycle ------------------------------------------------------ */

void ez_default_params(ez_model_params *p) {
    p->n_ctx_seq = 512;
    p->n_seq_max = 16;
    p->n_batch = 2048;
    p->n_ubatch = 512;
    p->n_threads = 0;
    p->n_gpu_layers = 0;
    p->kv_f32 = 0;
    p->flash_attn = -1;
    p->verbose = 0;
    p->extra_bufts = 0;
    p->kv_unified = 0;
}

/* llama.cpp's backend and our log hook, once per process. */
static void backend_init(void) {
    static int backend_ready = 0;
    llama_log_set(ez_log, NULL);
    if (!backend_ready) {
        llama_backend_init();
        backend_ready = 1;
    }
}

/* EZ_OK when `path` opens for reading, else EZ_ERR_IO saying why. */
static int check_readable(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail(EZ_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    fclose(f);
    return EZ_OK;
}

int ez_quantize(const char *src, const char *dst, int32_t ftype, int32_t n_threads) {
    int rc = check_readable(src);
    if (rc != EZ_OK) return rc;
    backend_init();
    struct llama_model_quantize_params qp = llama_model_quantize_default_params();
    qp.ftype = (enum llama_ftype)ftype;
    qp.nthread = n_threads;
    qp.allow_requantize = true; /* a quantized source is dequantized first: lossy twice, but allowed */
    ez_log_last[0] = 0;
    /* llama.cpp catches its own exceptions here and returns non-zero, logging why. */
    if (llama_model_quantize(src, dst, &qp) != 0)
        return fail(EZ_ERR_RUNTIME, "%s: llama.cpp could not quantize it to file type %d%s%s", src, (int)ftype,
                    ez_log_last[0] ? ": " : "", ez_log_last);
    return EZ_OK;
}

int ez_model_open(const char *path, const ez_model_params *p, ez_model **out) {
    *out = NULL;
    if (p->n_ctx_seq < 1 || p->n_seq_max < 1 || p->n_batch < 1 || p->n_ubatch < 1)
        return fail(EZ_ERR_INVALID, "context sizes must be positive");
    int rc = check_readable(path);
    if (rc != EZ_OK) return rc;
    ez_log_verbose = p->verbose;
    backend_init();

    ez_model *m = calloc(1, sizeof *m);
    if (!m) return fail(EZ_ERR_NOMEM, "out of memory");
    m->next_slot_id = 1;

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = p->n_gpu_layers;
    /* Extra CPU buffer types (AMX, repacked layouts) are opt-in: llama.cpp 0c1e570's
     * AMX kernels crash on some Sapphire Rapids VMs (seen on our CI machines). */
    mp.use_extra_bufts = p->extra_bufts != 0;
    ez_log_last[0] = 0;
    m->model = llama_model_load_from_file(path, mp);
    if (!m->model) {
        free(m);
        return fail(EZ_ERR_IO, "%s: llama.cpp could not load this GGUF%s%s", path,
                    ez_log_last[0] ? ": " : "", ez_log_last);
    }
    m->vocab = llama_model_get_vocab(m->model);

    struct llama_context_params cp = llama_context_default_params();
    cp.n_seq_max = (uint32_t)p->n_seq_max;
    cp.n_ctx = (uint32_t)p->n_ctx_seq * (uint32_t)p->n_seq_max;
    cp.n_batch = (uint32_t)p->n_batch;
    cp.n_ubatch = (uint32_t)(p->n_ubatch < p->n_batch ? p->n_ubatch : p->n_batch);
    /* 0: a cache per sequence, so a batched loss equals the one-by-one losses bit for bit on the
     * CPU; but llama.cpp pads each to 256 cells (16 x 64 tokens of a 7B model: 2 GiB of KV).
     * 1: one cache of n_ctx_seq * n_seq_max cells, padded once (0.5 GiB there); each sequence's
     * attention then also runs over the others' cells, masked out, which may change the last
     * bits (docs/gpu.md). llama_n_ctx_seq is then the whole cache. */
    cp.kv_unified = p->kv_unified != 0;
    cp.no_perf = true;
    cp.cb_eval = eval_callback;
    cp.cb_eval_user_data = m;
    cp.flash_attn_type = (enum llama_flash_attn_type)p->flash_attn;
    if (p->kv_f32) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
    }
    if (p->n_threads > 0) {
        cp.n_threads = p->n_threads;
        cp.n_threads_batch = p->n_threads;
    }
    m->ctx = llama_init_from_model(m->model, cp);
    if (!m->ctx) {
        llama_model_free(m->model);
        free(m);
        return fail(EZ_ERR_RUNTIME, "%s: llama.cpp could not create a context%s%s", path,
                    ez_log_last[0] ? ": " : "", ez_log_last);
    }
    m->n_threads = cp.n_threads_batch > 0 ? cp.n_threads_batch : 1;
    m->n_batch = (int32_t)llama_n_batch(m->ctx);
    m->n_ubatch = (int32_t)llama_n_ubatch(m->ctx);
    m->kv_unified = cp.kv_unified;
    m->can_group = !llama_model_is_recurrent(m->model) && !llama_model_is_hybrid(m->model);
    m->batch = llama_batch_init(m->n_batch, 0, 1);
    *out = m;
    return EZ_OK;
}

void ez_model_close(ez_model *m) {
    if (!m) return;
    ez_sparse_clear(m);
    if (m->sampler) llama_sampler_free(m->sampler);
    free(m->plan_tok);
    free(m->plan_out);
    free(m->plan_ntok);
    free(m->plan_nout);
    llama_batch_free(m->batch);
    llama_free(m->ctx);
    llama_model_free(m->model);
    free(m);
}

int32_t ez_n_vocab(const ez_model *m) { return llama_vocab_n_tokens(m->vocab); }
int32_t ez_n_ctx_seq(const ez_model *m) { return (int32_t)llama_n_ctx_seq(m->ctx); }
int32_t ez_n_seq_max(const ez_model *m) { return (int32_t)llama_n_seq_max(m->ctx); }
int32_t ez_n_batch(const ez_model *m) { return m->n_batch; }
int32_t ez_token_bos(const ez_model *m) { return llama_vocab_bos(m->vocab); }
int32_t ez_token_eos(const ez_model *m) { return llama_vocab_eos(m->vocab); }
int ez_token_is_eog(const ez_model *m, int32_t token) { return llama_vocab_is_eog(m->vocab, token); }
int ez_add_bos(const ez_model *m) { return llama_vocab_get_add_bos(m->vocab); }
int64_t ez_fallback_count(const ez_model *m) { return m->fallback_count; }
int64_t ez_host_count(const ez_model *m) { return m->host_count; }
int64_t ez_cuda_count(const ez_model *m) { return m->cuda_count; }
int64_t ez_decode_count(const ez_model *m) { return m->epoch; }
int ez_has_cuda(void) {
#ifdef EDGE_ZO_CUDA
    return 1;
#else
    return 0;
#endif
}

int ez_cpu_extra_bufts(char *buf, int32_t cap) {
    if (!buf || cap < 1) return fail(EZ_ERR_INVALID, "no room for the buffer type names");
    buf[0] = 0;
    backend_init();
    /* The same query llama.cpp's model loader makes when use_extra_bufts is set. */
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) return EZ_OK;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get =
        (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get) return EZ_OK;
    size_t used = 0;
    for (ggml_backend_buffer_type_t *b = get(dev); b && *b; b++) {
        const char *name = ggml_backend_buft_name(*b);
        size_t n = strlen(name) + (used ? 1 : 0);
        if (used + n + 1 > (size_t)cap) return fail(EZ_ERR_INVALID, "%d bytes cannot hold the buffer type names", cap);
        snprintf(buf + used, (size_t)cap - used, "%s%s", used ? "," : "", name);
        used += n;
    }
    return EZ_OK;
}

/* ---- text ----------------------------------------------------------------- */

int ez_tokenize(const ez_model *m, const char *text, int32_t len, int add_special, int parse_special,
                int32_t *out, int32_t cap, int32_t *n_out) {
    int32_t n = llama_tokenize(m->vocab, text, len, out, cap, add_special != 0, parse_special != 0);
    if (n == INT32_MIN) return fail(EZ_ERR_INVALID, "text too long to tokenize");
    if (n < 0) {
        *n_out = -n;
        return fail(EZ_ERR_NOMEM, "token buffer too small: need %d", -n);
    }
    *n_out = n;
    return EZ_OK;
}

int ez_token_piece(const ez_model *m, int32_t token, char *buf, int32_t cap, int32_t *n_out) {
    if (token < 0 || token >= ez_n_vocab(m)) return fail(EZ_ERR_INVALID, "token %d out of range", token);
    int32_t n = llama_token_to_piece(m->vocab, token, buf, cap, 0, false);
    if (n < 0) {
        *n_out = -n;
        return fail(EZ_ERR_NOMEM, "piece buffer too small: need %d", -n);
    }
    *n_out = n;
    return EZ_OK;
}

int ez_chat_template(const ez_model *m, const char **roles, const char **contents, int32_t n_msg,
                     int add_assistant, char *buf, int32_t cap, int32_t *n_out) {
    const char *tmpl = llama_model_chat_template(m->model, NULL);
    if (!tmpl) return fail(EZ_ERR_INVALID, "the model has no chat template (tokenizer.chat_template)");
    struct llama_chat_message *msgs = calloc((size_t)(n_msg > 0 ? n_msg : 1), sizeof *msgs);
    if (!msgs) return fail(EZ_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < n_msg; i++) {
        msgs[i].role = roles[i];
        msgs[i].content = contents[i];
    }
    int32_t n = llama_chat_apply_template(tmpl, msgs, (size_t)n_msg, add_assistant != 0, buf, cap);
    free(msgs);
    if (n < 0)
        return fail(EZ_ERR_INVALID, "llama.cpp does not support this model's chat template "
                    "(only its built-in templates are understood)");
    *n_out = n;
    if (n > cap) return fail(EZ_ERR_NOMEM, "chat buffer too small: need %d", n);
    return EZ_OK;
}

/* ---- sparse slots ------------------------------------------------------- */

static void slot_free(ez_slot *s) {
#ifdef EDGE_ZO_CUDA
    for (int d = 0; d < EZ_CUDA_MAX_DEVICES; d++) ez_cuda_matrix_free(s->cuda[d]);
#endif
    free(s->rows);
    free(s->cols);
    free(s->expert_start);
    free(s);
}

int ez_sparse_add(ez_model *m, const char *name, int64_t n_in, int64_t n_out, int64_t n_expert,
                  const int64_t *idx, const float *values, int64_t n, int64_t *slot) {
    if (!name || strlen(name) >= GGML_MAX_NAME) return fail(EZ_ERR_INVALID, "bad weight name");
    if (n_in < 1 || n_out < 1 || n_expert < 1) return fail(EZ_ERR_INVALID, "%s: bad shape", name);
    if (n_out * n_expert > INT32_MAX || n_in > INT32_MAX)
        return fail(EZ_ERR_INVALID, "%s: too many rows for 32-bit row indices", name);
    if (n < 0 || (n > 0 && (!idx || !values))) return fail(EZ_ERR_INVALID, "%s: no entries given", name);
    const int64_t total = n_in * n_out * n_expert;
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= total)
            return fail(EZ_ERR_INVALID, "%s: index %lld (entry %lld) is outside the weight's %lld elements",
                        name, (long long)idx[i], (long long)i, (long long)total);
        if (i > 0 && idx[i] <= idx[i - 1])
            return fail(EZ_ERR_INVALID, "%s: indices must be strictly increasing (entry %lld)", name, (long long)i);
    }
    ez_slot *s = calloc(1, sizeof *s);
    if (!s) return fail(EZ_ERR_NOMEM, "out of memory");
    s->rows = malloc((size_t)(n > 0 ? n : 1) * sizeof *s->rows);
    s->cols = malloc((size_t)(n > 0 ? n : 1) * sizeof *s->cols);
    s->expert_start = calloc((size_t)n_expert + 1, sizeof *s->expert_start);
    if (!s->rows || !s->cols || !s->expert_start) {
        slot_free(s);
        return fail(EZ_ERR_NOMEM, "out of memory");
    }
    snprintf(s->name, sizeof s->name, "%s", name);
    s->n_in = n_in;
    s->n_out = n_out;
    s->n_expert = n_expert;
    s->n = n;
    s->values = values;
    s->group_off = -1;
    for (int64_t i = 0; i < n; i++) {
        s->rows[i] = (int32_t)(idx[i] / n_in);
        s->cols[i] = (int32_t)(idx[i] % n_in);
        s->expert_start[s->rows[i] / n_out + 1]++;
    }
    for (int64_t e = 0; e < n_expert; e++) s->expert_start[e + 1] += s->expert_start[e];
    s->id = m->next_slot_id++;
    s->next = m->slots;
    m->slots = s;
    *slot = s->id;
    return EZ_OK;
}

int ez_sparse_remove(ez_model *m, int64_t slot) {
    for (ez_slot **p = &m->slots; *p; p = &(*p)->next) {
        if ((*p)->id == slot) {
            ez_slot *s = *p;
            *p = s->next;
            slot_free(s);
            return EZ_OK;
        }
    }
    return fail(EZ_ERR_INVALID, "no sparse slot %lld", (long long)slot);
}

void ez_sparse_clear(ez_model *m) {
    while (m->slots) {
        ez_slot *s = m->slots;
        m->slots = s->next;
        slot_free(s);
    }
}

/* ---- perturbation groups ---------------------------------------------------- */

int ez_groups_set(ez_model *m, const float *base, int64_t n, const float *const *sets, int32_t n_sets) {
    if (!m->can_group) return fail(EZ_ERR_RUNTIME, "perturbation groups need a model with a plain KV cache "
                                   "(this one is recurrent or hybrid): evaluate the value sets one by one");
    if (!base || n < 0 || !sets || n_sets < 1) return fail(EZ_ERR_INVALID, "no value sets given");
    for (int32_t g = 0; g < n_sets; g++)
        if (!sets[g]) return fail(EZ_ERR_INVALID, "value set %d is missing", g);
    const uintptr_t lo = (uintptr_t)base, hi = (uintptr_t)(base + n);
    for (ez_slot *s = m->slots; s; s = s->next) {
        const uintptr_t a = (uintptr_t)s->values, b = (uintptr_t)(s->values + s->n);
        s->group_off = s->n > 0 && a >= lo && b <= hi ? (int64_t)(s->values - base) : -1;
    }
    if (n_sets != m->plan_width) { /* the plan's rows are n_sets wide: size them again */
        free(m->plan_tok);
        free(m->plan_out);
        m->plan_tok = m->plan_out = NULL;
        m->plan_cap = 0;
        m->plan_width = n_sets;
    }
    m->group_sets = sets;
    m->n_groups = n_sets;
    return EZ_OK;
}

int ez_can_group(const ez_model *m) { return m->can_group; }

void ez_groups_clear(ez_model *m) {
    for (ez_slot *s = m->slots; s; s = s->next) s->group_off = -1;
    m->group_sets = NULL;
    m->n_groups = 0;
    m->plan_n = 0;
}

/* Appends an empty micro-batch to the plan. */
static int plan_push(ez_model *m) {
    if (m->plan_n == m->plan_cap) {
        const int32_t cap = m->plan_cap ? 2 * m->plan_cap : 8, G = m->n_groups;
        int32_t *tok = realloc(m->plan_tok, (size_t)cap * G * sizeof *tok);
        if (tok) m->plan_tok = tok;
        int32_t *out = realloc(m->plan_out, (size_t)cap * G * sizeof *out);
        if (out) m->plan_out = out;
        int32_t *ntok = realloc(m->plan_ntok, (size_t)cap * sizeof *ntok);
        if (ntok) m->plan_ntok = ntok;
        int32_t *nout = realloc(m->plan_nout, (size_t)cap * sizeof *nout);
        if (nout) m->plan_nout = nout;
        if (!tok || !out || !ntok || !nout) return fail(EZ_ERR_NOMEM, "out of memory");
        m->plan_cap = cap;
    }
    const int32_t u = m->plan_n++;
    memset(m->plan_tok + (size_t)u * m->n_groups, 0, (size_t)m->n_groups * sizeof *m->plan_tok);
    memset(m->plan_out + (size_t)u * m->n_groups, 0, (size_t)m->n_groups * sizeof *m->plan_out);
    m->plan_ntok[u] = m->plan_nout[u] = 0;
    return EZ_OK;
}

/* Puts tokens [from, from + cnt) of sequence s into the last micro-batch of the plan. */
static void plan_take(ez_model *m, const int32_t *seq_start, const int32_t *seq_group, const uint8_t *want,
                      int32_t s, int32_t from, int32_t cnt) {
    const int32_t u = m->plan_n - 1, g = seq_group[s];
    int32_t n_out = 0;
    for (int32_t p = from; p < from + cnt; p++) n_out += want[seq_start[s] + p] != 0;
    m->plan_tok[(size_t)u * m->n_groups + g] += cnt;
    m->plan_out[(size_t)u * m->n_groups + g] += n_out;
    m->plan_ntok[u] += cnt;
    m->plan_nout[u] += n_out;
}

/* The micro-batches llama.cpp will cut the decode of sequences s0 .. s1-1 into, as columns per
 * group: llama_batch_allocr::split_simple with one KV stream (kv_unified), split_equal with
 * sequential ids otherwise (llama.cpp 0c1e570, llama-batch.cpp), both taking whole sequences'
 * tokens in order. Their order keeps the groups in runs; the callback checks each graph's size. */
static int plan_ubatches(ez_model *m, const int32_t *seq_start, const int32_t *seq_group, const uint8_t *want,
                         int32_t s0, int32_t s1) {
    const int32_t n = s1 - s0, nu = m->n_ubatch;
    int32_t *used = calloc((size_t)n, sizeof *used); /* tokens of each sequence placed so far */
    if (!used) return fail(EZ_ERR_NOMEM, "out of memory");
#define SEQ_LEN(j) (seq_start[s0 + (j) + 1] - seq_start[s0 + (j)])
    int rc = EZ_OK;
    m->plan_n = 0;
    if (m->kv_unified) { /* split_simple: the batch's tokens in order, n_ubatch at a time */
        for (int32_t j = 0; j < n && rc == EZ_OK;) {
            rc = plan_push(m);
            for (int32_t room = nu; rc == EZ_OK && room > 0 && j < n;) {
                const int32_t take = room < SEQ_LEN(j) - used[j] ? room : SEQ_LEN(j) - used[j];
                plan_take(m, seq_start, seq_group, want, s0 + j, used[j], take);
                used[j] += take;
                room -= take;
                if (used[j] == SEQ_LEN(j)) j++;
            }
        }
    } else { /* split_equal(sequential): consecutive sequences, the same count of tokens from each */
        for (;;) {
            int32_t first = 0, k = 0, r = 0;
            while (first < n && used[first] == SEQ_LEN(first)) first++;
            if (first == n) break;
            while (first + k < n && used[first + k] < SEQ_LEN(first + k) && k <= nu) k++;
            for (;;) {
                bool all = true;
                for (int32_t i = 0; i < k && all; i++) all = used[first + i] + r < SEQ_LEN(first + i);
                if (!all) break;
                r++;
                if ((int64_t)(r + 1) * k > nu) break;
            }
            if ((rc = plan_push(m)) != EZ_OK) break;
            for (int32_t i = 0; i < k; i++) {
                plan_take(m, seq_start, seq_group, want, s0 + first + i, used[first + i], r);
                used[first + i] += r;
            }
        }
    }
#undef SEQ_LEN
    free(used);
    if (rc != EZ_OK) m->plan_n = 0;
    return rc;
}

/* ---- decoding ------------------------------------------------------------- */

static int decode(ez_model *m) {
    m->cb_failed = 0;
    ez_log_last[0] = 0;
    m->epoch++; /* device copies of the sparse values are stale from here */
    int32_t rc = llama_decode(m->ctx, m->batch);
    if (m->cb_failed) return fail(EZ_ERR_INVALID, "%s", m->cb_error);
    if (rc != 0)
        return fail(EZ_ERR_RUNTIME, "llama_decode failed with code %d%s%s", rc, ez_log_last[0] ? ": " : "",
                    ez_log_last);
    return EZ_OK;
}

static void batch_add(struct llama_batch *b, int32_t token, int32_t pos, int32_t seq, bool logits) {
    b->token[b->n_tokens] = token;
    b->pos[b->n_tokens] = pos;
    b->n_seq_id[b->n_tokens] = 1;
    b->seq_id[b->n_tokens][0] = seq;
    b->logits[b->n_tokens] = logits;
    b->n_tokens++;
}

/* -log softmax(logits)[target], accumulated in double. */
static double token_nll(const float *logits, int32_t n_vocab, int32_t target) {
    float mx = logits[0];
    for (int32_t i = 1; i < n_vocab; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; i++) sum += exp((double)(logits[i] - mx));
    return log(sum) + (double)mx - (double)logits[target];
}

/* Checks shared by every function that scores whole sequences. */
static int check_sequences(ez_model *m, const int32_t *tokens, const int32_t *seq_start, int32_t n_seq) {
    const int32_t n_vocab = ez_n_vocab(m), n_ctx_seq = ez_n_ctx_seq(m);
    if (n_seq < 1 || seq_start[0] != 0) return fail(EZ_ERR_INVALID, "no sequences given");
    for (int32_t s = 0; s < n_seq; s++) {
        const int32_t len = seq_start[s + 1] - seq_start[s];
        if (len < 1) return fail(EZ_ERR_INVALID, "sequence %d is empty", s);
        if (len > n_ctx_seq || len > m->n_batch)
            return fail(EZ_ERR_INVALID, "sequence %d has %d tokens; this context holds %d per sequence", s, len,
                        n_ctx_seq < m->n_batch ? n_ctx_seq : m->n_batch);
        for (int32_t i = seq_start[s]; i < seq_start[s + 1]; i++)
            if (tokens[i] < 0 || tokens[i] >= n_vocab)
                return fail(EZ_ERR_INVALID, "sequence %d: token %d out of range", s, tokens[i]);
    }
    return EZ_OK;
}

/* seq_group, when given, names a value set of ez_groups_set per sequence, in runs. */
static int check_groups(ez_model *m, const int32_t *seq_group, int32_t n_seq) {
    if (!seq_group) return EZ_OK;
    if (m->n_groups < 1) return fail(EZ_ERR_INVALID, "sequence groups given but no value sets (ez_groups_set)");
    for (int32_t s = 0; s < n_seq; s++) {
        if (seq_group[s] < 0 || seq_group[s] >= m->n_groups)
            return fail(EZ_ERR_INVALID, "sequence %d: group %d is not one of the %d value sets", s, seq_group[s],
                        m->n_groups);
        if (s > 0 && seq_group[s] < seq_group[s - 1])
            return fail(EZ_ERR_INVALID, "sequence %d: groups must come in order (group %d after %d)", s,
                        seq_group[s], seq_group[s - 1]);
    }
    return EZ_OK;
}

/* Receives the logit rows of one decode: row i belongs to sequence seq[i] and was
 * computed at flat token index at[i] (into the caller's tokens). */
typedef void (*rows_fn)(void *user, int32_t n, const int32_t *seq, const int32_t *at, const float **rows);

/* Evaluates whole sequences in as few decodes as fit n_batch and n_seq_max, asking
 * for logits where want[i] != 0, and hands each decode's rows to `consume`. With
 * seq_group (checked by check_groups), sequence s reads value set seq_group[s]. */
static int decode_sequences(ez_model *m, const int32_t *tokens, const uint8_t *want, const int32_t *seq_start,
                            int32_t n_seq, const int32_t *seq_group, rows_fn consume, void *user) {
    const int32_t n_seq_max = ez_n_seq_max(m);
    int32_t *out_seq = malloc((size_t)m->n_batch * sizeof *out_seq);
    int32_t *out_at = malloc((size_t)m->n_batch * sizeof *out_at);
    int32_t *out_idx = malloc((size_t)m->n_batch * sizeof *out_idx);
    const float **rows = malloc((size_t)m->n_batch * sizeof *rows);
    int rc = EZ_OK;
    if (!out_seq || !out_at || !out_idx || !rows) {
        rc = fail(EZ_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int32_t s0 = 0; s0 < n_seq && rc == EZ_OK;) {
        int32_t s1 = s0, n_tok = 0, n_out = 0;
        m->batch.n_tokens = 0;
        while (s1 < n_seq && s1 - s0 < n_seq_max && n_tok + seq_start[s1 + 1] - seq_start[s1] <= m->n_batch) {
            const int32_t a = seq_start[s1], len = seq_start[s1 + 1] - a;
            for (int32_t p = 0; p < len; p++) {
                if (want[a + p]) {
                    out_seq[n_out] = s1;
                    out_at[n_out] = a + p;
                    out_idx[n_out] = m->batch.n_tokens;
                    n_out++;
                }
                batch_add(&m->batch, tokens[a + p], p, s1 - s0, want[a + p] != 0);
            }
            n_tok += len;
            s1++;
        }
        /* Changed weights invalidate every cached key and value. */
        llama_memory_clear(llama_get_memory(m->ctx), true);
        m->gen_active = 0;
        if (n_out > 0) { /* a chunk that wants no logits needs no forward at all */
            if (seq_group) rc = plan_ubatches(m, seq_start, seq_group, want, s0, s1);
            m->plan_cur = -1;
            if (rc == EZ_OK) rc = decode(m);
            if (rc == EZ_OK && m->plan_n > 0 && m->plan_cur != m->plan_n - 1)
                rc = fail(EZ_ERR_RUNTIME, "grouped decode: llama.cpp computed %d micro-batches where %d were planned",
                          m->plan_cur + 1, m->plan_n);
            m->plan_n = 0;
            for (int32_t i = 0; i < n_out && rc == EZ_OK; i++) {
                rows[i] = llama_get_logits_ith(m->ctx, out_idx[i]);
                if (!rows[i]) rc = fail(EZ_ERR_RUNTIME, "llama.cpp returned no logits for batch position %d", out_idx[i]);
            }
            if (rc == EZ_OK) consume(user, n_out, out_seq, out_at, rows);
        }
        s0 = s1;
    }
done:
    free(out_seq);
    free(out_at);
    free(out_idx);
    free(rows);
    return rc;
}

typedef struct {
    ez_model *m;
    const int32_t *tokens;
    double *nll;
    int32_t *count;
    double *scratch; /* n_batch */
} loss_acc;

static void add_nll(void *user, int32_t n, const int32_t *seq, const int32_t *at, const float **rows) {
    loss_acc *acc = user;
    const int32_t n_vocab = ez_n_vocab(acc->m);
#pragma omp parallel for num_threads(acc->m->n_threads) schedule(static)
    for (int32_t i = 0; i < n; i++) acc->scratch[i] = token_nll(rows[i], n_vocab, acc->tokens[at[i] + 1]);
    for (int32_t i = 0; i < n; i++) { /* in order: the sums are the same for any thread count */
        acc->nll[seq[i]] += acc->scratch[i];
        acc->count[seq[i]]++;
    }
}

int ez_loss(ez_model *m, const int32_t *tokens, const uint8_t *target, const int32_t *seq_start,
            int32_t n_seq, const int32_t *seq_group, double *nll, int32_t *count) {
    int rc = check_sequences(m, tokens, seq_start, n_seq);
    if (rc == EZ_OK) rc = check_groups(m, seq_group, n_seq);
    if (rc != EZ_OK) return rc;
    for (int32_t s = 0; s < n_seq; s++) {
        if (target[seq_start[s]]) return fail(EZ_ERR_INVALID, "sequence %d: its first token cannot be a target", s);
        nll[s] = 0.0;
        count[s] = 0;
    }
    const int32_t n_tok = seq_start[n_seq];
    /* Logits at a token predict the next one: wanted where the next token is a target. */
    uint8_t *want = calloc((size_t)n_tok, 1);
    double *scratch = malloc((size_t)m->n_batch * sizeof *scratch);
    if (!want || !scratch) {
        free(want);
        free(scratch);
        return fail(EZ_ERR_NOMEM, "out of memory");
    }
    for (int32_t s = 0; s < n_seq; s++)
        for (int32_t i = seq_start[s]; i + 1 < seq_start[s + 1]; i++) want[i] = target[i + 1] != 0;
    loss_acc acc = {m, tokens, nll, count, scratch};
    rc = decode_sequences(m, tokens, want, seq_start, n_seq, seq_group, add_nll, &acc);
    free(want);
    free(scratch);
    return rc;
}

typedef struct {
    ez_model *m;
    const int32_t *cand;
    const int32_t *cand_start;
    double *logp;
} next_acc;

static void put_logprobs(void *user, int32_t n, const int32_t *seq, const int32_t *at, const float **rows) {
    (void)at;
    next_acc *acc = user;
    const int32_t n_vocab = ez_n_vocab(acc->m);
#pragma omp parallel for num_threads(acc->m->n_threads) schedule(static)
    for (int32_t i = 0; i < n; i++)
        for (int32_t k = acc->cand_start[seq[i]]; k < acc->cand_start[seq[i] + 1]; k++)
            acc->logp[k] = -token_nll(rows[i], n_vocab, acc->cand[k]);
}

int ez_next_logprobs(ez_model *m, const int32_t *tokens, const int32_t *seq_start, int32_t n_seq,
                     const int32_t *seq_group, const int32_t *cand, const int32_t *cand_start, double *logp) {
    int rc = check_sequences(m, tokens, seq_start, n_seq);
    if (rc == EZ_OK) rc = check_groups(m, seq_group, n_seq);
    if (rc != EZ_OK) return rc;
    if (cand_start[0] != 0) return fail(EZ_ERR_INVALID, "candidate offsets must start at 0");
    const int32_t n_vocab = ez_n_vocab(m);
    for (int32_t s = 0; s < n_seq; s++) {
        if (cand_start[s + 1] <= cand_start[s]) return fail(EZ_ERR_INVALID, "sequence %d has no candidates", s);
        for (int32_t k = cand_start[s]; k < cand_start[s + 1]; k++)
            if (cand[k] < 0 || cand[k] >= n_vocab)
                return fail(EZ_ERR_INVALID, "sequence %d: candidate token %d out of range", s, cand[k]);
    }
    const int32_t n_tok = seq_start[n_seq];
    uint8_t *want = calloc((size_t)n_tok, 1);
    if (!want) return fail(EZ_ERR_NOMEM, "out of memory");
    for (int32_t s = 0; s < n_seq; s++) want[seq_start[s + 1] - 1] = 1;
    next_acc acc = {m, cand, cand_start, logp};
    rc = decode_sequences(m, tokens, want, seq_start, n_seq, seq_group, put_logprobs, &acc);
    free(want);
    return rc;
}

/* ---- continuations of shared prefixes -------------------------------------- */

/* The prefix decode's rows: the last prefix token's logits score the first token of each of the
 * prefix's continuations. row[i] belongs to prefix at[i]. */
static void add_first_tokens(ez_model *m, const int32_t *cont_tokens, const uint8_t *cont_target,
                             const int32_t *cont_start, const int32_t *cont_prefix, int32_t n_cont, int32_t n,
                             const int32_t *at, const float **rows, double *nll, int32_t *count) {
    const int32_t n_vocab = ez_n_vocab(m);
    for (int32_t c = 0; c < n_cont; c++) {
        const int32_t first = cont_start[c];
        if (!cont_target[first]) continue;
        for (int32_t i = 0; i < n; i++)
            if (at[i] == cont_prefix[c]) {
                nll[c] += token_nll(rows[i], n_vocab, cont_tokens[first]);
                count[c]++;
            }
    }
}

/* Index of the r-th continuation of prefix p, or -1. */
static int32_t nth_continuation(const int32_t *cont_prefix, int32_t n_cont, int32_t p, int32_t r) {
    for (int32_t c = 0, seen = 0; c < n_cont; c++)
        if (cont_prefix[c] == p && seen++ == r) return c;
    return -1;
}

int ez_continuation_loss(ez_model *m, const int32_t *prefix_tokens, const int32_t *prefix_start, int32_t n_prefix,
                         const int32_t *cont_tokens, const uint8_t *cont_target, const int32_t *cont_start,
                         const int32_t *cont_prefix, int32_t n_cont, double *nll, int32_t *count) {
    int rc = check_sequences(m, prefix_tokens, prefix_start, n_prefix);
    if (rc != EZ_OK) return rc;
    if (n_cont < 1 || cont_start[0] != 0) return fail(EZ_ERR_INVALID, "no continuations given");
    const int32_t n_vocab = ez_n_vocab(m), n_ctx_seq = ez_n_ctx_seq(m), n_seq_max = ez_n_seq_max(m);
    int32_t *longest = calloc((size_t)n_prefix, sizeof *longest); /* longest continuation of each prefix */
    int32_t *out_at = malloc((size_t)m->n_batch * sizeof *out_at);   /* per logits row: prefix or token index */
    int32_t *out_c = malloc((size_t)m->n_batch * sizeof *out_c);     /* per logits row: its continuation */
    int32_t *out_idx = malloc((size_t)m->n_batch * sizeof *out_idx); /* per logits row: its batch position */
    const float **rows = malloc((size_t)m->n_batch * sizeof *rows);
    if (!longest || !out_at || !out_c || !out_idx || !rows) {
        rc = fail(EZ_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int32_t c = 0; c < n_cont && rc == EZ_OK; c++) {
        const int32_t p = cont_prefix[c], len = cont_start[c + 1] - cont_start[c];
        if (p < 0 || p >= n_prefix) {
            rc = fail(EZ_ERR_INVALID, "continuation %d: prefix %d out of range", c, p);
            break;
        }
        if (len < 1) {
            rc = fail(EZ_ERR_INVALID, "continuation %d is empty", c);
            break;
        }
        const int32_t total = prefix_start[p + 1] - prefix_start[p] + len;
        if (total > n_ctx_seq)
            rc = fail(EZ_ERR_INVALID, "continuation %d has %d tokens with its prefix; this context holds %d per sequence",
                      c, total, n_ctx_seq);
        for (int32_t i = cont_start[c]; i < cont_start[c + 1] && rc == EZ_OK; i++)
            if (cont_tokens[i] < 0 || cont_tokens[i] >= n_vocab)
                rc = fail(EZ_ERR_INVALID, "continuation %d: token %d out of range", c, cont_tokens[i]);
        if (len > longest[p]) longest[p] = len;
        nll[c] = 0.0;
        count[c] = 0;
    }
    llama_memory_t mem = llama_get_memory(m->ctx);
    for (int32_t p0 = 0; p0 < n_prefix && rc == EZ_OK;) {
        /* A group: prefixes that fit one decode, with every round of their continuations. */
        int32_t p1 = p0, n_tok = 0, n_round = 0;
        while (p1 < n_prefix && p1 - p0 < n_seq_max && n_tok + prefix_start[p1 + 1] - prefix_start[p1] <= m->n_batch &&
               n_round + longest[p1] <= m->n_batch) {
            n_tok += prefix_start[p1 + 1] - prefix_start[p1];
            n_round += longest[p1];
            p1++;
        }
        if (p1 == p0) {
            rc = fail(EZ_ERR_INVALID, "prefix %d does not fit one decode of %d tokens", p0, m->n_batch);
            break;
        }
        /* Changed weights invalidate every cached key and value. */
        llama_memory_clear(mem, true);
        m->gen_active = 0;
        m->batch.n_tokens = 0;
        int32_t n_out = 0;
        for (int32_t p = p0; p < p1; p++)
            for (int32_t i = prefix_start[p]; i < prefix_start[p + 1]; i++) {
                const bool last = i + 1 == prefix_start[p + 1];
                if (last) {
                    out_at[n_out] = p;
                    out_idx[n_out++] = m->batch.n_tokens;
                }
                batch_add(&m->batch, prefix_tokens[i], i - prefix_start[p], p - p0, last);
            }
        rc = decode(m);
        for (int32_t i = 0; i < n_out && rc == EZ_OK; i++) {
            rows[i] = llama_get_logits_ith(m->ctx, out_idx[i]);
            if (!rows[i]) rc = fail(EZ_ERR_RUNTIME, "llama.cpp returned no logits for prefix %d", out_at[i]);
        }
        if (rc == EZ_OK)
            add_first_tokens(m, cont_tokens, cont_target, cont_start, cont_prefix, n_cont, n_out, out_at, rows, nll, count);
        /* Round r: the r-th continuation of every prefix of the group on top of the prefix's
         * cache, then those tokens dropped again. A continuation's last token predicts nothing
         * scored, so a one-token continuation needs no round at all. */
        for (int32_t r = 0; rc == EZ_OK; r++) {
            int32_t any = 0;
            m->batch.n_tokens = 0;
            n_out = 0;
            for (int32_t p = p0; p < p1; p++) {
                const int32_t k = nth_continuation(cont_prefix, n_cont, p, r);
                if (k < 0) continue;
                any = 1;
                const int32_t plen = prefix_start[p + 1] - prefix_start[p];
                for (int32_t i = cont_start[k]; i + 1 < cont_start[k + 1]; i++) {
                    const bool want = cont_target[i + 1] != 0;
                    if (want) {
                        out_at[n_out] = i;
                        out_c[n_out] = k;
                        out_idx[n_out++] = m->batch.n_tokens;
                    }
                    batch_add(&m->batch, cont_tokens[i], plen + i - cont_start[k], p - p0, want);
                }
            }
            if (!any) break;
            if (m->batch.n_tokens == 0) continue;
            rc = decode(m);
            for (int32_t i = 0; i < n_out && rc == EZ_OK; i++) {
                const float *row = llama_get_logits_ith(m->ctx, out_idx[i]);
                if (!row) {
                    rc = fail(EZ_ERR_RUNTIME, "llama.cpp returned no logits for continuation %d", out_c[i]);
                    break;
                }
                nll[out_c[i]] += token_nll(row, n_vocab, cont_tokens[out_at[i] + 1]);
                count[out_c[i]]++;
            }
            for (int32_t p = p0; p < p1 && rc == EZ_OK; p++)
                if (!llama_memory_seq_rm(mem, p - p0, prefix_start[p + 1] - prefix_start[p], -1))
                    rc = fail(EZ_ERR_RUNTIME, "this model's memory cannot drop a continuation from its cache; "
                                              "score whole sequences instead");
        }
        p0 = p1;
    }
done:
    free(longest);
    free(out_at);
    free(out_c);
    free(out_idx);
    free(rows);
    return rc;
}

/* ---- generation ---------------------------------------------------------- */

int ez_generate_begin(ez_model *m, const int32_t *prompt, int32_t n, float temperature, float top_p, uint32_t seed) {
    const int32_t n_vocab = ez_n_vocab(m);
    if (n < 1) return fail(EZ_ERR_INVALID, "the prompt is empty");
    if (n >= ez_n_ctx_seq(m)) return fail(EZ_ERR_INVALID, "the prompt has %d tokens; the context holds %d", n, ez_n_ctx_seq(m));
    for (int32_t i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= n_vocab) return fail(EZ_ERR_INVALID, "prompt token %d out of range", prompt[i]);
    if (m->sampler) llama_sampler_free(m->sampler);
    m->sampler = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (!m->sampler) return fail(EZ_ERR_NOMEM, "could not create a sampler");
    if (temperature <= 0.0f) {
        llama_sampler_chain_add(m->sampler, llama_sampler_init_greedy());
    } else {
        llama_sampler_chain_add(m->sampler, llama_sampler_init_top_p(top_p, 1));
        llama_sampler_chain_add(m->sampler, llama_sampler_init_temp(temperature));
        llama_sampler_chain_add(m->sampler, llama_sampler_init_dist(seed));
    }
    llama_memory_clear(llama_get_memory(m->ctx), true);
    m->gen_active = 0;
    for (int32_t a = 0; a < n; a += m->n_batch) {
        const int32_t b = a + m->n_batch < n ? a + m->n_batch : n;
        m->batch.n_tokens = 0;
        for (int32_t i = a; i < b; i++) batch_add(&m->batch, prompt[i], i, 0, i == n - 1);
        int rc = decode(m);
        if (rc != EZ_OK) return rc;
    }
    m->gen_pos = n;
    m->gen_active = 1;
    return EZ_OK;
}

int ez_generate_next(ez_model *m, int32_t *token) {
    *token = -1;
    if (!m->gen_active) return EZ_OK;
    const int32_t tok = llama_sampler_sample(m->sampler, m->ctx, -1);
    if (llama_vocab_is_eog(m->vocab, tok) || m->gen_pos >= ez_n_ctx_seq(m)) {
        m->gen_active = 0;
        if (llama_vocab_is_eog(m->vocab, tok)) return EZ_OK;
    }
    *token = tok;
    if (!m->gen_active) return EZ_OK;
    m->batch.n_tokens = 0;
    batch_add(&m->batch, tok, m->gen_pos, 0, true);
    int rc = decode(m);
    if (rc != EZ_OK) {
        m->gen_active = 0;
        return rc;
    }
    m->gen_pos++;
    return EZ_OK;
}

/* ---- activation statistics ------------------------------------------------- */

static void ignore_rows(void *user, int32_t n, const int32_t *seq, const int32_t *at, const float **rows) {
    (void)user;
    (void)n;
    (void)seq;
    (void)at;
    (void)rows;
}

int ez_activation_sumsq(ez_model *m, const int32_t *tokens, const uint8_t *outputs, const int32_t *seq_start,
                        int32_t n_seq, const char *const *names, const int64_t *n_in, int32_t n_w, double *sumsq,
                        int64_t *count) {
    if (!tokens || !seq_start) return fail(EZ_ERR_INVALID, "no sequences given");
    int rc = check_sequences(m, tokens, seq_start, n_seq);
    if (rc != EZ_OK) return rc;
    if (n_w < 1 || !names || !n_in || !sumsq || !count) return fail(EZ_ERR_INVALID, "no weights given");
    int64_t *offset = malloc(((size_t)n_w + 1) * sizeof *offset);
    if (!offset) return fail(EZ_ERR_NOMEM, "out of memory");
    offset[0] = 0;
    for (int32_t w = 0; w < n_w; w++) {
        if (!names[w] || strlen(names[w]) >= GGML_MAX_NAME || n_in[w] < 1) {
            free(offset);
            return fail(EZ_ERR_INVALID, "weight %d: bad name or column count", w);
        }
        for (int32_t v = 0; v < w; v++)
            if (strcmp(names[v], names[w]) == 0) {
                free(offset);
                return fail(EZ_ERR_INVALID, "weight %s is listed twice", names[w]);
            }
        offset[w + 1] = offset[w] + n_in[w];
    }
    memset(sumsq, 0, (size_t)offset[n_w] * sizeof *sumsq);
    memset(count, 0, (size_t)n_w * sizeof *count);
    const int32_t n_tok = seq_start[n_seq];
    uint8_t *want = calloc((size_t)n_tok, 1);
    if (!want) {
        free(offset);
        return fail(EZ_ERR_NOMEM, "out of memory");
    }
    for (int32_t s = 0; s < n_seq; s++) {
        for (int32_t i = seq_start[s]; i < seq_start[s + 1]; i++) want[i] = outputs && outputs[i];
        want[seq_start[s + 1] - 1] = 1; /* every decode needs an output */
    }
    ez_stats st = {n_w, names, n_in, offset, sumsq, count};
    m->stats = &st;
    rc = decode_sequences(m, tokens, want, seq_start, n_seq, NULL, ignore_rows, NULL);
    m->stats = NULL;
    free(want);
    free(offset);
    return rc;
}
