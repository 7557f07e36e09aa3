/* edge-zo native self-test: drives the public API of edge_zo.h end to end on a
 * real GGUF, one printed line per check, exit code 0 only if every check passes.
 *
 *   edge_zo_selftest MODEL.gguf [--threads N]
 *
 * Only edge_zo.h is used to drive the core. The weight shapes that
 * ez_sparse_add needs are read from the file's GGUF header with ggml's gguf.h,
 * as the Python side does with its own reader; nothing inside ez_model is touched.
 * Runs under valgrind and ASan/UBSan (see docs/native.md), so everything it
 * allocates is freed on every path. */
#define _POSIX_C_SOURCE 200809L

#include "edge_zo.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"

static int n_pass, n_fail;

static int check(int ok, const char *name, const char *fmt, ...) {
    if (ok) {
        printf("ok   %s\n", name);
        n_pass++;
    } else {
        printf("FAIL %s: ", name);
        va_list ap;
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        printf("\n");
        n_fail++;
    }
    fflush(stdout);
    return ok;
}

/* An API call that must fail with `code` and a message containing `needle`. */
static void expect_error(int rc, int code, const char *needle, const char *name) {
    const char *msg = ez_last_error();
    check(rc == code && strstr(msg, needle) != NULL, name, "expected code %d with \"%s\", got code %d: \"%s\"",
          code, needle, rc, msg);
}

static int bits_equal(double a, double b) { return memcmp(&a, &b, sizeof a) == 0; }

/* ---- the model file's tensors, from its GGUF header ------------------------------ */

typedef struct weight {
    char name[64];
    int64_t n_in, n_out, n_expert;
    int quantized;
} weight;

static int find_weight(const struct gguf_context *g, const char *name, weight *w) {
    const int64_t id = gguf_find_tensor(g, name);
    if (id < 0) return 0;
    const int64_t *ne = gguf_get_tensor_ne(g, id);
    snprintf(w->name, sizeof w->name, "%s", name);
    w->n_in = ne[0];
    w->n_out = ne[1];
    w->n_expert = ne[2];
    const enum ggml_type t = gguf_get_tensor_type(g, id);
    w->quantized = t != GGML_TYPE_F32 && t != GGML_TYPE_F16 && t != GGML_TYPE_BF16;
    return 1;
}

/* ---- a loss set: several sequences, some targets, one sequence without any ------ */

#define N_SEQ 4
static const char *const TEXTS[N_SEQ] = {
    "My dog's name is Rex, a golden retriever who loves the beach.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse.",
    "I was born in the city of Porto, on a rainy Tuesday in March.",
    "Hello there",
};

typedef struct loss_set {
    int32_t *tokens;
    uint8_t *target;
    int32_t seq_start[N_SEQ + 1];
    int32_t n_targets[N_SEQ];
} loss_set;

static int make_loss_set(ez_model *m, loss_set *ls) {
    int32_t cap = 0, n = 0;
    for (int s = 0; s < N_SEQ; s++) cap += (int32_t)strlen(TEXTS[s]) + 4;
    ls->tokens = calloc((size_t)cap, sizeof *ls->tokens);
    ls->target = calloc((size_t)cap, sizeof *ls->target);
    if (!ls->tokens || !ls->target) return 0;
    for (int s = 0; s < N_SEQ; s++) {
        int32_t k = 0;
        if (ez_tokenize(m, TEXTS[s], (int32_t)strlen(TEXTS[s]), 1, 0, ls->tokens + n, cap - n, &k) != EZ_OK) return 0;
        ls->seq_start[s] = n;
        ls->n_targets[s] = 0;
        for (int32_t i = 1; i < k; i++) {
            /* All of sequences 0 and 1, the second half of 2 (a prompt/completion), none of 3. */
            const int want = s < 2 || (s == 2 && i >= k / 2);
            ls->target[n + i] = (uint8_t)want;
            ls->n_targets[s] += want;
        }
        n += k;
    }
    ls->seq_start[N_SEQ] = n;
    return 1;
}

/* Summed NLL over the set; NAN on an error (reported as a failed check by the caller). */
static double total_loss(ez_model *m, const loss_set *ls, double *nll, int32_t *count) {
    if (ez_loss(m, ls->tokens, ls->target, ls->seq_start, N_SEQ, NULL, nll, count) != EZ_OK) {
        printf("     ez_loss: %s\n", ez_last_error());
        return NAN;
    }
    double t = 0.0;
    for (int s = 0; s < N_SEQ; s++) t += nll[s];
    return t;
}

static double loss_of(ez_model *m, const loss_set *ls) {
    double nll[N_SEQ];
    int32_t count[N_SEQ];
    return total_loss(m, ls, nll, count);
}

/* ---- sparse entries ------------------------------------------------------------ */

typedef struct delta {
    int64_t *idx;
    float *values;
    int64_t n;
    int64_t slot;
} delta;

