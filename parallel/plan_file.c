// Hand-written plans (the plan file format) and node files: parsing, building a plan from a spec, writing one.
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan_impl.h"
#include "core/err.h"
#include "core/fs.h"

// --- helpers

#define LINE_MAX_CHARS 4096
#define FILE_MAX_BYTES (1u << 20)

// Copies line number `no` starting at *pp into buf (without the newline) and advances *pp.
// Returns false at the end of the text; *too_long when the line did not fit.
static bool next_line(const char **pp, char *buf, size_t cap, bool *too_long) {
    const char *p = *pp;
    if (!*p) return false;
    size_t len = strcspn(p, "\n");
    *too_long = len >= cap;
    size_t n = len < cap ? len : cap - 1;
    memcpy(buf, p, n);
    buf[n] = 0;
    if (n && buf[n - 1] == '\r') buf[n - 1] = 0;
    *pp = p + len + (p[len] == '\n');
    return true;
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = 0;
    return s;
}

// A non-negative decimal int filling all of [s, end).
static bool parse_int(const char *s, const char *end, int *out) {
    if (s == end) return false;
    long v = 0;
    for (const char *c = s; c < end; c++) {
        if (!isdigit((unsigned char)*c)) return false;
        v = v * 10 + (*c - '0');
        if (v > 1000000) return false;
    }
    *out = (int)v;
    return true;
}

static bool parse_pos(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || !(v > 0)) return false;
    *out = v;
    return true;
}

// A disk_id, shm_id, cpu_id, core or thread count: a positive integer below a million.
static bool parse_disk_id(const char *s, int *out) {
    const char *end = s + strlen(s);
    return parse_int(s, end, out) && *out > 0 && *out < 1000000;
}

// Splits p into the stage's members by the given weights and checks every range matches.
static bool weights_reproduce(const plan_t *p, int a, int b, const double *w) {
    const int g = b - a;
    const plan_shard_t *last = &p->shard[b - 1];
    int lo[PLAN_MAX_NODES], hi[PLAN_MAX_NODES];
    const int hg = p->grain_heads > 0 ? p->grain_heads : 1, fg = p->grain_ffn > 0 ? p->grain_ffn : PLAN_FFN_GRAIN;
    plan_split_units(last->s.h1, hg, w, g, lo, hi);
    for (int i = 0; i < g; i++)
        if (lo[i] != p->shard[a + i].s.h0 || hi[i] != p->shard[a + i].s.h1) return false;
    if (p->tp_mode != PLAN_TP_ALLREDUCE) { // all-reduce members hold every hidden row
        plan_split_units(last->s.e1, PLAN_HIDDEN_GRAIN, w, g, lo, hi);
        for (int i = 0; i < g; i++)
            if (lo[i] != p->shard[a + i].s.e0 || hi[i] != p->shard[a + i].s.e1) return false;
    }
    plan_split_units(last->s.f1, fg, w, g, lo, hi);
    for (int i = 0; i < g; i++)
        if (lo[i] != p->shard[a + i].s.f0 || hi[i] != p->shard[a + i].s.f1) return false;
    if (last->s.v1 > 0) {
        plan_split_units(last->s.v1, PLAN_VOCAB_GRAIN, w, g, lo, hi);
        for (int i = 0; i < g; i++)
            if (lo[i] != p->shard[a + i].s.v0 || hi[i] != p->shard[a + i].s.v1) return false;
    }
    return true;
}

// The shortest printing of the stage's weights (scaled so the largest is 1) that splits the
// same rows again. fmt[i] receives each weight's text.
static void stage_weights(const plan_t *p, int a, int b, char fmt[][32]) {
    const int g = b - a;
    double mx = 0;
    for (int i = a; i < b; i++) mx = fmax(mx, p->shard[i].weight);
    static const int digits[] = {3, 4, 6, 9, 12, 17};
    for (size_t d = 0; d < sizeof digits / sizeof *digits; d++) {
        double w[PLAN_MAX_NODES];
        for (int i = 0; i < g; i++) {
            const double x = mx > 0 ? p->shard[a + i].weight / mx : 1.0;
            snprintf(fmt[i], 32, "%.*g", digits[d], x > 0 ? x : 1e-9);
            w[i] = strtod(fmt[i], NULL);
        }
        if (weights_reproduce(p, a, b, w)) return;
    }
}

// --- public API

