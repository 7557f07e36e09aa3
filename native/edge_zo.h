/* edge-zo native core: sparse weight deltas inside llama.cpp forward passes.
 *
 * This header is both what edge_zo.c includes and what the cffi builder
 * declares (it strips the preprocessor lines), so the two never drift.
 * Every name carries the ez_ prefix. Functions return EZ_OK or an error
 * code; ez_last_error() then holds a message for this thread. */
#ifndef EDGE_ZO_H
#define EDGE_ZO_H
#include <stddef.h>
#include <stdint.h>

#define EZ_OK 0
#define EZ_ERR_IO 1
#define EZ_ERR_INVALID 2
#define EZ_ERR_RUNTIME 3
#define EZ_ERR_NOMEM 4

typedef struct ez_model ez_model;

typedef struct ez_model_params {
    int32_t n_ctx_seq;    /* tokens of context per sequence */
    int32_t n_seq_max;    /* sequences evaluated in one llama_decode */
    int32_t n_batch;      /* tokens submitted to one llama_decode */
    int32_t n_ubatch;     /* tokens computed in one graph */
    int32_t n_threads;    /* 0: llama.cpp's default */
    int32_t n_gpu_layers; /* layers offloaded to a GPU backend, if any */
    int32_t kv_f32;       /* 1: F32 KV cache instead of F16 */
    int32_t flash_attn;   /* -1 auto, 0 off, 1 on */
    int32_t verbose;      /* 1: pass llama.cpp's info log through */
    int32_t extra_bufts;  /* 1: allow llama.cpp's repacked/AMX CPU weight buffers */
    int32_t kv_unified;   /* 1: one KV cache shared by the sequences, 0: one per sequence (see ez_model_open) */
} ez_model_params;

void ez_default_params(ez_model_params *params);
const char *ez_last_error(void);

int ez_model_open(const char *path, const ez_model_params *params, ez_model **out);

/* llama.cpp's quantizer on a whole GGUF: src -> dst with file type `ftype` (a LLAMA_FTYPE_*
 * value, e.g. 15 for Q4_K_M), n_threads <= 0 for all cores. It writes the K-quants that
 * gguf-py cannot. */
int ez_quantize(const char *src, const char *dst, int32_t ftype, int32_t n_threads);
void ez_model_close(ez_model *m);

int32_t ez_n_vocab(const ez_model *m);
int32_t ez_n_ctx_seq(const ez_model *m);
int32_t ez_n_seq_max(const ez_model *m);
int32_t ez_n_batch(const ez_model *m);
int32_t ez_token_bos(const ez_model *m);
int32_t ez_token_eos(const ez_model *m);
int ez_token_is_eog(const ez_model *m, int32_t token);
int ez_add_bos(const ez_model *m);
/* Non-host buffers seen by the sparse path so far (generic get/set fallback). */
int64_t ez_fallback_count(const ez_model *m);
/* Graph nodes patched so far by the host kernels and by the CUDA kernels. */
int64_t ez_host_count(const ez_model *m);
int64_t ez_cuda_count(const ez_model *m);
/* llama_decode calls so far (how many a grouped evaluation took). */
int64_t ez_decode_count(const ez_model *m);
/* 1 when this build has the CUDA kernels (EDGE_ZO_CUDA). */
int ez_has_cuda(void);
/* The extra CPU weight buffer types llama.cpp offers on this machine, i.e. what extra_bufts
 * would turn on, as comma-separated names in buf (e.g. "CPU_REPACK", or "AMX,CPU_REPACK" on a
 * CPU with AMX); "" when there are none. EZ_ERR_INVALID when cap is too small. */
int ez_cpu_extra_bufts(char *buf, int32_t cap);

/* Text. *n_out receives the needed size when cap is too small (EZ_ERR_NOMEM). */
int ez_tokenize(const ez_model *m, const char *text, int32_t len, int add_special,
                int parse_special, int32_t *out, int32_t cap, int32_t *n_out);
int ez_token_piece(const ez_model *m, int32_t token, char *buf, int32_t cap, int32_t *n_out);
int ez_chat_template(const ez_model *m, const char **roles, const char **contents,
                     int32_t n_msg, int add_assistant, char *buf, int32_t cap, int32_t *n_out);

/* Sparse deltas. A slot adds values[i] at flat index idx[i] = (e*n_out + row)*n_in + col
 * of weight `name` (GGUF shape [n_in, n_out, n_expert]). idx is copied; `values`
 * is borrowed: the caller keeps it alive and may change it between forwards. */
