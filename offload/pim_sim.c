// The PIM timing model: presets, a bank's row-buffer state machine, GEMV passes, time and energy.
#include "offload/pim_sim.h"

#include <stdlib.h>
#include <string.h>

// --- presets

// Figures from the parts' papers where they give them (noted), otherwise typical DRAM values for the
// interface; energies are order-of-magnitude figures, not calibrated against silicon.
static const pim_config_t presets[] = {
    // Samsung HBM2-PIM (Aquabolt-XL; Kwon et al., ISSCC 2021; Lee et al., ISCA 2021): 16 pseudo-channels,
    // 16 banks each, 8 PIM units per pseudo-channel (one per 2 banks), 1 KB rows, 16-lane FP16 MAC
    {"hbm2-pim", "Samsung HBM2-PIM (ISSCC 2021, ISCA 2021)", 16, 16, 8, 1024, 32, 16, 1.0, 14, 14, 33, 4, 2, 16, 3900,
     350, 4, 4, 1, 6ull << 30, 0.9, 190.0, 1.0, 4.0},
    // SK hynix AiM (GDDR6; Lee et al., ISSCC 2022; Hot Chips 2022): 16 banks per channel, a 16-lane
    // BF16 MAC unit per bank at 1 GHz, 2 KB rows; 8 chips x 2 channels
    {"aim-gddr6", "SK hynix AiM GDDR6 (ISSCC 2022)", 16, 16, 16, 2048, 32, 16, 1.0, 18, 18, 27, 1, 1, 24, 1900, 280,
     1, 2, 1, 8ull << 30, 1.1, 150.0, 1.0, 6.0},
    // UPMEM (Gomez-Luna et al., IEEE Access 2022): DPUs at 350 MHz, 64 MB MRAM and 64 KB WRAM each, 8
    // per chip; 40 ranks of 64 DPUs (2560). A DPU has no FP16 unit: one emulated MAC per 32 cycles;
    // MRAM is read by DMA in 2 KB transfers (the "row"), with ~61 cycles of setup
    {"upmem", "UPMEM PIM-DIMM (IEEE Access 2022)", 40, 64, 64, 2048, 2, 1, 1000.0 / 350.0, 61, 0, 0, 1, 1, 0, 0, 0,
     32, 4, 1, 2560ull * (64ull << 20), 2.0, 20.0, 30.0, 20.0},
    // NeuPIMs (Heo et al., ASPLOS 2024): 32 channels x 32 banks, 16 multipliers per bank, dual row
    // buffers (one computes while the other is activated); HBM timing
    {"neupims", "NeuPIMs (ASPLOS 2024)", 32, 32, 32, 1024, 32, 16, 1.0, 14, 14, 33, 4, 2, 16, 3900, 350, 4, 4, 2,
     32ull << 30, 0.9, 190.0, 1.0, 4.0},
};
#define N_PRESETS (sizeof presets / sizeof presets[0])

// --- types

struct pim_sim {
    pim_config_t c;
    int hd, elt;            // KV row: head_dim elements of elt bytes
    int tok_bytes;          // hd * elt
    int steps_tok;          // MAC steps per token
    int tpr;                // tokens per bank row
    int step;               // cycles per MAC step
    pim_bank_t bank;        // the busiest unit's bank (unit 0: every other unit has as much or less)
    uint64_t now;           // cycle the last pass ended
    uint64_t busy;          // cycles of every pass
    bool exact;             // simulate every row (tests); otherwise steady rows are skipped in pairs
    pim_counts_t n;
};

// --- helpers

static uint64_t umax(uint64_t a, uint64_t b) { return a > b ? a : b; }
static uint64_t cdiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// --- public API

int pim_preset(const char *name, pim_config_t *out) {
    for (size_t i = 0; i < N_PRESETS; i++)
        if (name && !strcmp(name, presets[i].name)) {
            *out = presets[i];
            return 0;
        }
    return -1;
}

const char *pim_preset_names(void) { return "hbm2-pim aim-gddr6 upmem neupims"; }

