// Peak memory report of run and bench: VmHWM of each process and the peak of its memory cgroup.
#include "coordinator/cli/mem_report.h"

#include <cjson/cJSON.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

// --- helpers

// "12.3 MiB" / "1.50 GiB", or "-" for 0 (unknown).
static void fmt_bytes(char *buf, size_t cap, uint64_t b) {
    if (b == 0) snprintf(buf, cap, "-");
    else if (b >= (1ull << 30)) snprintf(buf, cap, "%.2f GiB", (double)b / (1ull << 30));
    else snprintf(buf, cap, "%.1f MiB", (double)b / (1ull << 20));
}

static void add_bytes(cJSON *o, const char *key, bool known, uint64_t v) {
    if (known) cJSON_AddNumberToObject(o, key, (double)v);
    else cJSON_AddNullToObject(o, key);
}

// --- public API

void mem_report_collect(mem_report_t *r, launch_t *lw, const char *const *remote, int n_remote) {
    memset(r, 0, sizeof *r);
    mem_row_t *me = &r->row[r->n++];
    snprintf(me->process, sizeof me->process, "coordinator");
    me->pid = (int)getpid();
    me->vmhwm = launch_vmhwm(getpid());
    if (lw) {
        launch_sample(lw);
        for (int i = 0; i < lw->n && r->n < MEM_REPORT_MAX; i++) {
            mem_row_t *w = &r->row[r->n++];
            snprintf(w->process, sizeof w->process, "%s", lw->name[i]);
            w->pid = (int)lw->pid[i];
            w->vmhwm = lw->vmhwm[i];
            if (lw->cg[i]) {
                w->in_cgroup = true;
                w->cg_peak = lw->cg_peak[i];
                w->cg_limit = memcg_limit(lw->cg[i]);
                snprintf(w->cgroup, sizeof w->cgroup, "%s", memcg_path(lw->cg[i]));
            }
        }
        return;
    }
    for (int i = 0; i < n_remote && r->n < MEM_REPORT_MAX; i++)
        snprintf(r->row[r->n++].process, sizeof r->row[0].process, "%s", remote[i]);
}

void mem_report_reset_self(void) {
    const int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    const ssize_t n = write(fd, "5", 1); // refused: the report then covers the whole process life
    (void)n;
    close(fd);
}

void mem_report_line(const mem_report_t *r, FILE *f) {
    fprintf(f, "meshlm: peak memory (VmHWM; memory cgroup peak with page cache / limit):");
    for (int i = 0; i < r->n; i++) {
        const mem_row_t *w = &r->row[i];
        char hwm[32], peak[32], lim[32];
        fmt_bytes(hwm, sizeof hwm, w->vmhwm);
        fprintf(f, "%s %s %s", i ? ";" : "", w->process, hwm);
        if (w->in_cgroup) {
            fmt_bytes(peak, sizeof peak, w->cg_peak);
            if (w->cg_limit) fmt_bytes(lim, sizeof lim, w->cg_limit);
            else snprintf(lim, sizeof lim, "no limit");
            fprintf(f, ", cgroup %s / %s", peak, lim);
        }
    }
    fprintf(f, "\n");
}

void mem_report_table(const mem_report_t *r, const char *label, int threads, bool with_header, FILE *f) {
    if (with_header) {
        fprintf(f, "| %-24s | %7s | %-24s | %8s | %12s | %11s | %12s |\n", "model", "threads", "process", "pid",
                "VmHWM", "cgroup peak", "cgroup limit");
        fprintf(f, "| %.24s | %.7s | %.24s | %.8s | %.12s | %.11s | %.12s |\n", "------------------------------",
                "---------", "------------------------------", "----------", "--------------", "-------------",
                "--------------");
    }
    for (int i = 0; i < r->n; i++) {
        const mem_row_t *w = &r->row[i];
        char pid[16] = "-", hwm[32], peak[32] = "-", lim[32] = "-";
        if (w->pid) snprintf(pid, sizeof pid, "%d", w->pid);
        fmt_bytes(hwm, sizeof hwm, w->vmhwm);
        if (w->in_cgroup) {
            fmt_bytes(peak, sizeof peak, w->cg_peak);
            if (w->cg_limit) fmt_bytes(lim, sizeof lim, w->cg_limit);
            else snprintf(lim, sizeof lim, "none");
        }
        fprintf(f, "| %-24s | %7d | %-24s | %8s | %12s | %11s | %12s |\n", label, threads, w->process, pid, hwm, peak,
                lim);
    }
}

cJSON *mem_report_json(const mem_report_t *r) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < r->n; i++) {
        const mem_row_t *w = &r->row[i];
        cJSON *o = cJSON_CreateObject();
        if (!o) break;
        cJSON_AddStringToObject(o, "process", w->process);
        add_bytes(o, "pid", w->pid != 0, (uint64_t)w->pid);
        add_bytes(o, "vmhwm_bytes", w->vmhwm != 0, w->vmhwm);
        add_bytes(o, "cgroup_peak_bytes", w->in_cgroup, w->cg_peak);
        add_bytes(o, "limit_bytes", w->in_cgroup && w->cg_limit, w->cg_limit);
        if (w->in_cgroup) cJSON_AddStringToObject(o, "cgroup", w->cgroup);
        else cJSON_AddNullToObject(o, "cgroup");
        cJSON_AddItemToArray(a, o);
    }
    return a;
}
