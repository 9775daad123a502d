// A DRAM-bank processing-in-memory timing model for decode attention: per-bank row-buffer state
// machines, GEMV passes over K and V laid out across channels, PIM units and rows, and the time
// and energy they take. It computes no values (the PIM device takes the host's); it counts cycles.
#ifndef MESHLM_OFFLOAD_PIM_SIM_H
#define MESHLM_OFFLOAD_PIM_SIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// A PIM part. Times are in cycles of tck_ns.
typedef struct {
    const char *name;       // preset name
    const char *source;     // where the figures come from
    int channels;           // independent channels (pseudo-channels, DIMM ranks), all in parallel
    int banks;              // banks per channel
    int pus;                // PIM units per channel, working in lockstep (all-bank mode)
    int row_bytes;          // DRAM row (page) of a bank
    int col_bytes;          // bytes one column access (one MAC step) reads
    int lanes;              // MAC lanes of a unit: elements one step multiplies and adds
    double tck_ns;          // cycle time
    int tRCD, tRP, tRAS;    // activate to column, precharge, activate to precharge
    int tCCD_L, tCCD_S;     // column to column: same bank group (a unit's steps) / across groups (readout)
    int tFAW;               // four-activation window: the channel's units activate 4 at a time
    int tREFI, tRFC;        // refresh every tREFI for tRFC (tREFI 0: no refresh)
    int t_mac;              // cycles of one MAC step (a step takes max(tCCD_L, t_mac))
    int t_buf_write;        // cycles to write col_bytes of operands (q, p) into the units' buffers
    int row_buffers;        // row buffers per bank: 2 (NeuPIMs) opens the next row while computing
    uint64_t capacity;      // bytes of the part (what KV it can hold)
    double e_act_nj;        // energy of one bank's activate + precharge (nJ)
    double e_col_pj;        // one column access inside a bank (pJ)
    double e_mac_pj;        // one lane's multiply-add (pJ)
    double e_io_pj;         // one byte between the host and the units (pJ)
} pim_config_t;

// The preset called name ("hbm2-pim", "aim-gddr6", "upmem", "neupims"): 0, or -1 when unknown.
int pim_preset(const char *name, pim_config_t *out);

// The preset names, space-separated.
const char *pim_preset_names(void);

// Peak multiply-adds per second of the part times 2 (FLOP/s): every unit of every channel doing a
// MAC step every max(tCCD_L, t_mac) cycles.
double pim_peak_flops(const pim_config_t *c);

// --- one bank

typedef struct {
    uint64_t acts;          // activations (row misses), per bank
    uint64_t hits, misses;  // step groups that found their row open / had to open it
    uint64_t steps;         // MAC steps (column accesses) of one unit
    uint64_t unit_steps;    // MAC steps summed over every unit that worked
    uint64_t unit_acts;     // activations summed over every unit's bank
    uint64_t io_bytes;      // operand and result bytes between the host and the units
} pim_counts_t;

#define PIM_ROW_BUFFERS_MAX 2

// A bank's row buffers: the row each holds (-1: precharged), when it was activated and when its
// last step finished; and when the unit can take its next step.
typedef struct {
    int64_t row[PIM_ROW_BUFFERS_MAX];
    uint64_t t_act[PIM_ROW_BUFFERS_MAX];
    uint64_t t_done[PIM_ROW_BUFFERS_MAX];
    uint64_t t_next;
} pim_bank_t;

// A precharged bank, idle from cycle 0.
void pim_bank_init(pim_bank_t *b);

// n MAC steps on row of bank b, issued no earlier than cycle now. A row hit starts at the unit's
// next free cycle; a miss precharges the buffer it reuses (not before its activation + tRAS and its
// last step), activates (tRP later; at once when the buffer was precharged) and starts tRCD plus the
// four-activation stagger of the channel's units ((ceil(pus / 4) - 1) * tFAW) after that. Steps
// follow each other every max(tCCD_L, t_mac). Returns the cycle the last step ends.
uint64_t pim_bank_steps(const pim_config_t *c, pim_bank_t *b, int64_t row, int n, uint64_t now, pim_counts_t *cnt);

// --- attention passes

typedef struct pim_sim pim_sim_t;

// A simulator of part c for KV rows of head_dim elements of elt bytes. NULL when out of memory.
pim_sim_t *pim_sim_new(const pim_config_t *c, int head_dim, int elt);
void pim_sim_free(pim_sim_t **self_p);

// One GEMV pass over n_tok tokens of one (layer, KV head): token t lives in unit t % (channels *
// pus), each unit's tokens packed one after another in its bank rows from row `base` on (a token
// never straddles rows when it fits one). kind 0 is q.K^T (q broadcast to every channel's units,
// one score per token read back), kind 1 is p.V (every unit gets its tokens' p, reads back a partial
// sum of head_dim F32). The pass starts when the previous one ended. Returns its cycles.
uint64_t pim_sim_pass(pim_sim_t *s, int kind, int n_tok, int64_t base);

// Writes bytes of new k and v rows into the part, spread over its channels: cycles.
uint64_t pim_sim_write(pim_sim_t *s, uint64_t bytes);

// Simulates every row of a pass (tests); by default steady rows are advanced in pairs at once, which
// gives the same cycles (the bank's state repeats every two rows).
void pim_sim_set_exact(pim_sim_t *s, bool exact);

// Rows of a bank one (layer, KV head) of n_ctx tokens takes (K or V alike): where the next one starts.
int64_t pim_sim_rows(const pim_sim_t *s, int n_ctx);

typedef struct {
    uint64_t cycles;        // busy cycles of every pass, plus refresh stalls
    double time_ms;         // cycles * tck_ns
    double energy_mj;       // activations, column accesses, MACs and operand bytes
    pim_counts_t n;         // the counts behind them
} pim_sim_stats_t;

void pim_sim_stats(const pim_sim_t *s, pim_sim_stats_t *out);

// Refresh: busy cycles plus floor(busy / tREFI) * tRFC.
uint64_t pim_refresh_cycles(const pim_config_t *c, uint64_t busy);

#endif
