// meshlm inspect: prints a GGUF file's header, metadata and tensor table as text or JSON.
#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/cli/cli.h"
#include "coordinator/cli/routing_stats.h"
#include "core/err.h"
#include "worker/format/gguf.h"

// --- types

#define INSPECT_MAX_ITEMS 8  // array items shown without --all

typedef struct {
    const char *path;        // FILE argument
    bool all;                // --all: show every array item
    bool json;               // --json: one JSON object on stdout
    int routing;             // --routing N: run N tokens through a MoE file and print its routing statistics
    const char *routing_out; // --routing-out FILE: also write the per-block counts there (what --ep-hot reads)
} inspect_opts_t;

typedef struct {
    int64_t tensors;         // tensors of this type
    int64_t elements;        // their parameter count
    uint64_t bytes;          // their data bytes
} type_total_t;

// --- helpers

static void usage(FILE *f) {
    fprintf(f,
            "usage: meshlm inspect FILE [--all] [--json] [--routing N [--routing-out OUT]]\n\n"
            "Prints a GGUF file's header, every metadata key with its type and value, the tensor table\n"
            "(index, name, type, dims, data offset, bytes) and totals (parameters, bytes by type).\n\n"
            "  --all    show every array item (default: the first %d)\n"
            "  --json   print one JSON object instead of text\n"
            "  --routing N  run N seeded tokens through a MoE model and print only its routing statistics\n"
            "           (expert popularity per block, consecutive tokens and adjacent blocks choosing alike)\n"
            "           and the hit rates an expert cache of 1, 2, ... per block would have on them (LRU,\n"
            "           LFU, and the optimal policy's: the most any cache of that size can hit)\n"
            "  --routing-out OUT  with --routing, also write how often each block's router picked each\n"
            "           expert to OUT (the routing counts that run/bench/plan --ep-hot read)\n"
            "  --help   this text\n\n"
            "Exit code 0 on success, 1 if the file cannot be read or is malformed, 2 on bad usage.\n",
            INSPECT_MAX_ITEMS);
}

// 0 to go on, or the exit code to return now.
static int parse_args(int argc, char **argv, inspect_opts_t *o, bool *done) {
    *done = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            *done = true;
            return 0;
        } else if (!strcmp(a, "--all")) {
            o->all = true;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--routing") && i + 1 < argc) {
            o->routing = atoi(argv[++i]);
            if (o->routing < 2 || o->routing > 100000) {
                fprintf(stderr, "meshlm inspect: --routing wants a token count of 2 or more, not '%s'\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(a, "--routing-out") && i + 1 < argc) {
            o->routing_out = argv[++i];
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "meshlm inspect: unknown option '%s'\n\n", a);
            usage(stderr);
            return 2;
        } else if (o->path) {
            fprintf(stderr, "meshlm inspect: only one FILE may be given ('%s' and '%s')\n\n", o->path, a);
            usage(stderr);
            return 2;
        } else {
            o->path = a;
        }
    }
    if (!o->path) {
        fprintf(stderr, "meshlm inspect: no FILE given\n\n");
        usage(stderr);
        return 2;
    }
    return 0;
}

// A value as text (caller frees), or NULL when out of memory.
static char *value_text(const gguf_value_t *v, int max_items) {
    int n = gguf_value_format(v, NULL, 0, max_items);
    char *s = malloc((size_t)n + 1);
    if (s) gguf_value_format(v, s, (size_t)n + 1, max_items);
    return s;
}

// "uint32", or "array[string]" / "array[array]" for arrays.
static void type_text(const gguf_value_t *v, char *buf, size_t cap) {
    if (v->type == GGUF_VT_ARRAY)
        snprintf(buf, cap, "array[%s]", gguf_vtype_name(v->v.arr.type));
    else
        snprintf(buf, cap, "%s", gguf_vtype_name(v->type));
}

static void dims_text(const gguf_tensor_t *t, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->n_dims && n < cap; d++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", d ? ", " : "", (long long)t->ne[d]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

// Key or tensor name with control bytes replaced, for a terminal.
static void print_name(const char *s, int width) {
    int n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++, n++) putchar(*p < 0x20 || *p == 0x7f ? '?' : *p);
    for (; n < width; n++) putchar(' ');
}