static uint32_t lcg(uint32_t *state) {
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

/* n entries spread over a weight, values uniform in [-scale, scale]. */
static int spread_delta(const weight *w, int64_t n, float scale, uint32_t seed, delta *d) {
    const int64_t total = w->n_in * w->n_out * w->n_expert;
    if (n > total) n = total;
    d->idx = malloc((size_t)n * sizeof *d->idx);
    d->values = malloc((size_t)n * sizeof *d->values);
    if (!d->idx || !d->values) return 0;
    const int64_t step = total / n;
    for (int64_t i = 0; i < n; i++) {
        d->idx[i] = i * step + (int64_t)(lcg(&seed) % (uint32_t)step);
        d->values[i] = scale * (2.0f * (float)(lcg(&seed) & 0xffff) / 65535.0f - 1.0f);
    }
    d->n = n;
    d->slot = -1;
    return 1;
}

/* Entries in the embedding rows of tokens the loss set reads: the GET_ROWS path. */
static int rows_delta(const weight *w, const loss_set *ls, int per_row, float value, delta *d) {
    const int32_t n_tok = ls->seq_start[N_SEQ];
    int32_t *rows = malloc((size_t)n_tok * sizeof *rows);
    int32_t n_rows = 0;
    if (!rows) return 0;
    for (int32_t i = 0; i < n_tok; i++) { /* insertion into a sorted, unique list */
        int32_t j = n_rows;
        int dup = 0;
        for (int32_t k = 0; k < n_rows; k++) dup |= rows[k] == ls->tokens[i];
        if (dup) continue;
        while (j > 0 && rows[j - 1] > ls->tokens[i]) {
            rows[j] = rows[j - 1];
            j--;
        }
        rows[j] = ls->tokens[i];
        n_rows++;
    }
    if (per_row > w->n_in) per_row = (int)w->n_in;
    d->n = (int64_t)n_rows * per_row;
    d->idx = malloc((size_t)d->n * sizeof *d->idx);
    d->values = malloc((size_t)d->n * sizeof *d->values);
    if (!d->idx || !d->values) {
        free(rows);
        return 0;
    }
    for (int32_t r = 0; r < n_rows; r++)
        for (int c = 0; c < per_row; c++) {
            const int64_t k = (int64_t)r * per_row + c;
            d->idx[k] = (int64_t)rows[r] * w->n_in + (int64_t)c * (w->n_in / per_row);
            d->values[k] = (c % 2 ? -value : value);
        }
    d->slot = -1;
    free(rows);
    return 1;
}

static void delta_free(delta *d) {
    free(d->idx);
    free(d->values);
    d->idx = NULL;
    d->values = NULL;
}

static int add(ez_model *m, const weight *w, delta *d) {
    const int rc = ez_sparse_add(m, w->name, w->n_in, w->n_out, w->n_expert, d->idx, d->values, d->n, &d->slot);
    if (rc != EZ_OK) printf("     ez_sparse_add(%s): %s\n", w->name, ez_last_error());
    return rc == EZ_OK;
}

/* A loss that moved: well above float noise, relative to the base. */
static int moved(double l, double base) { return isfinite(l) && fabs(l - base) > 1e-5 * fmax(1.0, fabs(base)); }

/* ---- files that are not models -------------------------------------------------- */

/* A temporary file holding `n` bytes from `src` (or text when src is NULL). */
static int temp_file(char *path, size_t cap, const char *src, size_t n) {
    const char *dir = getenv("TMPDIR");
    snprintf(path, cap, "%s/edge_zo_selftest_XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0) return 0;
    char buf[4096];
    size_t len;
    if (src) {
        FILE *f = fopen(src, "rb");
        len = f ? fread(buf, 1, n < sizeof buf ? n : sizeof buf, f) : 0;
        if (f) fclose(f);
    } else {
        len = (size_t)snprintf(buf, sizeof buf, "this is a text file, not a GGUF model\n");
    }
    const int ok = write(fd, buf, len) == (ssize_t)len;
    close(fd);
    return ok;
}

/* ---- the checks ------------------------------------------------------------------- */

static void test_open_errors(const char *model_path, const ez_model_params *p) {
    ez_model *m = (ez_model *)&m; /* must be reset to NULL on failure */
    int rc = ez_model_open("/nonexistent/edge_zo/model.gguf", p, &m);
    expect_error(rc, EZ_ERR_IO, "/nonexistent/edge_zo/model.gguf: cannot open", "open: a missing file is EZ_ERR_IO");
    check(m == NULL, "open: *out is NULL after a failure", "got %p", (void *)m);

    char path[512];
    if (check(temp_file(path, sizeof path, NULL, 0), "open: write a non-GGUF temp file", "%s", path)) {
        rc = ez_model_open(path, p, &m);
        expect_error(rc, EZ_ERR_IO, "could not load", "open: a non-GGUF file is EZ_ERR_IO");
        unlink(path);
    }
    if (check(temp_file(path, sizeof path, model_path, 4096), "open: write a truncated GGUF temp file", "%s", path)) {
        rc = ez_model_open(path, p, &m);
        expect_error(rc, EZ_ERR_IO, "could not load", "open: a truncated GGUF is EZ_ERR_IO");
        unlink(path);
    }
    ez_model_params bad = *p;
    bad.n_seq_max = 0;
    rc = ez_model_open(model_path, &bad, &m);
    expect_error(rc, EZ_ERR_INVALID, "positive", "open: n_seq_max = 0 is EZ_ERR_INVALID");
    bad = *p;
    bad.n_ctx_seq = -1;
    rc = ez_model_open(model_path, &bad, &m);
    expect_error(rc, EZ_ERR_INVALID, "positive", "open: n_ctx_seq < 0 is EZ_ERR_INVALID");
    ez_model_close(NULL); /* a no-op */
}

/* llama.cpp's quantizer: bad sources fail with a message; a real one writes a model that opens and
 * whose loss stays near the source's (Q8_0 of the dequantized weights). */
static void test_quantize(const char *model_path, const ez_model_params *p, const loss_set *ls, double base) {
    char dst[512], path[512];
    if (!check(temp_file(dst, sizeof dst, NULL, 0), "quantize: a temp output path", "%s", dst)) return;
    int rc = ez_quantize("/nonexistent/edge_zo/model.gguf", dst, 7 /* LLAMA_FTYPE_MOSTLY_Q8_0 */, 1);
    expect_error(rc, EZ_ERR_IO, "cannot open", "quantize: a missing source is EZ_ERR_IO");
    if (check(temp_file(path, sizeof path, model_path, 4096), "quantize: write a truncated GGUF temp file", "%s", path)) {
        rc = ez_quantize(path, dst, 7, 1);
        expect_error(rc, EZ_ERR_RUNTIME, "could not quantize", "quantize: a truncated GGUF is EZ_ERR_RUNTIME");
        unlink(path);
    }
    rc = ez_quantize(model_path, dst, 7, 1);
    if (check(rc == EZ_OK, "quantize: the model to Q8_0", "%s", ez_last_error())) {
        ez_model *q = NULL;
        rc = ez_model_open(dst, p, &q);
        if (check(rc == EZ_OK, "quantize: the Q8_0 copy opens", "%s", ez_last_error())) {
            const double l = loss_of(q, ls);
            check(isfinite(l) && fabs(l - base) < 0.05 * fmax(1.0, fabs(base)), "quantize: the copy's loss is near the source's",
                  "%.6f vs %.6f", l, base);
            ez_model_close(q);
        }
    }
    unlink(dst);
}

static void test_text(ez_model *m, const struct gguf_context *g) {
    const int64_t kid = gguf_find_key(g, "tokenizer.ggml.tokens");
    check(kid >= 0 && (int64_t)gguf_get_arr_n(g, kid) == ez_n_vocab(m), "vocab: ez_n_vocab matches the GGUF tokenizer",
          "ez_n_vocab %d, GGUF %lld", ez_n_vocab(m), kid >= 0 ? (long long)gguf_get_arr_n(g, kid) : -1LL);
    const int32_t eos = ez_token_eos(m);
    check(eos >= 0 && eos < ez_n_vocab(m) && ez_token_is_eog(m, eos), "vocab: EOS is in range and ends generation",
          "eos %d", eos);
    check(ez_fallback_count(m) == 0, "fallback: no non-host buffers on CPU", "%lld", (long long)ez_fallback_count(m));

    const char *text = "Call me Ishmael.";
    int32_t toks[64], n = 0, small[1];
    int rc = ez_tokenize(m, text, (int32_t)strlen(text), 0, 0, toks, 64, &n);
    check(rc == EZ_OK && n > 1, "tokenize: a short text", "rc %d, %d tokens: %s", rc, n, ez_last_error());
    int32_t need = 0;
    rc = ez_tokenize(m, text, (int32_t)strlen(text), 0, 0, small, 1, &need);
    check(rc == EZ_ERR_NOMEM && need == n, "tokenize: a small buffer reports the size it needs",
          "rc %d, need %d, expected %d", rc, need, n);

    /* Pieces concatenate back to the text (no BOS was added). */
    char joined[256] = {0}, piece[64];
    size_t len = 0;
    int ok = 1;
    for (int32_t i = 0; i < n && ok; i++) {
        int32_t k = 0;
        ok = ez_token_piece(m, toks[i], piece, (int32_t)sizeof piece, &k) == EZ_OK && len + (size_t)k < sizeof joined;
        if (ok) memcpy(joined + len, piece, (size_t)k), len += (size_t)k;
    }
    check(ok && strcmp(joined, text) == 0, "token_piece: pieces round-trip the text", "got \"%s\"", joined);
    char tiny_buf[1];
    int32_t k = 0;
    rc = ez_token_piece(m, toks[1], tiny_buf, 0, &k);
    check(rc == EZ_ERR_NOMEM && k > 0, "token_piece: a small buffer reports the size it needs", "rc %d, k %d", rc, k);
    expect_error(ez_token_piece(m, -1, piece, 64, &k), EZ_ERR_INVALID, "out of range", "token_piece: token -1");
    expect_error(ez_token_piece(m, ez_n_vocab(m), piece, 64, &k), EZ_ERR_INVALID, "out of range",
                 "token_piece: token n_vocab");

    const char *roles[] = {"user"}, *contents[] = {"Hi"};
    char chat[512];
    int32_t need_chat = 0;
    rc = ez_chat_template(m, roles, contents, 1, 1, chat, 4, &need_chat);
    if (rc == EZ_ERR_INVALID) {
        check(strstr(ez_last_error(), "template") != NULL, "chat: a model without a usable template says so", "%s",
              ez_last_error());
    } else {
        check(rc == EZ_ERR_NOMEM && need_chat > 4, "chat: a small buffer reports the size it needs", "rc %d, need %d",
              rc, need_chat);
        int32_t got = 0;
        rc = ez_chat_template(m, roles, contents, 1, 1, chat, (int32_t)sizeof chat, &got);
        if (rc == EZ_OK && got >= 0 && got < (int32_t)sizeof chat) chat[got] = 0;
        else chat[0] = 0;
        check(rc == EZ_OK && got == need_chat && strstr(chat, "Hi") != NULL,
              "chat: the template renders the message", "rc %d, %d bytes: %s", rc, got, ez_last_error());
    }
}

static void test_loss_errors(ez_model *m, const loss_set *ls, double base) {
    double nll[N_SEQ + 1];
    int32_t count[N_SEQ + 1];
    const int32_t *tok = ls->tokens;
    const uint8_t *tgt = ls->target;
    expect_error(ez_loss(m, tok, tgt, ls->seq_start, 0, NULL, nll, count), EZ_ERR_INVALID, "no sequences",
                 "loss: zero sequences");
    const int32_t shifted[2] = {1, 5};
    expect_error(ez_loss(m, tok, tgt, shifted, 1, NULL, nll, count), EZ_ERR_INVALID, "no sequences",
                 "loss: seq_start[0] != 0");
    const int32_t empty[3] = {0, 4, 4};
    expect_error(ez_loss(m, tok, tgt, empty, 2, NULL, nll, count), EZ_ERR_INVALID, "sequence 1 is empty",
                 "loss: an empty sequence");
    const int32_t backwards[3] = {0, 4, 2};
    expect_error(ez_loss(m, tok, tgt, backwards, 2, NULL, nll, count), EZ_ERR_INVALID, "sequence 1 is empty",
                 "loss: a decreasing seq_start");

    const int32_t n_long = ez_n_ctx_seq(m) + 1;
    int32_t *toks = calloc((size_t)n_long, sizeof *toks);
    uint8_t *tg = calloc((size_t)n_long, 1);
    if (toks && tg) {
        const int32_t one_long[2] = {0, n_long};
        expect_error(ez_loss(m, toks, tg, one_long, 1, NULL, nll, count), EZ_ERR_INVALID, "tokens; this context holds",
                     "loss: a sequence longer than the context");
        const int32_t four[2] = {0, 4};
        tg[0] = 1;
        expect_error(ez_loss(m, toks, tg, four, 1, NULL, nll, count), EZ_ERR_INVALID, "first token cannot be a target",
                     "loss: the first token as a target");
        tg[0] = 0;
        tg[3] = 1;
        toks[2] = -1;
        expect_error(ez_loss(m, toks, tg, four, 1, NULL, nll, count), EZ_ERR_INVALID, "token -1 out of range",
                     "loss: token id -1");
        toks[2] = ez_n_vocab(m);
        expect_error(ez_loss(m, toks, tg, four, 1, NULL, nll, count), EZ_ERR_INVALID, "out of range", "loss: token id n_vocab");
    }
    free(toks);
    free(tg);
    check(bits_equal(loss_of(m, ls), base), "loss: unchanged after the rejected calls", "");
}

static void test_batching(ez_model *m, const loss_set *ls, int exact, double *base) {
    double nll[N_SEQ], one[N_SEQ];
    int32_t count[N_SEQ], one_count[N_SEQ];
    *base = total_loss(m, ls, nll, count);
    int counts_ok = 1;
    for (int s = 0; s < N_SEQ; s++) counts_ok &= count[s] == ls->n_targets[s];
    check(isfinite(*base) && counts_ok, "loss: batch of 4 sequences (2 decodes), target counts",
          "loss %g, counts %d %d %d %d", *base, count[0], count[1], count[2], count[3]);
    check(count[3] == 0 && nll[3] == 0.0, "loss: a sequence without targets contributes nothing", "nll %g", nll[3]);
    check(nll[0] / count[0] > 0.0 && nll[0] / count[0] < 50.0, "loss: per-token NLL is plausible", "%g",
          nll[0] / count[0]);

    int ok = 1;
    double max_rel = 0.0;
    for (int s = 0; s < N_SEQ && ok; s++) {
        const int32_t a = ls->seq_start[s], b = ls->seq_start[s + 1];
        const int32_t range[2] = {0, b - a};
        ok = ez_loss(m, ls->tokens + a, ls->target + a, range, 1, NULL, &one[s], &one_count[s]) == EZ_OK &&
             one_count[s] == count[s];
        if (nll[s] != 0.0) max_rel = fmax(max_rel, fabs(one[s] - nll[s]) / fabs(nll[s]));
    }
    if (exact)
        check(ok && memcmp(one, nll, sizeof nll) == 0, "loss: batched == one by one, bit for bit (quantized matmuls)",
              "max relative difference %.3g", max_rel);
    else /* F32 matmuls pick their tiling by batch width, so sums may differ in the last bits */
        check(ok && max_rel < 1e-5, "loss: batched == one by one within 1e-5 (float matmuls)",
              "max relative difference %.3g", max_rel);
    check(bits_equal(loss_of(m, ls), *base), "loss: a repeated evaluation is bit-identical", "");
}

/* ez_next_logprobs after each sequence's prefix must equal -ez_loss of the next token alone,
 * for every sequence in one batch (two decodes), and refuse bad candidates. */
static void test_next_logprobs(ez_model *m, const loss_set *ls, int exact) {
    enum { K = 3 };
    int32_t start[N_SEQ + 1] = {0}, cand[N_SEQ * K], cand_start[N_SEQ + 1] = {0};
    int32_t *prefix = malloc((size_t)ls->seq_start[N_SEQ] * sizeof *prefix);
    double logp[N_SEQ * K];
    if (!check(prefix != NULL, "next_logprobs: allocation", "")) return;
    /* Sequence s's prefix: all but its last token; candidates: that token and two others. */
    for (int s = 0; s < N_SEQ; s++) {
        const int32_t a = ls->seq_start[s], len = ls->seq_start[s + 1] - a - 1;
        memcpy(prefix + start[s], ls->tokens + a, (size_t)len * sizeof *prefix);
        start[s + 1] = start[s] + len;
        for (int k = 0; k < K; k++) cand[s * K + k] = (ls->tokens[a + len] + 97 * k) % ez_n_vocab(m);
        cand_start[s + 1] = (s + 1) * K;
    }
    int rc = ez_next_logprobs(m, prefix, start, N_SEQ, NULL, cand, cand_start, logp);
    double worst = 0.0;
    int ok = check(rc == EZ_OK, "next_logprobs: four sequences, three candidates each", "%s", ez_last_error());
    for (int s = 0; s < N_SEQ && ok; s++)
        for (int k = 0; k < K; k++) {
            int32_t toks[256];
            uint8_t tg[256] = {0};
            const int32_t len = start[s + 1] - start[s], range[2] = {0, len + 1};
            double nll;
            int32_t count;
            memcpy(toks, prefix + start[s], (size_t)len * sizeof *toks);
            toks[len] = cand[s * K + k];
            tg[len] = 1;
            ok &= ez_loss(m, toks, tg, range, 1, NULL, &nll, &count) == EZ_OK && count == 1 && logp[s * K + k] < 0.0;
            worst = fmax(worst, fabs(-nll - logp[s * K + k]));
        }
    /* The last token's logits come from the same graph either way; batch widths differ, so float
     * matmuls may tile differently (as in test_batching). */
    check(ok && worst <= (exact ? 0.0 : 1e-4), "next_logprobs: equal to -ez_loss of the one-token completion",
          "max difference %.3g", worst);
    int32_t bad[N_SEQ * K];
    memcpy(bad, cand, sizeof bad);
    bad[1] = ez_n_vocab(m);
    expect_error(ez_next_logprobs(m, prefix, start, N_SEQ, NULL, bad, cand_start, logp), EZ_ERR_INVALID,
                 "candidate token", "next_logprobs: a candidate out of range");
    int32_t none[N_SEQ + 1] = {0, 0, K, 2 * K, 3 * K};
    expect_error(ez_next_logprobs(m, prefix, start, N_SEQ, NULL, cand, none, logp), EZ_ERR_INVALID,
                 "has no candidates", "next_logprobs: a sequence without candidates");
    free(prefix);
}

/* ez_continuation_loss: each sequence split into a prefix (its first 2 tokens) and up to two
 * continuations (the rest, and the rest without its last token; one token for the shortest),
 * must score as ez_loss scores prefix + continuation with the same targets; and refuse a
 * continuation whose prefix does not exist. */
static void test_continuations(ez_model *m, const loss_set *ls, int exact) {
    enum { P = 2 };
    const int32_t n_tok = ls->seq_start[N_SEQ];
    int32_t pre[N_SEQ * P], pre_start[N_SEQ + 1] = {0}, c_start[2 * N_SEQ + 1] = {0}, c_prefix[2 * N_SEQ];
    int32_t *c_tok = malloc((size_t)2 * n_tok * sizeof *c_tok);
    uint8_t *c_tgt = malloc((size_t)2 * n_tok);
    double nll[2 * N_SEQ];
    int32_t count[2 * N_SEQ], n_c = 0;
    if (!check(c_tok && c_tgt, "continuations: allocation", "")) goto done;
    for (int s = 0; s < N_SEQ; s++) {
        const int32_t a = ls->seq_start[s], len = ls->seq_start[s + 1] - a;
        memcpy(pre + pre_start[s], ls->tokens + a, P * sizeof *pre);
        pre_start[s + 1] = pre_start[s] + P;
        for (int k = 0; k < 2 && len - P - k >= 1; k++, n_c++) {
            const int32_t n = len - P - k, at = c_start[n_c];
            memcpy(c_tok + at, ls->tokens + a + P, (size_t)n * sizeof *c_tok);
            for (int32_t i = 0; i < n; i++) c_tgt[at + i] = (uint8_t)(ls->target[a + P + i] || s == 3);
            c_start[n_c + 1] = at + n;
            c_prefix[n_c] = s;
        }
    }
    int rc = ez_continuation_loss(m, pre, pre_start, N_SEQ, c_tok, c_tgt, c_start, c_prefix, n_c, nll, count);
    int ok = check(rc == EZ_OK, "continuations: one or two after each of four prefixes", "%s", ez_last_error());
    double worst = 0.0;
    for (int c = 0; c < n_c && ok; c++) {
        int32_t toks[256], range[2] = {0, 0};
        uint8_t tg[256] = {0};
        const int32_t n = c_start[c + 1] - c_start[c];
        memcpy(toks, pre + pre_start[c_prefix[c]], P * sizeof *toks);
        memcpy(toks + P, c_tok + c_start[c], (size_t)n * sizeof *toks);
        memcpy(tg + P, c_tgt + c_start[c], (size_t)n);
        range[1] = P + n;
        double ref;
        int32_t ref_count;
        ok &= ez_loss(m, toks, tg, range, 1, NULL, &ref, &ref_count) == EZ_OK && ref_count == count[c];
        worst = fmax(worst, fabs(ref - nll[c]));
    }
    /* Batch layouts differ (prefixes together, continuations on top of the cache), so float
     * matmuls may tile differently, as in test_batching. */
    check(ok && worst <= (exact ? 1e-9 : 1e-4), "continuations: equal to ez_loss of prefix + continuation",
          "max difference %.3g", worst);
    c_prefix[0] = N_SEQ;
    expect_error(ez_continuation_loss(m, pre, pre_start, N_SEQ, c_tok, c_tgt, c_start, c_prefix, n_c, nll, count),
                 EZ_ERR_INVALID, "out of range", "continuations: a prefix index out of range");
done:
    free(c_tok);
    free(c_tgt);
}

static void test_sparse_errors(ez_model *m, const weight *q, const loss_set *ls, double base) {
    int64_t idx[4] = {0, 1, 2, 3}, slot = -7;
    float v[4] = {1, 1, 1, 1};
    const int64_t total = q->n_in * q->n_out * q->n_expert;
    expect_error(ez_sparse_add(m, NULL, q->n_in, q->n_out, 1, idx, v, 4, &slot), EZ_ERR_INVALID, "bad weight name",
                 "sparse_add: NULL name");
    char long_name[200];
    memset(long_name, 'x', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = 0;
    expect_error(ez_sparse_add(m, long_name, q->n_in, q->n_out, 1, idx, v, 4, &slot), EZ_ERR_INVALID,
                 "bad weight name", "sparse_add: a name longer than GGML_MAX_NAME");
    expect_error(ez_sparse_add(m, q->name, 0, q->n_out, 1, idx, v, 4, &slot), EZ_ERR_INVALID, "bad shape",
                 "sparse_add: n_in = 0");
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 0, idx, v, 4, &slot), EZ_ERR_INVALID, "bad shape",
                 "sparse_add: n_expert = 0");
    expect_error(ez_sparse_add(m, q->name, q->n_in, (int64_t)1 << 31, 1, idx, v, 4, &slot), EZ_ERR_INVALID,
                 "32-bit", "sparse_add: more rows than 32-bit indices hold");
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 1, idx, v, -1, &slot), EZ_ERR_INVALID, "no entries",
                 "sparse_add: n < 0");
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 1, NULL, v, 4, &slot), EZ_ERR_INVALID, "no entries",
                 "sparse_add: NULL indices");
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 1, idx, NULL, 4, &slot), EZ_ERR_INVALID, "no entries",
                 "sparse_add: NULL values");
    idx[2] = -5;
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 1, idx, v, 4, &slot), EZ_ERR_INVALID,
                 "index -5 (entry 2) is outside", "sparse_add: a negative index");
    idx[2] = 2;
    idx[3] = total;
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 1, idx, v, 4, &slot), EZ_ERR_INVALID, "is outside",
                 "sparse_add: index == n_in*n_out (one past the end)");
    idx[3] = 3;
    idx[1] = 3;
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 1, idx, v, 4, &slot), EZ_ERR_INVALID,
                 "strictly increasing (entry 2)", "sparse_add: unsorted indices");
    idx[1] = 1;
    idx[2] = 1;
    expect_error(ez_sparse_add(m, q->name, q->n_in, q->n_out, 1, idx, v, 4, &slot), EZ_ERR_INVALID,
                 "strictly increasing (entry 2)", "sparse_add: a repeated index");
    check(slot == -7, "sparse_add: *slot untouched by the rejected calls", "slot %lld", (long long)slot);
    expect_error(ez_sparse_remove(m, 0), EZ_ERR_INVALID, "no sparse slot 0", "sparse_remove: slot 0 never existed");
    expect_error(ez_sparse_remove(m, 123456), EZ_ERR_INVALID, "no sparse slot", "sparse_remove: an unknown slot");
    check(bits_equal(loss_of(m, ls), base), "sparse_add: rejected calls attach nothing (loss == base)", "");
}

