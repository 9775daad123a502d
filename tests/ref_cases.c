// Reading the reference cases: json metadata via cJSON, logits as raw little-endian float32.
#include "ref_cases.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "core/clock.h"
#include "core/err.h"
#include "proto/msg_io.h"
#include "transport/comm.h"
#include "worker/model/model.h"

// --- helpers

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static bool find_model(const char *dir, const char *file, char *out, size_t cap, int depth) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    FILE *f = fopen(p, "rb");
    if (f) {
        fclose(f);
        snprintf(out, cap, "%s", p);
        return true;
    }
    if (depth == 0) return false;
    DIR *d = opendir(dir);
    if (!d) return false;
    struct dirent *e;
    bool found = false;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        DIR *sub = opendir(p);
        if (!sub) continue;
        closedir(sub);
        found = find_model(p, file, out, cap, depth - 1);
    }
    closedir(d);
    return found;
}

static int *int_array(const cJSON *a, int *n) {
    *n = cJSON_GetArraySize(a);
    int32_t *v = malloc(((size_t)*n + 1) * sizeof *v);
    if (!v) return NULL;
    for (int i = 0; i < *n; i++) v[i] = (int32_t)cJSON_GetArrayItem(a, i)->valuedouble;
    return v;
}

// --- public API

int ref_list(char ***names_out) {
    char dir[1024];
    test_shared_path(dir, sizeof dir, "reference");
    DIR *d = opendir(dir);
    if (!d) return -1;
    char **names = NULL;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 6 || strcmp(e->d_name + l - 5, ".json") != 0) continue;
        char **nn = realloc(names, (size_t)(n + 1) * sizeof *nn);
        if (!nn) break;
        names = nn;
        names[n] = strndup(e->d_name, l - 5);
        n++;
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    *names_out = names;
    return n;
}

void ref_names_free(char **names, int n) {
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
}

int ref_load(const char *name, ref_case_t *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    char path[1024], rel[512];
    snprintf(rel, sizeof rel, "reference/%s.json", name);
    size_t len = 0;
    char *js = test_read_file(test_shared_path(path, sizeof path, rel), &len);
    if (!js) {
        fprintf(stderr, "ref: cannot read %s\n", path);
        return -1;
    }
    cJSON *root = cJSON_Parse(js);
    free(js);
    if (!root) {
        fprintf(stderr, "ref: bad json in %s\n", path);
        return -1;
    }
    const cJSON *model = cJSON_GetObjectItem(root, "model");
    const cJSON *prompt = cJSON_GetObjectItem(root, "prompt");
    const cJSON *pt = cJSON_GetObjectItem(root, "prompt_tokens");
    const cJSON *gt = cJSON_GetObjectItem(root, "greedy_tokens");
    const cJSON *nv = cJSON_GetObjectItem(root, "n_vocab");
    const cJSON *hex = cJSON_GetObjectItem(root, "greedy_text_hex");
    int rc = -1;
    char models[1024];
    if (!cJSON_IsString(model) || !cJSON_IsString(prompt) || !cJSON_IsArray(pt) || !cJSON_IsArray(gt) ||
        !cJSON_IsNumber(nv) || !cJSON_IsString(hex)) {
        fprintf(stderr, "ref: %s lacks a field\n", path);
        goto out;
    }
    if (!find_model(test_shared_path(models, sizeof models, "models"), model->valuestring, c->model_path,
                    sizeof c->model_path, 2)) {
        fprintf(stderr, "ref: model %s not found under %s\n", model->valuestring, models);
        goto out;
    }
    c->prompt = strdup(prompt->valuestring);
    c->prompt_tokens = int_array(pt, &c->n_prompt);
    c->greedy = int_array(gt, &c->n_greedy);
    c->n_vocab = nv->valueint;
    size_t hl = strlen(hex->valuestring);
    c->text = malloc(hl / 2 + 1);
    for (size_t i = 0; i + 1 < hl; i += 2) {
        unsigned v;
        sscanf(hex->valuestring + i, "%2x", &v);
        c->text[i / 2] = (unsigned char)v;
    }
    c->text_len = hl / 2;
    snprintf(rel, sizeof rel, "reference/%s.logits.f32", name);
    c->logits = test_read_file(test_shared_path(path, sizeof path, rel), &len);
    if (!c->logits || len != (size_t)(c->n_prompt + c->n_greedy) * (size_t)c->n_vocab * 4) {
        fprintf(stderr, "ref: %s has %zu bytes, expected %d rows of %d floats\n", path, len,
                c->n_prompt + c->n_greedy, c->n_vocab);
        goto out;
    }
    rc = 0;
out:
    cJSON_Delete(root);
    if (rc != 0) ref_free(c);
    return rc;
}

