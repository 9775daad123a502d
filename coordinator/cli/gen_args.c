// Shared options of the generating commands and their JSON result.
#include "coordinator/cli/gen_args.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/fs.h"
#include "offload/attn.h"

// --- helpers

#define PROMPT_FILE_MAX (64u << 20) // bytes of a prompt file (-f)

// --- public API

void gen_args_init(gen_args_t *a) {
    memset(a, 0, sizeof *a);
    a->n_predict = 128;
    a->repack = true;
    a->gen.sp = sampler_params_default();
}

int gen_args_option(gen_args_t *a, int ch, const char *arg, const char *cmd) {
    switch (ch) {
    case 'm': a->model = arg; return 1;
    case 'p':
        gen_args_free(a);
        a->prompt = (char *)arg;
        return 1;
    case 'f': {
        gen_args_free(a);
        char err[512];
        if (mlm_read_file(arg, PROMPT_FILE_MAX, &a->prompt, NULL, err, sizeof err) != 0) {
            fprintf(stderr, "meshlm %s: prompt file %s\n", cmd, err);
            return -1;
        }
        a->prompt_owned = true;
        return 1;
    }
    case 'n': a->n_predict = atoi(arg); return 1;
    case 't': a->n_threads = atoi(arg); return 1;
    case 'c': a->n_ctx = atoi(arg); return 1;
    case 'b': a->n_batch = atoi(arg); return 1;
    case GA_TEMP: a->gen.sp.temp = strtof(arg, NULL); return 1;
    case GA_TOPK: a->gen.sp.top_k = atoi(arg); return 1;
    case GA_TOPP: a->gen.sp.top_p = strtof(arg, NULL); return 1;
    case GA_MINP: a->gen.sp.min_p = strtof(arg, NULL); return 1;
    case GA_RP: a->gen.sp.repeat_penalty = strtof(arg, NULL); return 1;
    case GA_RLN: a->gen.sp.repeat_last_n = atoi(arg); return 1;
    case GA_SEED: a->gen.sp.seed = strtoull(arg, NULL, 10); return 1;
    case GA_GREEDY: a->gen.sp.greedy = true; return 1;
    case GA_IGNEOS: a->gen.ignore_eos = true; return 1;
    case GA_NOBOS: a->no_bos = true; return 1;
    case GA_KV:
        if (!strcmp(arg, "f16") || !strcmp(arg, "f32") || !strcasecmp(arg, "q8_0")) {
            a->kv_f32 = !strcmp(arg, "f32");
            a->kv_q8 = !strcasecmp(arg, "q8_0");
            return 1;
        }
        fprintf(stderr, "meshlm %s: --kv-type must be f16, f32 or q8_0\n", cmd);
        return -1;
    case GA_NOREPACK: a->repack = false; return 1;
    case GA_JSON: a->json = true; return 1;
    case GA_LOGITS: a->logits_path = arg; return 1;
    case GA_KVDEV: a->kv_device = arg; return 1;
    default: return 0;
    }
}

int gen_args_check(const gen_args_t *a, const char *cmd) {
    if (!a->model || !a->prompt) {
        fprintf(stderr, "meshlm %s: -m MODEL and -p PROMPT (or -f FILE) are required\n", cmd);
        return -1;
    }
    if (a->n_predict < 0 || a->n_threads < 0 || a->n_ctx < 0 || a->n_batch < 0) {
        fprintf(stderr, "meshlm %s: counts must not be negative\n", cmd);
        return -1;
    }
    char err[256];
    if (attn_dev_known(a->kv_device, err, sizeof err) != 0) {
        fprintf(stderr, "meshlm %s: --kv-device: %s\n", cmd, err);
        return -1;
    }
    return 0;
}

void gen_args_free(gen_args_t *a) {
    if (a->prompt_owned) free(a->prompt);
    a->prompt = NULL;
    a->prompt_owned = false;
}

void gen_print_json(const int32_t *pt, int np, const gen_result_t *r) { gen_print_json_memory(pt, np, r, NULL); }

void gen_print_json_memory(const int32_t *pt, int np, const gen_result_t *r, cJSON *memory) {
    cJSON *extras = memory ? cJSON_CreateObject() : NULL;
    if (extras) cJSON_AddItemToObject(extras, "memory", memory);
    else cJSON_Delete(memory);
    gen_print_json_extra(pt, np, r, extras);
}

void gen_print_json_extra(const int32_t *pt, int np, const gen_result_t *r, cJSON *extras) {
    cJSON *o = cJSON_CreateObject();
    if (!o) {
        cJSON_Delete(extras);
        return;
    }
    cJSON *p = cJSON_AddArrayToObject(o, "prompt_tokens");
    for (int i = 0; i < np; i++) cJSON_AddItemToArray(p, cJSON_CreateNumber(pt[i]));
    cJSON *t = cJSON_AddArrayToObject(o, "tokens");
    for (int i = 0; i < r->n_tokens; i++) cJSON_AddItemToArray(t, cJSON_CreateNumber(r->tokens[i]));
    cJSON_AddStringToObject(o, "text", r->text);
    cJSON_AddNumberToObject(o, "prompt_ms", r->prompt_ms);
    cJSON_AddNumberToObject(o, "gen_ms", r->gen_ms);
    cJSON_AddNumberToObject(o, "tokens_per_s", r->gen_ms > 0 ? r->n_gen_evals * 1000.0 / r->gen_ms : 0.0);
    while (extras && extras->child) {
        cJSON *item = cJSON_DetachItemViaPointer(extras, extras->child);
        cJSON_AddItemToObject(o, item->string, item); // the name is copied before the old one is freed
    }
    cJSON_Delete(extras);
    char *s = cJSON_PrintUnformatted(o);
    if (s) printf("%s\n", s);
    free(s);
    cJSON_Delete(o);
}