/* A slot made for the wrong shape is only caught when its weight is reached. */
static void test_wrong_shape(ez_model *m, const weight *w, const loss_set *ls, double base, const char *what) {
    int64_t idx[2] = {0, 5};
    float v[2] = {0.5f, -0.5f};
    int64_t slot = -1;
    char name[256];
    int rc = ez_sparse_add(m, w->name, w->n_in + 1, w->n_out, w->n_expert, idx, v, 2, &slot);
    snprintf(name, sizeof name, "wrong shape (%s): accepted by ez_sparse_add", what);
    check(rc == EZ_OK, name, "%s", ez_last_error());
    double nll[N_SEQ];
    int32_t count[N_SEQ];
    rc = ez_loss(m, ls->tokens, ls->target, ls->seq_start, N_SEQ, NULL, nll, count);
    snprintf(name, sizeof name, "wrong shape (%s): ez_loss fails naming the weight", what);
    expect_error(rc, EZ_ERR_INVALID, w->name, name);
    snprintf(name, sizeof name, "wrong shape (%s): the message gives both shapes", what);
    check(strstr(ez_last_error(), "sparse deltas were made for") != NULL, name, "%s", ez_last_error());
    const int32_t prompt[2] = {ls->tokens[0], ls->tokens[1]};
    snprintf(name, sizeof name, "wrong shape (%s): ez_generate_begin fails too", what);
    expect_error(ez_generate_begin(m, prompt, 2, 0.0f, 1.0f, 0), EZ_ERR_INVALID, "sparse deltas were made for", name);
    int32_t tok = 0;
    rc = ez_generate_next(m, &tok);
    snprintf(name, sizeof name, "wrong shape (%s): no generation after the failure", what);
    check(rc == EZ_OK && tok == -1, name, "rc %d token %d", rc, tok);
    snprintf(name, sizeof name, "wrong shape (%s): removing the slot restores the base loss", what);
    check(ez_sparse_remove(m, slot) == EZ_OK && bits_equal(loss_of(m, ls), base), name, "%s", ez_last_error());
}