void ref_free(ref_case_t *c) {
    free(c->prompt);
    free(c->prompt_tokens);
    free(c->greedy);
    free(c->logits);
    free(c->text);
    memset(c, 0, sizeof *c);
}

double ref_tolerance(const char *type_name) {
    if (!strcmp(type_name, "F32") || !strcmp(type_name, "F16") || !strcmp(type_name, "BF16")) return 0.001;
    return 0.01;
}

void ref_row_diff(const float *a, const float *b, int n, double *maxdiff, double *range) {
    double md = 0, lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= md)) md = d; // NaN propagates as a failure
        if (b[i] < lo) lo = b[i];
        if (b[i] > hi) hi = b[i];
    }
    *maxdiff = md;
    *range = hi - lo;
}

double ref_row_gap(const float *row, int n) {
    double a = -INFINITY, b = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (row[i] > a) {
            b = a;
            a = row[i];
        } else if (row[i] > b) {
            b = row[i];
        }
    }
    return a - b;
}

float *test_logits12(struct model *m, int n_ctx, int n_batch) {
    const model_hparams_t *hp = model_hparams(m);
    int32_t toks[12];
    for (int i = 0; i < 12; i++) toks[i] = (i * 37 + 11) % hp->n_vocab;
    model_ctx_t *c = NULL;
    char err[256];
    model_ctx_opts_t co = {.n_ctx = n_ctx, .n_batch = n_batch, .n_threads = 2};
    float *lg = malloc((size_t)12 * hp->n_vocab * sizeof(float)); // (12, n_vocab)
    int rc = lg ? model_ctx_new(&c, m, &co, err, sizeof err) : MLM_ENOMEM;
    if (rc == 0) rc = model_eval(c, toks, 10, lg, true);
    if (rc == 0) rc = model_eval(c, toks + 10, 1, lg + (size_t)10 * hp->n_vocab, true);
    if (rc == 0) rc = model_eval(c, toks + 11, 1, lg + (size_t)11 * hp->n_vocab, true);
    model_ctx_destroy(&c);
    if (rc != 0) {
        fprintf(stderr, "\n  eval: %s\n", mlm_strerror(rc));
        free(lg);
        return NULL;
    }
    return lg;
}

void *test_old_worker_main(void *arg) {
    const test_old_worker_t *ow = arg;
    comm_t *ctl = ow->ctl;
    char err[256];
    const double t_end = mlm_now_ms() + 20000;
    while (mlm_now_ms() < t_end) {
        msg_t m, r;
        comm_msg_t raw;
        if (msg_recv(ctl, 0, &m, &raw, NULL, 200, err, sizeof err) != 0) continue;
        const msg_type_t type = m.type;
        const uint64_t seq = type == MSG_HEARTBEAT ? m.heartbeat.seq : type == MSG_SLICE_DATA ? m.slice_data.plan_id : 0;
        msg_clear(&m);
        comm_msg_free(&raw);
        if (type == MSG_SHUTDOWN) break;
        if (type == MSG_HELLO) {
            msg_init(&r, MSG_HELLO);
            snprintf(r.hello.node_id, sizeof r.hello.node_id, "old-1");
            r.hello.role = MSG_ROLE_WORKER;
            r.hello.n_cores = 1;
            r.hello.proto_minor = (uint32_t)ow->minor;
        } else if (type == MSG_HEARTBEAT || type == MSG_SLICE_DATA) {
            msg_init(&r, MSG_HEARTBEAT);
            snprintf(r.heartbeat.node_id, sizeof r.heartbeat.node_id, "old-1");
            r.heartbeat.seq = seq;
        } else {
            continue;
        }
        msg_send(ctl, 0, &r, 2000, err, sizeof err);
    }
    return NULL;
}