int plan_file_parse(const char *text, plan_spec_t *spec, char *err, size_t errlen) {
    memset(spec, 0, sizeof *spec);
    char buf[LINE_MAX_CHARS];
    const char *p = text ? text : "";
    bool too_long, have_mode = false;
    for (int no = 1; next_line(&p, buf, sizeof buf, &too_long); no++) {
        if (too_long)
            return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: longer than %d characters", no, LINE_MAX_CHARS - 1);
        char *hash = strchr(buf, '#');
        if (hash) {
            int ver = 0;
            if (sscanf(hash, "# meshlm plan v%d", &ver) == 1 && ver > PLAN_FILE_VERSION)
                return mlm_fail(err, errlen, MLM_EUNSUPPORTED,
                                "line %d: plan file version %d is newer than this meshlm reads (%d)", no, ver,
                                PLAN_FILE_VERSION);
            *hash = 0;
        }
        char *line = trim(buf);
        if (!*line) continue;
        char *save = NULL, *tok = strtok_r(line, " \t", &save);
        if (!strcmp(tok, "tp")) { // v2: the tensor-parallel mode of every stage
            if (have_mode) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: a second 'tp' line", no);
            have_mode = true;
            bool got = false;
            while ((tok = strtok_r(NULL, " \t", &save))) {
                if (got || strncmp(tok, "mode=", 5) != 0)
                    return mlm_fail(err, errlen, MLM_EFORMAT,
                                    "line %d: expected 'tp mode=exact|allreduce', found '%.40s'", no, tok);
                if (!strcmp(tok + 5, "exact")) spec->tp_mode = PLAN_TP_EXACT;
                else if (!strcmp(tok + 5, "allreduce")) spec->tp_mode = PLAN_TP_ALLREDUCE;
                else
                    return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: unknown mode '%.40s' (exact or allreduce)", no,
                                    tok + 5);
                got = true;
            }
            if (!got) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: 'tp' needs mode=exact or mode=allreduce", no);
            continue;
        }
        if (strcmp(tok, "stage") != 0)
            return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: expected 'stage' or 'tp', found '%.40s'", no, tok);
        if (spec->n_stages == PLAN_MAX_NODES)
            return mlm_fail(err, errlen, MLM_ERANGE, "line %d: more than %d stages", no, PLAN_MAX_NODES);
        const int k = spec->n_stages;
        bool have_layers = false, have_nodes = false;
        spec->first[k] = spec->n;
        spec->line[k] = no;
        while ((tok = strtok_r(NULL, " \t", &save))) {
            char *eq = strchr(tok, '=');
            if (!eq) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: expected key=value, found '%.40s'", no, tok);
            *eq = 0;
            const char *val = eq + 1;
            if (!strcmp(tok, "layers")) {
                if (have_layers) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: layers= given twice", no);
                const char *dash = strchr(val, '-');
                int a, b;
                if (dash ? !(parse_int(val, dash, &a) && parse_int(dash + 1, dash + strlen(dash), &b))
                         : !parse_int(val, val + strlen(val), &a)) {
                    return mlm_fail(err, errlen, MLM_EFORMAT,
                                    "line %d: bad layer range '%.40s' (want A-B or A, blocks counted from 0)", no, val);
                }
                if (!dash) b = a;
                if (b < a)
                    return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: layer range %d-%d runs backwards", no, a, b);
                spec->l0[k] = a;
                spec->l1[k] = b + 1;
                have_layers = true;
            } else if (!strcmp(tok, "nodes")) {
                if (have_nodes) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: nodes= given twice", no);
                have_nodes = true;
                const char *q = val;
                for (;;) {
                    size_t len = strcspn(q, ",");
                    char item[64];
                    if (len == 0 || len >= sizeof item)
                        return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: bad node list '%.60s' (want e.g. 0,1:2,3)",
                                        no, val);
                    memcpy(item, q, len);
                    item[len] = 0;
                    if (spec->n == PLAN_MAX_NODES)
                        return mlm_fail(err, errlen, MLM_ERANGE, "line %d: more than %d nodes in all", no,
                                        PLAN_MAX_NODES);
                    char *colon = strchr(item, ':');
                    int idx;
                    double wt = 0;
                    if (!parse_int(item, colon ? colon : item + len, &idx) || (colon && !parse_pos(colon + 1, &wt)))
                        return mlm_fail(err, errlen, MLM_EFORMAT,
                                        "line %d: bad node '%s' (want INDEX or INDEX:WEIGHT, weight > 0)", no, item);
                    spec->node[spec->n] = idx;
                    spec->weight[spec->n] = wt;
                    spec->n++;
                    if (!q[len]) break;
                    q += len + 1;
                }
            } else {
                return mlm_fail(err, errlen, MLM_EFORMAT,
                                "line %d: unknown key '%.40s' (a stage has layers= and nodes=)", no, tok);
            }
        }
        if (!have_layers || !have_nodes)
            return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: a stage needs %s", no,
                            have_layers ? "nodes=" : "layers=");
        spec->n_stages++;
    }
    spec->first[spec->n_stages] = spec->n;
    if (spec->n_stages == 0) return mlm_fail(err, errlen, MLM_EFORMAT, "no 'stage' lines: nothing to plan");
    return 0;
}