/* Perturbation groups: two value sets of one buffer evaluated in the same decodes (eight
 * sequences over three decodes here) give the losses of evaluating them one by one. */
static void test_groups(ez_model *m, weight *ws, int n_w, const loss_set *ls, int exact) {
    delta d[8];
    memset(d, 0, sizeof d);
    int64_t total = 0;
    int ok = 1;
    for (int i = 0; i < n_w && ok; i++) {
        ok = strcmp(ws[i].name, "token_embd.weight") == 0 ? rows_delta(&ws[i], ls, 8, 0.5f, &d[i])
                                                          : spread_delta(&ws[i], 512, 2.0f, 91u + (uint32_t)i, &d[i]);
        total += d[i].n;
    }
    const int32_t n_tok = ls->seq_start[N_SEQ];
    float *base = malloc((size_t)total * sizeof *base), *sets[2] = {malloc((size_t)total * sizeof(float)),
                                                                     malloc((size_t)total * sizeof(float))};
    int32_t *tok2 = malloc((size_t)2 * n_tok * sizeof *tok2), start2[2 * N_SEQ + 1], group[2 * N_SEQ];
    uint8_t *tgt2 = malloc((size_t)2 * n_tok);
    double one[2][N_SEQ], both[2 * N_SEQ];
    int32_t one_count[2][N_SEQ], both_count[2 * N_SEQ];
    if (!check(ok && base && sets[0] && sets[1] && tok2 && tgt2, "groups: allocation", "")) goto done;
    int64_t off = 0;
    for (int i = 0; i < n_w; i++) { /* every slot reads its values from one buffer, as tune's deltas do */
        memcpy(base + off, d[i].values, (size_t)d[i].n * sizeof *base);
        float *own = d[i].values;
        d[i].values = base + off;
        ok &= add(m, &ws[i], &d[i]);
        d[i].values = own;
        off += d[i].n;
    }
    for (int64_t k = 0; k < total; k++) {
        sets[0][k] = base[k];
        sets[1][k] = -0.5f * base[k];
    }
    for (int g = 0; g < 2; g++) { /* one by one: each set written into the buffer */
        memcpy(base, sets[g], (size_t)total * sizeof *base);
        ok &= ez_loss(m, ls->tokens, ls->target, ls->seq_start, N_SEQ, NULL, one[g], one_count[g]) == EZ_OK;
    }
    for (int g = 0; g < 2; g++) {
        memcpy(tok2 + g * n_tok, ls->tokens, (size_t)n_tok * sizeof *tok2);
        memcpy(tgt2 + g * n_tok, ls->target, (size_t)n_tok);
        for (int s = 0; s < N_SEQ; s++) {
            start2[g * N_SEQ + s] = g * n_tok + ls->seq_start[s];
            group[g * N_SEQ + s] = g;
        }
    }
    start2[2 * N_SEQ] = 2 * n_tok;
    expect_error(ez_loss(m, tok2, tgt2, start2, 2 * N_SEQ, group, both, both_count), EZ_ERR_INVALID, "no value sets",
                 "groups: sequence groups without value sets are refused");
    /* One set first: the plan is then one group wide, and must be sized again for two. */
    const float *second[1] = {sets[1]};
    const int32_t zeros[N_SEQ] = {0};
    double alone[N_SEQ];
    int32_t alone_count[N_SEQ];
    int rc = ez_groups_set(m, base, total, second, 1);
    if (rc == EZ_OK) rc = ez_loss(m, ls->tokens, ls->target, ls->seq_start, N_SEQ, zeros, alone, alone_count);
    ez_groups_clear(m);
    check(rc == EZ_OK && memcmp(alone_count, one_count[1], sizeof alone_count) == 0 &&
          fabs(alone[0] - one[1][0]) <= (exact ? 0.0 : 1e-5 * fabs(one[1][0])),
          "groups: one value set alone gives its one-by-one losses", "%s", ez_last_error());
    const int64_t decodes = ez_decode_count(m);
    rc = ez_groups_set(m, base, total, (const float *const *)sets, 2);
    if (check(rc == EZ_OK, "groups: set two value sets", "%s", ez_last_error())) {
        rc = ez_loss(m, tok2, tgt2, start2, 2 * N_SEQ, group, both, both_count);
        ok &= check(rc == EZ_OK, "groups: eight sequences in two groups", "%s", ez_last_error());
        check(ez_decode_count(m) - decodes == 3, "groups: packed into ceil(8 / n_seq_max) decodes", "%lld",
              (long long)(ez_decode_count(m) - decodes));
        group[1] = 1;
        expect_error(ez_loss(m, tok2, tgt2, start2, 2 * N_SEQ, group, both, both_count), EZ_ERR_INVALID, "in order",
                     "groups: groups out of order are refused");
        group[1] = 0;
        group[7] = 2;
        expect_error(ez_loss(m, tok2, tgt2, start2, 2 * N_SEQ, group, both, both_count), EZ_ERR_INVALID,
                     "not one of the 2 value sets", "groups: an unknown group is refused");
        group[7] = 1;
        ez_groups_clear(m);
    }
    double worst = 0.0;
    int moved_apart = 0;
    for (int g = 0; g < 2; g++)
        for (int s = 0; s < N_SEQ; s++) {
            const double a = one[g][s], b = both[g * N_SEQ + s];
            worst = fmax(worst, fabs(a - b) / fmax(1e-12, fabs(a)));
            ok &= one_count[g][s] == both_count[g * N_SEQ + s];
            moved_apart |= moved(one[0][s], one[1][s]);
        }
    check(ok && moved_apart, "groups: the two value sets give different losses", "");
    check(ok && worst <= (exact ? 0.0 : 1e-5), "groups: grouped losses equal the one-by-one losses",
          "largest relative difference %.3g", worst);
done:
    for (int i = 0; i < n_w; i++) {
        if (d[i].slot >= 0) ez_sparse_remove(m, d[i].slot);
        delta_free(&d[i]);
    }
    free(base);
    free(sets[0]);
    free(sets[1]);
    free(tok2);
    free(tgt2);
}