static void totals_by_type(const gguf_t *g, type_total_t tot[QT_COUNT], int64_t *params) {
    memset(tot, 0, sizeof(type_total_t) * QT_COUNT);
    *params = 0;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        int64_t ne = gguf_tensor_nelements(t);
        tot[t->type].tensors++;
        tot[t->type].elements += ne;
        tot[t->type].bytes += t->nbytes;
        *params += ne;
    }
}

// --- text output

static int print_text(const gguf_t *g, int max_items) {
    printf("file:        %s\n", gguf_path(g));
    printf("size:        %zu bytes\n", gguf_file_size(g));
    printf("version:     %u\n", gguf_version(g));
    printf("alignment:   %zu\n", gguf_alignment(g));
    printf("data offset: %zu\n", gguf_data_offset(g));
    printf("n_kv:        %lld\n", (long long)gguf_n_kv(g));
    printf("n_tensors:   %lld\n", (long long)gguf_n_tensors(g));

    int key_w = 0;
    for (int64_t i = 0; i < gguf_n_kv(g); i++) {
        int n = (int)strlen(gguf_kv_key(g, i));
        if (n > key_w) key_w = n < 48 ? n : 48;
    }
    printf("\nmetadata:\n");
    for (int64_t i = 0; i < gguf_n_kv(g); i++) {
        const gguf_value_t *v = gguf_kv_value(g, i);
        char type[32];
        type_text(v, type, sizeof type);
        char *text = value_text(v, max_items);
        if (!text) {
            fprintf(stderr, "meshlm inspect: out of memory\n");
            return 1;
        }
        printf("  %4lld  ", (long long)i);
        print_name(gguf_kv_key(g, i), key_w);
        printf("  %-15s %s\n", type, text);
        free(text);
    }

    int name_w = 4;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        int n = (int)strlen(gguf_tensor(g, i)->name);
        if (n > name_w) name_w = n < 48 ? n : 48;
    }
    printf("\ntensors:\n  %5s  %-*s  %-6s  %-22s  %12s  %12s\n", "index", name_w, "name", "type", "dims",
           "offset", "bytes");
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        char dims[96];
        dims_text(t, dims, sizeof dims);
        printf("  %5lld  ", (long long)i);
        print_name(t->name, name_w);
        printf("  %-6s  %-22s  %12llu  %12zu\n", qtype_name(t->type), dims, (unsigned long long)t->offset,
               t->nbytes);
    }

    type_total_t tot[QT_COUNT];
    int64_t params;
    totals_by_type(g, tot, &params);
    printf("\ntotals:\n  parameters: %lld\n", (long long)params);
    uint64_t all = 0;
    for (int ty = 0; ty < QT_COUNT; ty++) {
        if (!tot[ty].tensors) continue;
        printf("  %-6s %5lld tensors  %14lld params  %14llu bytes\n", qtype_name(ty), (long long)tot[ty].tensors,
               (long long)tot[ty].elements, (unsigned long long)tot[ty].bytes);
        all += tot[ty].bytes;
    }
    printf("  tensor data: %llu bytes\n", (unsigned long long)all);
    return 0;
}

// --- JSON output

// Exact decimal text of a number as a raw JSON token (keeps 64-bit integers exact).
static cJSON *json_number(const gguf_value_t *v) {
    if ((v->type == GGUF_VT_FLOAT32 || v->type == GGUF_VT_FLOAT64) && !(v->v.f - v->v.f == 0))
        return cJSON_CreateNull();  // NaN and infinities have no JSON form
    char t[48];
    gguf_value_format(v, t, sizeof t, 0);
    return cJSON_CreateRaw(t);
}