int plan_file_load(const char *path, plan_spec_t *spec, char *err, size_t errlen) {
    char *text = NULL;
    int rc = mlm_read_file(path, FILE_MAX_BYTES, &text, NULL, err, errlen);
    if (rc != 0) return rc;
    char inner[512];
    rc = plan_file_parse(text, spec, inner, sizeof inner);
    if (rc != 0) mlm_fail(err, errlen, rc, "%s: %s", path, inner);
    free(text);
    return rc;
}

int plan_from_spec(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_spec_t *spec, int n_ctx,
                   plan_t *out, char *err, size_t errlen) {
    if (n < 1 || n > PLAN_MAX_NODES)
        return mlm_fail(err, errlen, MLM_EINVAL, "node count %d is outside 1..%d", n, PLAN_MAX_NODES);
    if (spec->n_stages < 1 || spec->n_stages > PLAN_MAX_NODES || spec->n > PLAN_MAX_NODES ||
        spec->first[spec->n_stages] != spec->n)
        return mlm_fail(err, errlen, MLM_EINVAL, "an empty or inconsistent plan spec");
    int stage_line[PLAN_MAX_NODES];
    for (int i = 0; i < n; i++) stage_line[i] = 0;
    int at = 0;
    for (int k = 0; k < spec->n_stages; k++) {
        const int no = spec->line[k];
        if (spec->l0[k] != at)
            return mlm_fail(err, errlen, MLM_EINVAL, "line %d: layers %d-%d do not start where the %s (expected %d)",
                            no, spec->l0[k], spec->l1[k] - 1, k ? "previous stage ends" : "model does", at);
        if (spec->l1[k] > pm->n_layer)
            return mlm_fail(err, errlen, MLM_EINVAL, "line %d: layers %d-%d run past the model's %d layers (0-%d)", no,
                            spec->l0[k], spec->l1[k] - 1, pm->n_layer, pm->n_layer - 1);
        at = spec->l1[k];
        if (spec->first[k + 1] <= spec->first[k])
            return mlm_fail(err, errlen, MLM_EINVAL, "line %d: a stage without nodes", no);
        int weighted = 0;
        for (int i = spec->first[k]; i < spec->first[k + 1]; i++) {
            const int j = spec->node[i];
            if (j < 0 || j >= n)
                return mlm_fail(err, errlen, MLM_EINVAL, "line %d: node %d is not offered (nodes are 0-%d)", no, j,
                                n - 1);
            if (stage_line[j])
                return mlm_fail(err, errlen, MLM_EINVAL, "line %d: node %d is already in the stage on line %d", no, j,
                                stage_line[j]);
            stage_line[j] = no;
            weighted += spec->weight[i] > 0;
        }
        if (weighted && weighted != spec->first[k + 1] - spec->first[k])
            return mlm_fail(err, errlen, MLM_EINVAL, "line %d: give a :weight to every node of the stage or to none",
                            no);
    }
    if (at != pm->n_layer)
        return mlm_fail(err, errlen, MLM_EINVAL, "line %d: the stages cover layers 0-%d but the model has 0-%d",
                        spec->line[spec->n_stages - 1], at - 1, pm->n_layer - 1);
    memset(out, 0, sizeof *out);
    out->n = spec->n;
    out->n_stages = spec->n_stages;
    out->n_nodes = n;
    out->n_ctx = n_ctx > 0 ? n_ctx : 4096;
    out->tp_mode = spec->tp_mode == PLAN_TP_ALLREDUCE ? PLAN_TP_ALLREDUCE : PLAN_TP_EXACT;
    memcpy(out->node, nodes, sizeof *nodes * (size_t)n);
    for (int k = 0; k <= spec->n_stages; k++) out->stage_first[k] = spec->first[k];
    for (int k = 0; k < spec->n_stages; k++) {
        const int a = spec->first[k], b = spec->first[k + 1];
        double w[PLAN_MAX_NODES];
        const bool given = spec->weight[a] > 0;
        for (int i = a; i < b; i++) {
            out->shard[i].node = spec->node[i];
            out->shard[i].stage = k;
            w[i - a] = given ? spec->weight[i] : plan_node_rate(pm, &nodes[spec->node[i]]);
        }
        const unsigned fl = PLAN_FIT_STREAM | (given ? 0 : PLAN_FIT_ADJUST | PLAN_FIT_BALANCE);
        if (plan_fit_stage(pm, out, a, b, spec->l0[k], spec->l1[k], w, fl, NULL) != 0) {
            int worst = a;
            uint64_t miss = 0;
            for (int i = a; i < b; i++) {
                const plan_shard_t *s = &out->shard[i];
                const uint64_t bud = nodes[s->node].mem_budget;
                if (bud && s->peak_bytes > bud && s->peak_bytes - bud > miss) miss = s->peak_bytes - bud, worst = i;
            }
            for (int i = a; i < b && !miss; i++) { // the budgets hold their shares: a KV device is too small
                const plan_shard_t *s = &out->shard[i];
                const plan_node_t *nd = &nodes[s->node];
                if (!nd->kv_cap || s->kv_dev_bytes <= nd->kv_cap) continue;
                char kv[32], cap[32];
                plan_fmt_bytes(kv, sizeof kv, s->kv_dev_bytes);
                plan_fmt_bytes(cap, sizeof cap, nd->kv_cap);
                return mlm_fail(err, errlen, MLM_EFULL,
                                "line %d: node %d (%s) keeps %s of KV for layers %d-%d on its %s device, which holds %s",
                                spec->line[k], s->node, nd->name, kv, spec->l0[k], spec->l1[k] - 1,
                                plan_kv_dev_name(nd->kv_dev), cap);
            }
            const plan_shard_t *s = &out->shard[worst];
            char need[32], bud[32], sh[32];
            plan_fmt_bytes(need, sizeof need, s->peak_bytes);
            plan_fmt_bytes(bud, sizeof bud, nodes[s->node].mem_budget);
            plan_fmt_bytes(sh, sizeof sh, miss);
            return mlm_fail(err, errlen, MLM_EFULL,
                            "line %d: node %d (%s) needs %s%s for layers %d-%d%s but its budget is %s (%s short)",
                            spec->line[k], s->node, nodes[s->node].name, s->st.streams ? "at least " : "", need,
                            spec->l0[k], spec->l1[k] - 1, given ? " with these weights" : "", bud, sh);
        }
    }
    plan_layout_name(out);
    plan_predict(pm, out);
    plan_predict_modes(pm, out);
    snprintf(out->why, sizeof out->why, "a hand-written plan");
    return 0;
}