int ez_sparse_add(ez_model *m, const char *name, int64_t n_in, int64_t n_out, int64_t n_expert,
                  const int64_t *idx, const float *values, int64_t n, int64_t *slot);
int ez_sparse_remove(ez_model *m, int64_t slot);
void ez_sparse_clear(ez_model *m);

/* Perturbation groups: several value sets evaluated in one llama_decode, each on its own copies
 * of the sequences (an SPSA step's theta+eps*z and theta-eps*z). Until ez_groups_clear, a slot whose
 * values lie inside base[0 .. n) reads sets[g] at the same offsets for the tokens of a sequence in
 * group g; any other slot (a fixed adapter underneath) reads its own values in every group. The
 * sets are borrowed like slot values. ez_loss and ez_next_logprobs take the groups of their
 * sequences in seq_group (non-decreasing, < n_sets; NULL: no groups). Decodes are packed as
 * always; llama.cpp's micro-batches keep the sequences in order, so each group is a run of
 * columns in every graph node, and the callback follows them (EZ_ERR_RUNTIME where llama.cpp
 * split a decode otherwise than planned, or for recurrent and hybrid models). */
int ez_groups_set(ez_model *m, const float *base, int64_t n, const float *const *sets, int32_t n_sets);
/* 1 when this model can evaluate groups (ez_groups_set refuses recurrent and hybrid ones). */
int ez_can_group(const ez_model *m);
void ez_groups_clear(ez_model *m);

/* Loss oracle. Sequence s is tokens[seq_start[s] .. seq_start[s+1]); a token with
 * target[i] != 0 (never the first of its sequence) is predicted from the one before.
 * nll[s] is the summed negative log-likelihood of its targets, count[s] how many. */
int ez_loss(ez_model *m, const int32_t *tokens, const uint8_t *target,
            const int32_t *seq_start, int32_t n_seq, const int32_t *seq_group, double *nll, int32_t *count);

/* Next-token log-probabilities. For each sequence s, logp[k] = log p(cand[k] | all of
 * sequence s) for k in cand_start[s] .. cand_start[s+1]: the scores of single-token
 * choices after a shared prompt, from one forward of the prompt alone. */
int ez_next_logprobs(ez_model *m, const int32_t *tokens, const int32_t *seq_start, int32_t n_seq,
                     const int32_t *seq_group, const int32_t *cand, const int32_t *cand_start, double *logp);

/* Losses of continuations that share prefixes: the multi-token choices of a prompt, each prompt
 * decoded once instead of once per choice. Continuation c follows prefix cont_prefix[c]; its
 * tokens cont_tokens[cont_start[c] .. cont_start[c+1]) sit right after that prefix and
 * cont_target flags the ones scored. nll[c] and count[c] are what ez_loss gives for the sequence
 * prefix + continuation with those targets. Prefixes are decoded together; then, round by round,
 * each prefix's next continuation is decoded on top of its cached keys and values and removed
 * again (llama_memory_seq_rm). EZ_ERR_RUNTIME if this model's memory cannot remove a tail
 * (recurrent models): score whole sequences with ez_loss there. */
int ez_continuation_loss(ez_model *m, const int32_t *prefix_tokens, const int32_t *prefix_start, int32_t n_prefix,
                         const int32_t *cont_tokens, const uint8_t *cont_target, const int32_t *cont_start,
                         const int32_t *cont_prefix, int32_t n_cont, double *nll, int32_t *count);

/* Generation: begin with a prompt, then call next until *token is -1. */
int ez_generate_begin(ez_model *m, const int32_t *prompt, int32_t n, float temperature,
                      float top_p, uint32_t seed);
int ez_generate_next(ez_model *m, int32_t *token);

/* Activation statistics, the input side of llama.cpp's imatrix: forwards of the sequences
 * tokens[seq_start[s] .. seq_start[s+1]) (attached sparse deltas apply) and, for every
 * MUL_MAT whose weight is names[w] (n_in[w] columns), sumsq[off(w) + j] receives the sum over
 * the token columns it saw of x_j^2, x its input, with off(w) = n_in[0] + ... + n_in[w-1];
 * count[w] receives how many token columns that was. Logits are computed where outputs[i]
 * != 0 (outputs may be NULL) and at every sequence's last token; llama.cpp runs the last
 * block's feed-forward only on those tokens, so count differs between weights. A weight
 * used by MUL_MAT_ID (experts) fails; one never multiplied keeps count 0. */
int ez_activation_sumsq(ez_model *m, const int32_t *tokens, const uint8_t *outputs, const int32_t *seq_start,
                        int32_t n_seq, const char *const *names, const int64_t *n_in, int32_t n_w, double *sumsq,
                        int64_t *count);

#endif