// A JSON string from bytes: valid UTF-8 is kept, NUL and invalid bytes become U+FFFD.
static cJSON *json_string(const char *ptr, uint64_t len) {
    if (len > (SIZE_MAX - 1) / 3) return NULL;
    char *s = malloc((size_t)len * 3 + 1);
    if (!s) return NULL;
    const unsigned char *p = (const unsigned char *)ptr;
    size_t n = 0;
    for (uint64_t i = 0; i < len;) {
        unsigned char c = p[i];
        size_t u = 0;
        if (c >= 0x01 && c < 0x80) u = 1;
        else if (c >= 0xc2 && c <= 0xdf) u = 2;
        else if (c >= 0xe0 && c <= 0xef) u = 3;
        else if (c >= 0xf0 && c <= 0xf4) u = 4;
        bool ok = u > 0 && u <= len - i;
        for (size_t k = 1; ok && k < u; k++) ok = (p[i + k] & 0xc0) == 0x80;
        if (ok && u == 3) ok = !(c == 0xe0 && p[i + 1] < 0xa0) && !(c == 0xed && p[i + 1] > 0x9f);
        if (ok && u == 4) ok = !(c == 0xf0 && p[i + 1] < 0x90) && !(c == 0xf4 && p[i + 1] > 0x8f);
        if (ok) {
            memcpy(s + n, p + i, u);
            n += u;
            i += u;
        } else {
            memcpy(s + n, "\xef\xbf\xbd", 3);
            n += 3;
            i++;
        }
    }
    s[n] = '\0';
    cJSON *j = cJSON_CreateString(s);
    free(s);
    return j;
}

// Adds a NUL-terminated text (key, tensor name, path) that may hold invalid UTF-8.
static bool json_add_text(cJSON *obj, const char *name, const char *text) {
    cJSON *j = json_string(text, strlen(text));
    if (j && cJSON_AddItemToObject(obj, name, j)) return true;
    cJSON_Delete(j);
    return false;
}

static cJSON *json_value(const gguf_value_t *v, int max_items) {
    switch (v->type) {
    case GGUF_VT_BOOL: return cJSON_CreateBool(v->v.b);
    case GGUF_VT_STRING: return json_string(v->v.str.ptr, v->v.str.len);
    case GGUF_VT_ARRAY: {
        cJSON *a = cJSON_CreateArray();
        if (!a) return NULL;
        uint64_t n = v->v.arr.n;
        uint64_t shown = (max_items >= 0 && n > (uint64_t)max_items) ? (uint64_t)max_items : n;
        for (uint64_t i = 0; i < shown; i++) {
            cJSON *e = NULL;
            if (v->v.arr.items) {
                e = json_value(&v->v.arr.items[i], max_items);
            } else {
                gguf_value_t elem;
                if (gguf_arr_get(v, i, &elem) == 0) e = json_value(&elem, max_items);
            }
            if (!e || !cJSON_AddItemToArray(a, e)) {
                cJSON_Delete(e);
                cJSON_Delete(a);
                return NULL;
            }
        }
        return a;
    }
    default: return json_number(v);
    }
}