static void test_sparse(ez_model *m, weight *ws, int n_w, const loss_set *ls, double base, const char *model_path,
                        const ez_model_params *p) {
    delta d[8];
    memset(d, 0, sizeof d);
    double l_each[8];
    char name[256];
    int ok_all = 1;

    /* One weight at a time: each moves the loss; removing it restores the base exactly. */
    for (int i = 0; i < n_w; i++) {
        const int is_embd = strcmp(ws[i].name, "token_embd.weight") == 0;
        /* 2048 entries on the last one: enough tokens x entries for the OpenMP kernel path. */
        const int built = is_embd ? rows_delta(&ws[i], ls, 8, 0.5f, &d[i])
                                  : spread_delta(&ws[i], i == 2 ? 2048 : 1024, 2.0f, 17u + (uint32_t)i, &d[i]);
        if (!built || !add(m, &ws[i], &d[i])) {
            snprintf(name, sizeof name, "sparse: attach %.63s", ws[i].name);
            check(0, name, "could not build or attach");
            ok_all = 0;
            continue;
        }
        l_each[i] = loss_of(m, ls);
        snprintf(name, sizeof name, "sparse: %lld entries on %.63s%s move the loss (by %.3g)", (long long)d[i].n,
                 ws[i].name, is_embd ? " (GET_ROWS rows of the input tokens)" : "", l_each[i] - base);
        check(moved(l_each[i], base), name, "base %.17g, with deltas %.17g", base, l_each[i]);
        snprintf(name, sizeof name, "sparse: removing the %.63s slot restores the base exactly", ws[i].name);
        check(ez_sparse_remove(m, d[i].slot) == EZ_OK && bits_equal(loss_of(m, ls), base), name, "%s",
              ez_last_error());
        d[i].slot = -1;
    }
    if (!ok_all) goto done;

    /* All at once, then values changed in place (borrowed, not copied). */
    for (int i = 0; i < n_w; i++) add(m, &ws[i], &d[i]);
    const double l_all = loss_of(m, ls);
    check(moved(l_all, base), "sparse: all slots together move the loss", "base %.17g, all %.17g", base, l_all);
    check(bits_equal(loss_of(m, ls), l_all), "sparse: a repeated evaluation with deltas is bit-identical", "");
    check(ez_host_count(m) > 0 && ez_cuda_count(m) == 0 && ez_fallback_count(m) == 0,
          "sparse: nodes patched by the host kernels, none by CUDA or host copies", "host %lld, cuda %lld, copies %lld",
          (long long)ez_host_count(m), (long long)ez_cuda_count(m), (long long)ez_fallback_count(m));

    for (int i = 0; i < n_w; i++)
        for (int64_t k = 0; k < d[i].n; k++) d[i].values[k] = -d[i].values[k];
    const double l_neg = loss_of(m, ls);
    check(moved(l_neg, l_all) && moved(l_neg, base), "sparse: negating the values in place changes the loss",
          "all %.17g, negated %.17g", l_all, l_neg);
    for (int i = 0; i < n_w; i++)
        for (int64_t k = 0; k < d[i].n; k++) d[i].values[k] = -d[i].values[k];
    check(bits_equal(loss_of(m, ls), l_all), "sparse: restoring the values restores the loss exactly", "");

    float *saved[8] = {0};
    int saved_ok = 1;
    for (int i = 0; i < n_w; i++) {
        saved[i] = malloc((size_t)d[i].n * sizeof(float));
        saved_ok &= saved[i] != NULL;
        if (saved[i]) {
            memcpy(saved[i], d[i].values, (size_t)d[i].n * sizeof(float));
            memset(d[i].values, 0, (size_t)d[i].n * sizeof(float));
        }
    }
    check(saved_ok && bits_equal(loss_of(m, ls), base), "sparse: all values zeroed in place gives the base loss exactly",
          "");
    for (int i = 0; i < n_w; i++) {
        if (saved[i]) memcpy(d[i].values, saved[i], (size_t)d[i].n * sizeof(float));
        free(saved[i]);
    }
    check(bits_equal(loss_of(m, ls), l_all), "sparse: values written back restore the loss exactly", "");

    /* Two slots on one weight add up: same entries twice ~ doubled values once. Not bit
     * for bit ((y + vx) + vx vs y + 2vx round differently) and, on a real Q4 model, any
     * rounding difference early in the network can flip 8-bit activation roundings and
     * move the loss in jumps (SmolLM2, blk.0.attn_q: 16 entries of 1e-3, then 2e-3, moved
     * 21 tokens' NLL by 0.02, then 0.31). So compare on the last block's ffn_down, whose
     * large effect dwarfs that (docs/native.md). */
    {
        const int j = 2;
        for (int i = 0; i < n_w; i++) ez_sparse_remove(m, d[i].slot);
        add(m, &ws[j], &d[j]);
        delta twin = d[j];
        add(m, &ws[j], &twin);
        const double l_twice = loss_of(m, ls);
        ez_sparse_remove(m, twin.slot);
        ez_sparse_remove(m, d[j].slot);
        for (int64_t k = 0; k < d[j].n; k++) d[j].values[k] *= 2.0f;
        add(m, &ws[j], &d[j]);
        const double l_double = loss_of(m, ls);
        ez_sparse_remove(m, d[j].slot);
        for (int64_t k = 0; k < d[j].n; k++) d[j].values[k] *= 0.5f;
        snprintf(name, sizeof name, "sparse: two slots on %.63s add up (vs doubled values, 1%% of the effect)", ws[j].name);
        check(moved(l_double, base) && fabs(l_twice - l_double) < 1e-2 * fabs(l_double - base), name,
              "twice %.17g, doubled %.17g, base %.17g", l_twice, l_double, base);
        int64_t empty_slot = -1;
        int rc = ez_sparse_add(m, ws[j].name, ws[j].n_in, ws[j].n_out, ws[j].n_expert, NULL, NULL, 0, &empty_slot);
        check(rc == EZ_OK && bits_equal(loss_of(m, ls), base), "sparse: a slot with no entries leaves the base loss",
              "%s", ez_last_error());
        ez_sparse_remove(m, empty_slot);
        for (int i = 0; i < n_w; i++) add(m, &ws[i], &d[i]);
    }

    /* Another model on the same file does not see this model's slots. */
    {
        ez_model *m2 = NULL;
        int rc = ez_model_open(model_path, p, &m2);
        check(rc == EZ_OK && bits_equal(loss_of(m2, ls), base), "sparse: a second open model is unaffected",
              "%s", ez_last_error());
        ez_model_close(m2);
        check(bits_equal(loss_of(m, ls), l_all), "sparse: the first model still sees its slots", "");
    }

    /* Removing slots one by one: the loss returns exactly to the base at the end. */
    for (int i = 0; i < n_w; i++) {
        const int rc = ez_sparse_remove(m, d[i].slot);
        const double l = loss_of(m, ls);
        snprintf(name, sizeof name, "sparse: remove slot %lld (%.63s), %d left", (long long)d[i].slot, ws[i].name,
                 n_w - 1 - i);
        if (i + 1 < n_w) check(rc == EZ_OK && isfinite(l) && !bits_equal(l, base), name, "loss %.17g", l);
        else check(rc == EZ_OK && bits_equal(l, base), name, "loss %.17g, base %.17g", l, base);
    }
    expect_error(ez_sparse_remove(m, d[0].slot), EZ_ERR_INVALID, "no sparse slot", "sparse_remove: a slot removed twice");
    for (int i = 0; i < n_w; i++) add(m, &ws[i], &d[i]);
    ez_sparse_clear(m);
    check(bits_equal(loss_of(m, ls), base), "sparse_clear: the base loss returns exactly", "");
done:
    ez_sparse_clear(m);
    for (int i = 0; i < n_w; i++) delta_free(&d[i]);
}