int plan_file_write(const plan_t *p, FILE *f) {
    const bool ar = p->tp_mode == PLAN_TP_ALLREDUCE;
    fprintf(f, "# meshlm plan v%d: one line per pipeline stage; nodes are indices in the offered order\n",
            ar ? 2 : 1); // the oldest version that says it: v1 readers take exact plans
    fprintf(f, "# (the coordinator is node 0 when it computes); :W gives a node's tensor-parallel weight\n");
    fprintf(f, "# layout %s, n_ctx %d", p->layout, p->n_ctx);
    if (p->cost.token_ms > 0) fprintf(f, ", predicted %.2f ms/token", p->cost.token_ms);
    fprintf(f, "\n");
    if (ar) fprintf(f, "tp mode=allreduce\n");
    for (int k = 0; k < p->n_stages; k++) {
        const int a = p->stage_first[k], b = p->stage_first[k + 1];
        if (b <= a) continue;
        char wt[PLAN_MAX_NODES][32];
        if (b - a > 1) stage_weights(p, a, b, wt);
        fprintf(f, "stage layers=%d-%d nodes=", p->shard[a].s.l0, p->shard[a].s.l1 - 1);
        for (int i = a; i < b; i++) {
            fprintf(f, "%s%d", i > a ? "," : "", p->shard[i].node);
            if (b - a > 1) fprintf(f, ":%s", wt[i - a]);
        }
        fprintf(f, "  #");
        for (int i = a; i < b; i++) fprintf(f, " %s", p->node[p->shard[i].node].name);
        fprintf(f, "\n");
    }
    return ferror(f) ? MLM_EIO : 0;
}