double pim_peak_flops(const pim_config_t *c) {
    const int step = c->tCCD_L > c->t_mac ? c->tCCD_L : c->t_mac;
    return 2.0 * c->channels * c->pus * c->lanes / (step * c->tck_ns * 1e-9);
}

void pim_bank_init(pim_bank_t *b) {
    memset(b, 0, sizeof *b);
    for (int u = 0; u < PIM_ROW_BUFFERS_MAX; u++) b->row[u] = -1;
}

uint64_t pim_bank_steps(const pim_config_t *c, pim_bank_t *b, int64_t row, int n, uint64_t now, pim_counts_t *cnt) {
    const uint64_t step = (uint64_t)(c->tCCD_L > c->t_mac ? c->tCCD_L : c->t_mac);
    const int rb = c->row_buffers < 1 ? 1 : c->row_buffers > PIM_ROW_BUFFERS_MAX ? PIM_ROW_BUFFERS_MAX : c->row_buffers;
    int u = -1;
    for (int i = 0; i < rb; i++)
        if (b->row[i] == row) u = i;
    uint64_t start;
    if (u >= 0) {
        start = umax(now, b->t_next);
        cnt->hits++;
    } else {
        u = 0; // a precharged buffer, else the one activated longest ago
        for (int i = 1; i < rb; i++)
            if (b->row[u] >= 0 && (b->row[i] < 0 || b->t_act[i] < b->t_act[u])) u = i;
        uint64_t act = now;
        if (b->row[u] >= 0) act = umax(umax(now, b->t_act[u] + (uint64_t)c->tRAS), b->t_done[u]) + (uint64_t)c->tRP;
        const uint64_t stagger = (uint64_t)((c->pus + 3) / 4 - 1) * (uint64_t)c->tFAW;
        start = umax(act + (uint64_t)c->tRCD + stagger, b->t_next);
        b->row[u] = row;
        b->t_act[u] = act;
        cnt->misses++;
        cnt->acts++;
    }
    const uint64_t end = start + (uint64_t)n * step;
    b->t_done[u] = end;
    b->t_next = end;
    cnt->steps += (uint64_t)n;
    return end;
}

pim_sim_t *pim_sim_new(const pim_config_t *c, int head_dim, int elt) {
    if (!c || head_dim < 1 || elt < 1 || c->channels < 1 || c->pus < 1 || c->col_bytes < 1 || c->row_bytes < 1)
        return NULL;
    pim_sim_t *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->c = *c;
    s->hd = head_dim;
    s->elt = elt;
    s->tok_bytes = head_dim * elt;
    s->steps_tok = (int)cdiv((uint64_t)s->tok_bytes, (uint64_t)c->col_bytes);
    s->tpr = c->row_bytes / s->tok_bytes > 0 ? c->row_bytes / s->tok_bytes : 1;
    s->step = c->tCCD_L > c->t_mac ? c->tCCD_L : c->t_mac;
    pim_bank_init(&s->bank);
    return s;
}

void pim_sim_free(pim_sim_t **self_p) {
    if (!self_p || !*self_p) return;
    free(*self_p);
    *self_p = NULL;
}

void pim_sim_set_exact(pim_sim_t *s, bool exact) { s->exact = exact; }

int64_t pim_sim_rows(const pim_sim_t *s, int n_ctx) {
    const uint64_t P = (uint64_t)s->c.channels * (uint64_t)s->c.pus;
    return (int64_t)cdiv(cdiv((uint64_t)n_ctx, P), (uint64_t)s->tpr);
}