/* Generate until -1 or `max`; returns how many tokens came. */
static int generate(ez_model *m, const int32_t *prompt, int32_t n, float temp, uint32_t seed, int32_t *out, int max,
                    int *rc_out) {
    int got = 0;
    *rc_out = ez_generate_begin(m, prompt, n, temp, 0.9f, seed);
    while (*rc_out == EZ_OK && got < max) {
        int32_t tok = -1;
        *rc_out = ez_generate_next(m, &tok);
        if (*rc_out != EZ_OK || tok < 0) break;
        out[got++] = tok;
    }
    return got;
}

static void test_generate(ez_model *m, const weight *ws, const loss_set *ls, double base) {
    const int32_t *prompt = ls->tokens;
    const int32_t n = ls->seq_start[1] / 2;
    int32_t a[16], b[16];
    int rc = EZ_OK, in_range = 1;

    int32_t tok = 7;
    rc = ez_generate_next(m, &tok);
    check(rc == EZ_OK && tok == -1, "generate: next without begin gives -1", "rc %d token %d", rc, tok);
    expect_error(ez_generate_begin(m, prompt, 0, 0.0f, 1.0f, 0), EZ_ERR_INVALID, "the prompt is empty",
                 "generate: an empty prompt");
    const int32_t bad[3] = {prompt[0], -3, prompt[1]};
    expect_error(ez_generate_begin(m, bad, 3, 0.0f, 1.0f, 0), EZ_ERR_INVALID, "prompt token -3 out of range",
                 "generate: a bad token id");
    const int32_t n_ctx = ez_n_ctx_seq(m);
    int32_t *full = malloc((size_t)n_ctx * sizeof *full);
    if (full) {
        for (int32_t i = 0; i < n_ctx; i++) full[i] = prompt[i % n];
        expect_error(ez_generate_begin(m, full, n_ctx, 0.0f, 1.0f, 0), EZ_ERR_INVALID, "the context holds",
                     "generate: a prompt that fills the context");
        /* Two free positions: two tokens decoded, a third sampled, then -1. */
        int32_t out[8];
        const int got = generate(m, full, n_ctx - 2, 0.0f, 0, out, 8, &rc);
        check(rc == EZ_OK && got >= 1 && got <= 3, "generate: stops at the end of the context", "rc %d, %d tokens: %s",
              rc, got, ez_last_error());
    }
    free(full);

    const int na = generate(m, prompt, n, 0.0f, 0, a, 8, &rc);
    for (int i = 0; i < na; i++) in_range &= a[i] >= 0 && a[i] < ez_n_vocab(m);
    check(rc == EZ_OK && na >= 1 && in_range, "generate: greedy, up to 8 tokens in range", "rc %d, %d tokens: %s", rc,
          na, ez_last_error());
    const int nb = generate(m, prompt, n, 0.0f, 0, b, 8, &rc);
    check(rc == EZ_OK && na == nb && memcmp(a, b, (size_t)na * sizeof *a) == 0, "generate: greedy is deterministic",
          "%d vs %d tokens", na, nb);
    const int sa = generate(m, prompt, n, 0.8f, 42, a, 8, &rc);
    const int sb = generate(m, prompt, n, 0.8f, 42, b, 8, &rc);
    check(rc == EZ_OK && sa == sb && memcmp(a, b, (size_t)sa * sizeof *a) == 0,
          "generate: sampling with a fixed seed is deterministic", "%d vs %d tokens", sa, sb);

    /* With a delta on the embeddings (GET_ROWS and, if tied, the output matmul). */
    delta d = {0};
    if (rows_delta(&ws[0], ls, 8, 0.5f, &d) && add(m, &ws[0], &d)) {
        const int nd = generate(m, prompt, n, 0.0f, 0, b, 8, &rc);
        check(rc == EZ_OK && nd >= 1, "generate: runs with sparse deltas attached", "rc %d: %s", rc, ez_last_error());
        ez_sparse_remove(m, d.slot);
    }
    delta_free(&d);
    /* Stop mid-generation, then evaluate: the loss clears the cache first. */
    generate(m, prompt, n, 0.0f, 0, a, 2, &rc);
    check(bits_equal(loss_of(m, ls), base), "generate: loss after a generation is the base loss", "");
    tok = 7;
    rc = ez_generate_next(m, &tok);
    check(rc == EZ_OK && tok == -1, "generate: ez_loss ends a generation", "rc %d token %d", rc, tok);
}