int plan_parse_nodes_file(const char *text, plan_node_t *nodes, int max, char *err, size_t errlen) {
    char buf[LINE_MAX_CHARS];
    const char *p = text ? text : "";
    bool too_long;
    int n = 0;
    for (int no = 1; next_line(&p, buf, sizeof buf, &too_long); no++) {
        if (too_long)
            return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: longer than %d characters", no, LINE_MAX_CHARS - 1);
        char *hash = strchr(buf, '#');
        if (hash) *hash = 0;
        char *line = trim(buf);
        if (!*line) continue;
        if (n == max) return mlm_fail(err, errlen, MLM_ERANGE, "line %d: more than %d nodes", no, max);
        char *save = NULL, *tok = strtok_r(line, " \t", &save);
        if (strchr(tok, '=') || strlen(tok) >= sizeof nodes[n].name)
            return mlm_fail(err, errlen, MLM_EFORMAT,
                            "line %d: a node line starts with its name (under 64 characters), found '%.40s'", no, tok);
        plan_node_t *nd = &nodes[n];
        memset(nd, 0, sizeof *nd);
        snprintf(nd->name, sizeof nd->name, "%s", tok);
        nd->speed = 1.0;
        while ((tok = strtok_r(NULL, " \t", &save))) {
            char *eq = strchr(tok, '=');
            if (!eq) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: expected key=value, found '%.40s'", no, tok);
            *eq = 0;
            const char *v = eq + 1;
            double x = 0;
            bool ok;
            if (!strcmp(tok, "speed")) ok = parse_pos(v, &nd->speed);
            else if (!strcmp(tok, "gflops")) ok = parse_pos(v, &nd->gflops);
            else if (!strcmp(tok, "mem_bw")) ok = plan_parse_rate(v, &nd->mem_bw);
            else if (!strcmp(tok, "mem")) ok = plan_parse_size(v, &nd->mem_budget) == 0 && nd->mem_budget > 0;
            else if (!strcmp(tok, "lat_ms")) ok = parse_pos(v, &x), nd->lat_us = x * 1e3;
            else if (!strcmp(tok, "lat_us")) ok = parse_pos(v, &nd->lat_us);
            else if (!strcmp(tok, "mbit")) ok = parse_pos(v, &x), nd->link_bw = x * 1e6 / 8;
            else if (!strcmp(tok, "disk")) ok = plan_parse_rate(v, &nd->disk_bw);
            else if (!strcmp(tok, "disk_id")) ok = parse_disk_id(v, &nd->disk_id);
            else if (!strcmp(tok, "shm_id")) ok = parse_disk_id(v, &nd->shm_id);
            else if (!strcmp(tok, "cpu_id")) ok = parse_disk_id(v, &nd->cpu_id);
            else if (!strcmp(tok, "cores")) ok = parse_disk_id(v, &nd->cores);
            else if (!strcmp(tok, "threads")) ok = parse_disk_id(v, &nd->threads);
            else if (!strcmp(tok, "kv")) ok = (nd->kv_dev = plan_kv_dev_kind(v)) >= 0 && !strchr(v, ':');
            else if (!strcmp(tok, "kv_ram")) ok = plan_parse_size(v, &nd->kv_ram) == 0 && nd->kv_ram > 0;
            else if (!strcmp(tok, "kv_cap")) ok = plan_parse_size(v, &nd->kv_cap) == 0 && nd->kv_cap > 0;
            else
                return mlm_fail(err, errlen, MLM_EFORMAT,
                                "line %d: unknown key '%.40s' (known: speed gflops mem_bw mem lat_ms lat_us mbit disk "
                                "disk_id shm_id cpu_id cores threads kv kv_ram kv_cap)", no, tok);
            if (!ok) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: bad value '%.40s' for %s", no, v, tok);
        }
        n++;
    }
    if (n == 0) return mlm_fail(err, errlen, MLM_EINVAL, "no nodes in the node file");
    return n;
}
