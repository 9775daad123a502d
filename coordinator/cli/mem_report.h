// Peak memory of every process of a run (this one, its local workers, remote workers): text and JSON.
#ifndef MESHLM_MEM_REPORT_H
#define MESHLM_MEM_REPORT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "cluster/launch.h"

typedef struct {
    char process[300];        // "coordinator", "local-0", ... or a remote worker's endpoint
    int pid;                  // 0 for a remote worker
    uint64_t vmhwm;           // peak resident set (VmHWM), bytes; 0 = unknown (remote, or already gone)
    bool in_cgroup;           // ran in its own memory cgroup
    uint64_t cg_peak;         // that cgroup's peak usage, page cache included, bytes
    uint64_t cg_limit;        // its limit, bytes (0 = none)
    char cgroup[300];         // its directory ("" = none)
} mem_row_t;

#define MEM_REPORT_MAX (LAUNCH_MAX + 1)

typedef struct {
    int n;
    mem_row_t row[MEM_REPORT_MAX]; // (n) this process first, then the workers in launch / --workers order
} mem_report_t;

// Fills r: this process as "coordinator", then lw's local workers (sampled now: call it before they
// are told to exit) or, without lw, the n_remote endpoints of remote workers (all unknown).
void mem_report_collect(mem_report_t *r, launch_t *lw, const char *const *remote, int n_remote);

// Resets this process's VmHWM to its current resident set (/proc/self/clear_refs), so that the next
// report covers what follows; quietly does nothing where the kernel refuses.
void mem_report_reset_self(void);

// One line on f: "meshlm: peak memory (VmHWM; cgroup peak with page cache / limit): coordinator
// 12.3 MiB; local-0 8.0 MiB, cgroup 20.1 MiB / 256.0 MiB; tcp://h:5000 -".
void mem_report_line(const mem_report_t *r, FILE *f);

// A markdown table: the header (with_header) and one row per process, each led by label and threads.
void mem_report_table(const mem_report_t *r, const char *label, int threads, bool with_header, FILE *f);

// A cJSON array of {"process","pid","vmhwm_bytes","cgroup_peak_bytes","limit_bytes","cgroup"}
// (null where unknown or none); caller deletes it (or hands it to a parent object).
struct cJSON *mem_report_json(const mem_report_t *r);

#endif