static cJSON *json_build(const gguf_t *g, int max_items) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    bool ok = json_add_text(root, "file", gguf_path(g)) &&
              cJSON_AddNumberToObject(root, "size", (double)gguf_file_size(g)) &&
              cJSON_AddNumberToObject(root, "version", gguf_version(g)) &&
              cJSON_AddNumberToObject(root, "alignment", (double)gguf_alignment(g)) &&
              cJSON_AddNumberToObject(root, "data_offset", (double)gguf_data_offset(g)) &&
              cJSON_AddNumberToObject(root, "n_kv", (double)gguf_n_kv(g)) &&
              cJSON_AddNumberToObject(root, "n_tensors", (double)gguf_n_tensors(g));
    cJSON *meta = ok ? cJSON_AddArrayToObject(root, "metadata") : NULL;
    for (int64_t i = 0; meta && ok && i < gguf_n_kv(g); i++) {
        const gguf_value_t *v = gguf_kv_value(g, i);
        cJSON *kv = cJSON_CreateObject();
        ok = kv && cJSON_AddItemToArray(meta, kv) && json_add_text(kv, "key", gguf_kv_key(g, i)) &&
             cJSON_AddStringToObject(kv, "type", gguf_vtype_name(v->type));
        if (ok && v->type == GGUF_VT_ARRAY) {
            ok = cJSON_AddStringToObject(kv, "element_type", gguf_vtype_name(v->v.arr.type)) &&
                 cJSON_AddNumberToObject(kv, "count", (double)v->v.arr.n) &&
                 cJSON_AddBoolToObject(kv, "truncated", max_items >= 0 && v->v.arr.n > (uint64_t)max_items);
        }
        cJSON *val = ok ? json_value(v, max_items) : NULL;
        ok = val && cJSON_AddItemToObject(kv, "value", val);
        if (!ok) cJSON_Delete(val);
    }
    cJSON *tens = ok ? cJSON_AddArrayToObject(root, "tensors") : NULL;
    for (int64_t i = 0; tens && ok && i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        cJSON *o = cJSON_CreateObject();
        ok = o && cJSON_AddItemToArray(tens, o) && cJSON_AddNumberToObject(o, "index", (double)i) &&
             json_add_text(o, "name", t->name) && cJSON_AddStringToObject(o, "type", qtype_name(t->type));
        cJSON *dims = ok ? cJSON_AddArrayToObject(o, "dims") : NULL;
        for (int d = 0; dims && ok && d < t->n_dims; d++) {
            cJSON *x = cJSON_CreateNumber((double)t->ne[d]);
            ok = x && cJSON_AddItemToArray(dims, x);
            if (!ok) cJSON_Delete(x);
        }
        ok = ok && dims && cJSON_AddNumberToObject(o, "offset", (double)t->offset) &&
             cJSON_AddNumberToObject(o, "bytes", (double)t->nbytes);
    }
    type_total_t tot[QT_COUNT];
    int64_t params;
    totals_by_type(g, tot, &params);
    cJSON *totals = ok ? cJSON_AddObjectToObject(root, "totals") : NULL;
    ok = ok && totals && cJSON_AddNumberToObject(totals, "parameters", (double)params);
    cJSON *by = ok ? cJSON_AddObjectToObject(totals, "by_type") : NULL;
    for (int ty = 0; by && ok && ty < QT_COUNT; ty++) {
        if (!tot[ty].tensors) continue;
        cJSON *o = cJSON_AddObjectToObject(by, qtype_name(ty));
        ok = o && cJSON_AddNumberToObject(o, "tensors", (double)tot[ty].tensors) &&
             cJSON_AddNumberToObject(o, "parameters", (double)tot[ty].elements) &&
             cJSON_AddNumberToObject(o, "bytes", (double)tot[ty].bytes);
    }
    if (!ok || !by) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

static int print_json(const gguf_t *g, int max_items) {
    cJSON *root = json_build(g, max_items);
    char *s = root ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!s) {
        fprintf(stderr, "meshlm inspect: out of memory building JSON\n");
        return 1;
    }
    puts(s);
    cJSON_free(s);
    return 0;
}

// --- entry point

int cmd_inspect(int argc, char **argv) {
    inspect_opts_t o = {0};
    bool done;
    int rc = parse_args(argc, argv, &o, &done);
    if (rc || done) return rc;
    char err[512] = "";
    if (o.routing_out && !o.routing) {
        fprintf(stderr, "meshlm inspect: --routing-out needs --routing N (the tokens to measure over)\n");
        return 2;
    }
    if (o.routing) {
        routing_stats_t rs;
        if ((rc = routing_stats_measure(o.path, o.routing, 0, &rs, err, sizeof err)) != 0) {
            fprintf(stderr, "meshlm inspect: %s\n", err[0] ? err : mlm_strerror(rc));
            return 1;
        }
        routing_stats_print(&rs, stdout);
        if (o.routing_out && (rc = routing_stats_write(&rs, o.routing_out, err, sizeof err)) != 0)
            fprintf(stderr, "meshlm inspect: %s\n", err);
        else if (o.routing_out)
            printf("routing counts written to %s\n", o.routing_out);
        routing_stats_free(&rs);
        return rc != 0 || fflush(stdout) != 0;
    }
    gguf_t *g = NULL;
    rc = gguf_open(&g, o.path, err, sizeof err);
    if (rc) {
        fprintf(stderr, "meshlm inspect: %s\n", err[0] ? err : mlm_strerror(rc));
        return 1;
    }
    int max_items = o.all ? -1 : INSPECT_MAX_ITEMS;
    rc = o.json ? print_json(g, max_items) : print_text(g, max_items);
    gguf_close(&g);
    if (fflush(stdout) != 0) return 1;
    return rc;
}
