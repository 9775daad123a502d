// Llama-family hyperparameters from GGUF metadata: shapes, RoPE and norm constants, totals.
#include "worker/format/hparams.h"

#include <stdio.h>
#include <string.h>

#include "core/err.h"
#include "worker/kernels/quant.h"

// --- helpers

static int kv_int(const gguf_t *g, const char *arch, const char *suffix, int64_t *out, bool required, char *err,
                  size_t errlen) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_i64(g, key, out);
    if (rc == MLM_ENOTFOUND && !required) return 0;
    if (rc != 0) return mlm_fail(err, errlen, MLM_EFORMAT, "%s: metadata key %s missing or not an integer", gguf_path(g), key);
    return 0;
}

static int kv_float(const gguf_t *g, const char *arch, const char *suffix, float *out) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_f32(g, key, out);
    return rc == MLM_ENOTFOUND ? 0 : rc;
}

static void read_arch(const gguf_t *g, char *arch, size_t cap) {
    const char *s;
    size_t len;
    arch[0] = 0;
    if (gguf_get_str(g, "general.architecture", &s, &len) == 0) {
        if (len >= cap) len = cap - 1;
        memcpy(arch, s, len);
        arch[len] = 0;
    }
}

static bool str_is(const gguf_t *g, const char *key, const char *want) {
    const char *s;
    size_t len;
    return gguf_get_str(g, key, &s, &len) == 0 && len == strlen(want) && memcmp(s, want, len) == 0;
}

static int read_shapes(const gguf_t *g, model_hparams_t *hp, char *err, size_t errlen) {
    const char *a = hp->arch;
    int64_t v;
    int rc;
#define GETI(suffix, field, req)                                         \
    v = 0;                                                               \
    if ((rc = kv_int(g, a, suffix, &v, req, err, errlen)) != 0) return rc; \
    hp->field = (int)v;
    GETI("embedding_length", n_embd, true);
    GETI("block_count", n_layer, true);
    GETI("feed_forward_length", n_ff, true);
    GETI("attention.head_count", n_head, true);
    hp->n_head_kv = hp->n_head;
    GETI("attention.head_count_kv", n_head_kv, false);
    if (hp->n_head_kv == 0) hp->n_head_kv = hp->n_head;
    GETI("context_length", n_ctx_train, false);
    GETI("expert_count", n_expert, false);
    GETI("expert_used_count", n_expert_used, false);
    hp->head_dim = hp->n_head > 0 ? hp->n_embd / hp->n_head : 0;
    v = hp->head_dim;
    if ((rc = kv_int(g, a, "attention.key_length", &v, false, err, errlen)) != 0) return rc;
    hp->head_dim = (int)v;
    hp->n_rot = hp->head_dim;
    GETI("rope.dimension_count", n_rot, false);
    if (hp->n_rot == 0) hp->n_rot = hp->head_dim;
#undef GETI
    return 0;
}

static void read_rope_norm(const gguf_t *g, model_hparams_t *hp) {
    const char *a = hp->arch;
    hp->rms_eps = 1e-5f;
    hp->rope_base = 10000.0f;
    hp->rope_freq_scale = 1.0f;
    kv_float(g, a, "attention.layer_norm_rms_epsilon", &hp->rms_eps);
    kv_float(g, a, "rope.freq_base", &hp->rope_base);
    float factor = 0;
    char key[96];
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    bool linear = str_is(g, key, "linear"), none = str_is(g, key, "none");
    if (kv_float(g, a, "rope.scaling.factor", &factor) == 0 && factor > 0 && (linear || !none))
        hp->rope_freq_scale = 1.0f / factor;
}

static int check(const gguf_t *g, const model_hparams_t *hp, char *err, size_t errlen) {
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 || hp->n_ff <= 0 ||
        hp->head_dim <= 0 || hp->n_head % hp->n_head_kv != 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2 != 0 ||
        hp->n_layer > 100000 || hp->n_embd > (1 << 20) || hp->n_ff > (1 << 22) || hp->n_head > 4096)
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: inconsistent hyperparameters (embedding/head/layer counts)",
                        gguf_path(g));
    if (hp->n_expert < 0 || hp->n_expert > 1024 || hp->n_expert_used < 0 || hp->n_expert_used > hp->n_expert ||
        (hp->n_expert > 0 && hp->n_expert_used == 0))
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: inconsistent expert counts", gguf_path(g));
    if (!(hp->rms_eps > 0 && hp->rms_eps < 1) || !(hp->rope_base > 0))
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: bad rms epsilon or rope base", gguf_path(g));
    return 0;
}

// Vocabulary size (a shard file states it; an ordinary file has it as token_embd's rows), tied output.
static int read_vocab(const gguf_t *g, model_hparams_t *hp, char *err, size_t errlen) {
    hp->tied_output = gguf_find_tensor(g, "output.weight") == NULL;
    int64_t nv = 0;
    if (gguf_get_i64(g, "meshlm.shard.n_vocab", &nv) == 0) {
        if (nv <= 0 || nv > (1 << 24))
            return mlm_fail(err, errlen, MLM_EFORMAT, "%s: shard file without a valid meshlm.shard.n_vocab", gguf_path(g));
        hp->n_vocab = (int)nv;
        return 0;
    }
    const gguf_tensor_t *emb = gguf_find_tensor(g, "token_embd.weight");
    if (!emb) return mlm_fail(err, errlen, MLM_EFORMAT, "%s: tensor token_embd.weight is missing", gguf_path(g));
    hp->n_vocab = (int)emb->ne[1];
    return 0;
}

// Totals, and the dominant weight type: the most common type among the matrices (2-D and up).
static void count_params(const gguf_t *g, model_hparams_t *hp) {
    int64_t counts[QT_COUNT] = {0};
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        hp->n_params += gguf_tensor_nelements(t);
        hp->weight_bytes += t->nbytes;
        if ((unsigned)t->type < QT_COUNT && t->n_dims >= 2) counts[t->type]++;
    }
    int best = QT_F32;
    for (int i = 0; i < QT_COUNT; i++)
        if (counts[i] > counts[best]) best = i;
    snprintf(hp->type_name, sizeof hp->type_name, "%s", qtype_name(best));
}

// --- public API

int hparams_read(const gguf_t *g, model_hparams_t *hp, char *err, size_t errlen) {
    memset(hp, 0, sizeof *hp);
    read_arch(g, hp->arch, sizeof hp->arch);
    if (strcmp(hp->arch, "llama") != 0)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED,
                        "%s: architecture '%s' is not supported (only llama and Mixtral-style llama MoE)", gguf_path(g),
                        hp->arch[0] ? hp->arch : "(none)");
    int rc = read_shapes(g, hp, err, errlen);
    if (rc == 0) {
        read_rope_norm(g, hp);
        rc = check(g, hp, err, errlen);
    }
    if (rc == 0) rc = read_vocab(g, hp, err, errlen);
    if (rc == 0) count_params(g, hp);
    return rc;
}
