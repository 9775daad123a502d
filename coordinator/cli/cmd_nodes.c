// meshlm nodes: the members of a node registry with their role, state, endpoint, heartbeat age and profile.
#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster/registry.h"
#include "coordinator/cli/cli.h"
#include "core/err.h"
#include "core/sha256.h"
#include "worker/kernels/quant.h"

// --- helpers

static void nodes_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm nodes --registry URL [--json] [--plan] [--reap MS]\n"
            "  --registry URL   redis://HOST:PORT[/DB][?prefix=P&timeout=MS] (default $MESHLM_REGISTRY)\n"
            "  --json           one JSON object: {\"registry\", \"members\": [records with \"age_ms\"], \"plan\"}\n"
            "  --plan           print the plan the coordinator published, after the table\n"
            "  --reap MS        first remove the records of members lost for longer than MS\n"
            "A member whose heartbeat expired is shown as lost until it is reaped.\n");
}

// "1.5G"-style size (powers of 1024).
static void fmt_size(char *out, size_t cap, double b) {
    const char *u = "BKMGTP";
    int i = 0;
    while (b >= 1024 && i < 5) {
        b /= 1024;
        i++;
    }
    snprintf(out, cap, i ? "%.1f%c" : "%.0f%c", b, u[i]);
}

// "4 cores, budget 2.0G, Q4_0 12.3 Q8_0 9.1 GFLOP/s, memory 10.1 GB/s, disk 500 MB/s, model 1a2b3c4d 1.2G".
static void fmt_profile(char *out, size_t cap, const registry_profile_t *p) {
    char b[32];
    size_t k = 0;
#define ADD(...) k += (size_t)snprintf(out + k, k < cap ? cap - k : 0, __VA_ARGS__)
    out[0] = 0;
    if (p->n_cores) ADD("%u cores", p->n_cores);
    else ADD("cores ?");
    if (p->mem_budget) {
        fmt_size(b, sizeof b, (double)p->mem_budget);
        ADD(", budget %s", b);
    }
    for (int i = 0; i < p->n_speeds; i++)
        ADD("%s%s %.1f", i ? " " : ", ", qtype_name(p->speed[i].type), p->speed[i].gflops);
    if (p->n_speeds) ADD(" GFLOP/s");
    if (p->mem_bw) ADD(", memory %.1f GB/s", (double)p->mem_bw / 1e9);
    if (p->disk_bw) ADD(", disk %.0f MB/s", (double)p->disk_bw / 1e6);
    if (p->has_model) {
        char hex[65];
        sha256_hex(p->model_sha256, hex);
        fmt_size(b, sizeof b, (double)p->model_size);
        ADD(", model %.8s %s", hex, b);
    } else {
        ADD(", no model");
    }
#undef ADD
}

static void print_table(FILE *f, const char *url, const registry_member_t *ms, int n) {
    if (n == 0) {
        fprintf(f, "no members in registry %s\n", url);
        return;
    }
    int wid = 2, wep = 8;
    for (int i = 0; i < n; i++) {
        const int a = (int)strlen(ms[i].id), b = (int)strlen(ms[i].endpoint);
        wid = a > wid ? a : wid;
        wep = b > wep ? b : wep;
    }
    fprintf(f, "%-*s  %-11s  %-8s  %-*s  %8s  %s\n", wid, "ID", "ROLE", "STATE", wep, "ENDPOINT", "AGE", "PROFILE");
    for (int i = 0; i < n; i++) {
        char prof[512], age[32];
        fmt_profile(prof, sizeof prof, &ms[i].prof);
        snprintf(age, sizeof age, "%.1f s", (double)ms[i].age_ms / 1000.0);
        fprintf(f, "%-*s  %-11s  %-8s  %-*s  %8s  %s\n", wid, ms[i].id, registry_role_name(ms[i].role),
                registry_state_name(ms[i].state), wep, ms[i].endpoint[0] ? ms[i].endpoint : "-", age, prof);
    }
}

// A JSON string literal of text (caller frees), or NULL.
static char *json_string(const char *text) {
    cJSON *s = cJSON_CreateString(text);
    char *out = s ? cJSON_PrintUnformatted(s) : NULL;
    cJSON_Delete(s);
    return out;
}