/* ---- activation statistics ---------------------------------------------------- */

#define N_STAT 4 /* blk.0.attn_q, attn_k, attn_v (one input tensor), the last block's ffn_down */

typedef struct stats {
    double *sumsq;
    int64_t count[N_STAT];
    int64_t n;
} stats;

static int run_stats(ez_model *m, const loss_set *ls, int32_t s0, int32_t s1, const uint8_t *outputs,
                     const char *const *names, const int64_t *n_in, stats *st) {
    int32_t start[N_SEQ + 1];
    for (int32_t s = s0; s <= s1; s++) start[s - s0] = ls->seq_start[s] - ls->seq_start[s0];
    const int rc = ez_activation_sumsq(m, ls->tokens + ls->seq_start[s0], outputs ? outputs + ls->seq_start[s0] : NULL,
                                       start, s1 - s0, names, n_in, N_STAT, st->sumsq, st->count);
    if (rc != EZ_OK) printf("     ez_activation_sumsq: %s\n", ez_last_error());
    return rc == EZ_OK;
}

/* Largest |a - b| relative to max(|b|), over n values. */
static double rel_diff(const double *a, const double *b, int64_t n) {
    double d = 0.0, top = 1e-300;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs(a[i] - b[i]));
        top = fmax(top, fabs(b[i]));
    }
    return d / top;
}

/* ez_activation_sumsq: counts as llama.cpp runs the graph, one input read alike by the matmuls
 * that share it, the same sums however the sequences are batched, the first block's input
 * untouched by a delta on its output while the last block's moves; and its refusals. */