uint64_t pim_sim_pass(pim_sim_t *s, int kind, int n_tok, int64_t base) {
    const pim_config_t *c = &s->c;
    const uint64_t P = (uint64_t)c->channels * (uint64_t)c->pus;
    const uint64_t n_loc = cdiv((uint64_t)n_tok, P); // the busiest unit's tokens
    // operands in: q broadcast to every channel (kind 0) or each unit's p values (kind 1)
    const uint64_t in_bytes = kind == 0 ? (uint64_t)s->tok_bytes : (uint64_t)c->pus * n_loc * (uint64_t)s->elt;
    const uint64_t t0 = s->now + cdiv(in_bytes, (uint64_t)c->col_bytes) * (uint64_t)c->t_buf_write;
    uint64_t end = t0;
    const uint64_t full = n_loc / (uint64_t)s->tpr, rest = n_loc % (uint64_t)s->tpr;
    const int steps_row = s->tpr * s->steps_tok;
    uint64_t end3 = 0;
    for (uint64_t r = 0; r < full; r++) {
        end = pim_bank_steps(c, &s->bank, base + (int64_t)r, steps_row, t0, &s->n);
        if (r == 3) end3 = end;
        if (r == 5 && !s->exact && full > 10) { // steady by now: rows 4, 5 repeat rows 2, 3; skip pairs
            const uint64_t period = end - end3, k = (full - 8) / 2;
            for (int u = 0; u < PIM_ROW_BUFFERS_MAX; u++) {
                if (s->bank.row[u] >= 0) s->bank.row[u] += (int64_t)(2 * k);
                s->bank.t_act[u] += k * period;
                s->bank.t_done[u] += k * period;
            }
            s->bank.t_next += k * period;
            s->n.acts += 2 * k;
            s->n.misses += 2 * k;
            s->n.steps += 2 * k * (uint64_t)steps_row;
            end += k * period;
            r += 2 * k;
        }
    }
    if (rest) end = pim_bank_steps(c, &s->bank, base + (int64_t)full, (int)rest * s->steps_tok, t0, &s->n);
    // results out over the channel's bus: a score per token, or a partial sum of head_dim F32 per unit
    const uint64_t out_bytes = kind == 0 ? (uint64_t)c->pus * n_loc * 2 : (uint64_t)c->pus * (uint64_t)s->hd * 4;
    end += cdiv(out_bytes, (uint64_t)c->col_bytes) * (uint64_t)c->tCCD_S;
    // every unit's work and the bytes that crossed
    const uint64_t per = (uint64_t)n_tok / P, extra = (uint64_t)n_tok % P;
    s->n.unit_steps += (uint64_t)n_tok * (uint64_t)s->steps_tok;
    s->n.unit_acts += (P - extra) * cdiv(per, (uint64_t)s->tpr) + extra * cdiv(per + 1, (uint64_t)s->tpr);
    s->n.io_bytes += kind == 0 ? (uint64_t)c->channels * (uint64_t)s->tok_bytes + (uint64_t)n_tok * 2
                               : (uint64_t)n_tok * (uint64_t)s->elt + P * (uint64_t)s->hd * 4;
    const uint64_t cycles = end - s->now;
    s->now = end;
    s->busy += cycles;
    return cycles;
}

uint64_t pim_sim_write(pim_sim_t *s, uint64_t bytes) {
    const pim_config_t *c = &s->c;
    const uint64_t cycles = cdiv(bytes, (uint64_t)c->col_bytes * (uint64_t)c->channels) * (uint64_t)c->tCCD_S;
    s->now += cycles;
    s->busy += cycles;
    s->n.io_bytes += bytes;
    return cycles;
}

uint64_t pim_refresh_cycles(const pim_config_t *c, uint64_t busy) {
    return c->tREFI > 0 ? busy + busy / (uint64_t)c->tREFI * (uint64_t)c->tRFC : busy;
}

void pim_sim_stats(const pim_sim_t *s, pim_sim_stats_t *out) {
    memset(out, 0, sizeof *out);
    if (!s) return;
    const pim_config_t *c = &s->c;
    out->n = s->n;
    out->cycles = pim_refresh_cycles(c, s->busy);
    out->time_ms = (double)out->cycles * c->tck_ns * 1e-6;
    out->energy_mj = (double)s->n.unit_acts * c->e_act_nj * 1e-6 + (double)s->n.unit_steps * c->e_col_pj * 1e-9 +
                     (double)s->n.unit_steps * c->lanes * c->e_mac_pj * 1e-9 + (double)s->n.io_bytes * c->e_io_pj * 1e-9;
}