// The JSON document (caller frees), or NULL when out of memory. The records are written as the
// registry stores them (with "age_ms"), so their numbers stay exact.
static char *json_doc(const char *url, const registry_member_t *ms, int n, const char *plan) {
    char *u = json_string(url), *p = plan ? json_string(plan) : strdup("null");
    size_t cap = (u ? strlen(u) : 0) + (p ? strlen(p) : 0) + 64, len = 0;
    char *out = u && p ? malloc(cap) : NULL;
    if (out) len = (size_t)snprintf(out, cap, "{\"registry\":%s,\"members\":[", u);
    for (int i = 0; out && i < n; i++) {
        char *rec = NULL;
        if (registry_record_format(&ms[i], true, &rec) != 0) {
            free(out);
            out = NULL;
            break;
        }
        const size_t need = len + strlen(rec) + 2 + (p ? strlen(p) : 0) + 32;
        char *grown = need > cap ? realloc(out, cap = 2 * need) : out;
        if (!grown) {
            free(out);
            out = NULL;
        } else {
            out = grown;
            len += (size_t)snprintf(out + len, cap - len, "%s%s", i ? "," : "", rec);
        }
        free(rec);
    }
    if (out) snprintf(out + len, cap - len, "],\"plan\":%s}", p);
    free(u);
    free(p);
    return out;
}

// --- public API

int cmd_nodes(int argc, char **argv) {
    enum { O_JSON = 256, O_PLAN, O_REAP };
    static const struct option opts[] = {{"registry", required_argument, 0, 'R'}, {"json", no_argument, 0, O_JSON},
                                         {"plan", no_argument, 0, O_PLAN},       {"reap", required_argument, 0, O_REAP},
                                         {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
    const char *url = getenv("MESHLM_REGISTRY");
    bool json = false, show_plan = false;
    int reap_ms = -1;
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'R': url = optarg; break;
        case O_JSON: json = true; break;
        case O_PLAN: show_plan = true; break;
        case O_REAP: {
            char *end;
            const long v = strtol(optarg, &end, 10);
            if (!*optarg || *end || v < 0 || v > 86400000) {
                fprintf(stderr, "meshlm nodes: bad --reap '%s' (ms)\n", optarg);
                return 2;
            }
            reap_ms = (int)v;
            break;
        }
        case 'h': nodes_usage(stdout); return 0;
        default: nodes_usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        nodes_usage(stderr);
        return 2;
    }
    if (!url || !*url) {
        fprintf(stderr, "meshlm nodes: no --registry URL (nor $MESHLM_REGISTRY)\n");
        return 2;
    }
    char err[1024] = "";
    registry_t *r = NULL;
    if (registry_open(&r, url, err, sizeof err) != 0) {
        fprintf(stderr, "meshlm nodes: %s\n", err);
        return 1;
    }
    int rc = 0, reaped = 0;
    if (reap_ms >= 0 && (rc = registry_reap(r, reap_ms, &reaped)) != 0)
        fprintf(stderr, "meshlm nodes: %s\n", registry_error(r));
    registry_member_t *ms = NULL;
    int n = 0;
    if (rc == 0 && (rc = registry_list(r, &ms, &n)) != 0) fprintf(stderr, "meshlm nodes: %s\n", registry_error(r));
    char *plan = NULL;
    if (rc == 0 && (json || show_plan)) {
        const int pr = registry_get_plan(r, &plan);
        if (pr != 0 && pr != MLM_ENOTFOUND) {
            fprintf(stderr, "meshlm nodes: %s\n", registry_error(r));
            rc = pr;
        }
    }
    if (rc == 0 && json) {
        char *doc = json_doc(registry_url(r), ms, n, plan);
        if (doc) printf("%s\n", doc);
        else rc = MLM_ENOMEM;
        free(doc);
    } else if (rc == 0) {
        if (reap_ms >= 0)
            printf("reaped %d member%s lost for longer than %d ms\n", reaped, reaped == 1 ? "" : "s", reap_ms);
        print_table(stdout, registry_url(r), ms, n);
        const bool newline = plan && plan[0] && plan[strlen(plan) - 1] != '\n';
        if (show_plan) printf("\nplan:\n%s%s", plan ? plan : "(none published)\n", newline ? "\n" : "");
    }
    free(plan);
    free(ms);
    registry_destroy(&r);
    return rc == 0 ? 0 : 1;
}