static void test_activation_sumsq(ez_model *m, const weight *ws, const loss_set *ls, int n_layer) {
    char last[64];
    snprintf(last, sizeof last, "blk.%d.ffn_down.weight", n_layer - 1);
    const char *names[N_STAT] = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", last};
    const int64_t n_in[N_STAT] = {ws[1].n_in, ws[1].n_in, ws[1].n_in, ws[2].n_in};
    const int64_t n = 3 * ws[1].n_in + ws[2].n_in;
    const int32_t n_tok = ls->seq_start[N_SEQ];
    stats a = {0}, b = {0}, c = {0};
    uint8_t *all = malloc((size_t)n_tok);
    a.sumsq = calloc((size_t)n + 1, sizeof *a.sumsq); /* + 1: the refused call below asks for one column more */
    b.sumsq = calloc((size_t)n + 1, sizeof *b.sumsq);
    c.sumsq = calloc((size_t)n + 1, sizeof *c.sumsq);
    delta d = {0};
    if (!check(all && a.sumsq && b.sumsq && c.sumsq, "stats: allocate", "out of memory")) goto done;
    memset(all, 1, (size_t)n_tok);

    if (!check(run_stats(m, ls, 0, N_SEQ, NULL, names, n_in, &a), "stats: the loss set", "")) goto done;
    const double *q = a.sumsq, *k = a.sumsq + n_in[0], *v = k + n_in[1], *down = v + n_in[2];
    int finite = 1, positive = 0;
    for (int64_t i = 0; i < n; i++) {
        finite &= isfinite(a.sumsq[i]) && a.sumsq[i] >= 0.0;
        positive += a.sumsq[i] > 0.0;
    }
    check(finite && positive > n / 2, "stats: sums of squares are finite, non-negative, mostly positive",
          "%d of %lld positive", positive, (long long)n);
    check(a.count[0] == n_tok && a.count[1] == n_tok && a.count[2] == n_tok,
          "stats: the first block's matmuls see every token", "counts %lld %lld %lld of %d", (long long)a.count[0],
          (long long)a.count[1], (long long)a.count[2], n_tok);
    check(a.count[3] == N_SEQ, "stats: the last block's FFN sees only the tokens with logits (one per sequence)",
          "count %lld", (long long)a.count[3]);
    check(memcmp(q, k, (size_t)n_in[0] * sizeof *q) == 0 && memcmp(q, v, (size_t)n_in[0] * sizeof *q) == 0,
          "stats: attn_q, attn_k and attn_v read the same input", "");

    if (run_stats(m, ls, 0, N_SEQ, NULL, names, n_in, &b))
        check(memcmp(a.sumsq, b.sumsq, (size_t)n * sizeof *a.sumsq) == 0 && b.count[0] == a.count[0],
              "stats: written, not accumulated: a second call gives the same bits", "");
    if (run_stats(m, ls, 0, N_SEQ, all, names, n_in, &b))
        check(b.count[3] == n_tok && rel_diff(b.sumsq, q, n_in[0]) < 1e-12 && rel_diff(b.sumsq + 3 * n_in[0], down,
              n_in[3]) > 1e-6, "stats: logits everywhere: the last FFN sees every token, the first block the same",
              "count %lld", (long long)b.count[3]);
    /* One sequence per call, summed: the same statistic as one call (up to summation order). */
    memset(c.sumsq, 0, (size_t)n * sizeof *c.sumsq);
    int64_t counts = 0;
    int ok = 1;
    for (int32_t s = 0; s < N_SEQ && ok; s++) {
        ok = run_stats(m, ls, s, s + 1, NULL, names, n_in, &b);
        for (int64_t i = 0; i < n && ok; i++) c.sumsq[i] += b.sumsq[i];
        counts += b.count[0];
    }
    if (ok)
        check(counts == n_tok && rel_diff(c.sumsq, a.sumsq, n) < 1e-6,
              "stats: the same sums however sequences are batched", "relative difference %g",
              rel_diff(c.sumsq, a.sumsq, n));

    /* A delta on blk.0.attn_q changes what every later block reads, not what attn_q itself reads. */
    if (spread_delta(&ws[1], 64, 0.5f, 7, &d) && add(m, &ws[1], &d)) {
        if (run_stats(m, ls, 0, N_SEQ, NULL, names, n_in, &b))
            check(memcmp(b.sumsq, q, (size_t)n_in[0] * sizeof *q) == 0 && rel_diff(b.sumsq + 3 * n_in[0], down,
                  n_in[3]) > 1e-6, "stats: attached deltas apply (later inputs move, the first block's stay)", "");
        ez_sparse_remove(m, d.slot);
    }

    const char *twice[N_STAT] = {names[0], names[1], names[0], names[3]};
    expect_error(ez_activation_sumsq(m, ls->tokens, NULL, ls->seq_start, N_SEQ, twice, n_in, N_STAT, b.sumsq, b.count),
                 EZ_ERR_INVALID, "listed twice", "stats: refuses a weight listed twice");
    const int64_t wrong[N_STAT] = {n_in[0] + 1, n_in[1], n_in[2], n_in[3]};
    expect_error(ez_activation_sumsq(m, ls->tokens, NULL, ls->seq_start, N_SEQ, names, wrong, N_STAT, c.sumsq, b.count),
                 EZ_ERR_INVALID, "columns", "stats: refuses a column count that is not the weight's");
    expect_error(ez_activation_sumsq(m, ls->tokens, NULL, ls->seq_start, N_SEQ, names, n_in, 0, b.sumsq, b.count),
                 EZ_ERR_INVALID, "no weights", "stats: refuses an empty weight list");
    check(isfinite(loss_of(m, ls)), "stats: the model still evaluates after a refused call", "%s", ez_last_error());
done:
    delta_free(&d);
    free(all);
    free(a.sumsq);
    free(b.sumsq);
    free(c.sumsq);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [--threads N]\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1];
    int n_threads = 2;
    for (int i = 2; i + 1 < argc; i++)
        if (strcmp(argv[i], "--threads") == 0) n_threads = atoi(argv[++i]);

    struct gguf_init_params gp = {.no_alloc = true, .ctx = NULL};
    struct gguf_context *g = gguf_init_from_file(model_path, gp);
    if (!g) {
        fprintf(stderr, "%s: not a readable GGUF file\n", model_path);
        return 2;
    }
    /* token_embd (GET_ROWS; also the output matmul when tied), the first block's
     * attn_q, the last block's ffn_down, and output.weight when untied. */
    weight ws[4];
    int n_w = 0, n_layer = 0;
    char nm[64];
    for (;; n_layer++) {
        snprintf(nm, sizeof nm, "blk.%d.attn_q.weight", n_layer);
        if (gguf_find_tensor(g, nm) < 0) break;
    }
    n_w += find_weight(g, "token_embd.weight", &ws[n_w]);
    n_w += find_weight(g, "blk.0.attn_q.weight", &ws[n_w]);
    snprintf(nm, sizeof nm, "blk.%d.ffn_down.weight", n_layer - 1);
    n_w += find_weight(g, nm, &ws[n_w]);
    const int tied = !find_weight(g, "output.weight", &ws[n_w]);
    n_w += !tied;
    if (n_w < 3) {
        fprintf(stderr, "%s: expected a llama-family model (token_embd, blk.N.attn_q, blk.N.ffn_down)\n", model_path);
        gguf_free(g);
        return 2;
    }
    const int exact = ws[1].quantized;
    printf("model %s: %d layers, n_embd %lld, %s embeddings, %s matmuls, %d threads; core built %s CUDA kernels\n",
           model_path, n_layer, (long long)ws[0].n_in, tied ? "tied" : "untied", exact ? "quantized" : "float",
           n_threads, ez_has_cuda() ? "with" : "without");

    ez_model_params p;
    ez_default_params(&p);
    p.n_ctx_seq = 128;
    p.n_seq_max = 3; /* 4 sequences: two decodes */
    p.n_batch = 256;
    p.n_ubatch = 256;
    p.n_threads = n_threads;

    test_open_errors(model_path, &p);
    ez_model *m = NULL;
    int rc = ez_model_open(model_path, &p, &m);
    if (!check(rc == EZ_OK && m != NULL, "open: the model", "%s", ez_last_error())) {
        gguf_free(g);
        printf("%d passed, %d failed\n", n_pass, n_fail);
        return 1;
    }
    check(ez_n_seq_max(m) == 3 && ez_n_batch(m) == 256 && ez_n_ctx_seq(m) >= 128, "open: context sizes as asked",
          "n_seq_max %d, n_batch %d, n_ctx_seq %d", ez_n_seq_max(m), ez_n_batch(m), ez_n_ctx_seq(m));

    test_text(m, g);
    loss_set ls = {0};
    if (check(make_loss_set(m, &ls), "tokenize: the loss set", "%s", ez_last_error())) {
        double base = NAN;
        test_batching(m, &ls, exact, &base);
        test_loss_errors(m, &ls, base);
        test_next_logprobs(m, &ls, exact);
        test_continuations(m, &ls, exact);
        test_sparse_errors(m, &ws[1], &ls, base);
        test_wrong_shape(m, &ws[1], &ls, base, "MUL_MAT");
        test_wrong_shape(m, &ws[0], &ls, base, "GET_ROWS");
        test_sparse(m, ws, n_w, &ls, base, model_path, &p);
        test_groups(m, ws, n_w, &ls, exact);
        test_generate(m, ws, &ls, base);
        test_activation_sumsq(m, ws, &ls, n_layer);
        test_quantize(model_path, &p, &ls, base);
    }
    free(ls.tokens);
    free(ls.target);
    ez_model_close(m);
    gguf_free(g);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
