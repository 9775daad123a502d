// libFuzzer target: fault specs (a worker parses the coordinator's spec from its HELLO: schedules,
// windows, disk rules, the board) and stamp frames (every emulated link strips one from each message
// it receives).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "transport/fault.h"

// --- helpers

// The first byte picks what the rest is: a spec text, or the frames of a received message.
static void fuzz_spec(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return;
    memcpy(text, data, size);
    text[size] = 0;
    fault_spec_t *s = NULL;
    char err[256];
    if (fault_parse(text, &s, err, sizeof err) == 0) {
        // The canonical text parses back to itself.
        char *canon = strdup(fault_spec_text(s));
        fault_spec_t *t = NULL;
        if (!canon || fault_parse(canon, &t, err, sizeof err) != 0 || strcmp(canon, fault_spec_text(t)) != 0) abort();
        for (int a = 0; a < 4; a++) {
            for (int b = 0; b < 4; b++) {
                fault_link_t p;
                fault_link_params(s, a, b, &p);
                fault_decision_t d;
                fault_decide(s, a, b, (uint64_t)(a * 7 + b), &d);
                fault_path_t pa;
                fault_path_init(&pa, s, a, b);
                (void)fault_path_admit(&pa, 1000, 64, 2000);
            }
        }
        for (int i = 0; i < fault_n_events(s); i++) {
            const fault_event_t *e = fault_event(s, i);
            if (!e || e->slot != i) abort();
            const int w = fault_pick_worker(s, i, 3);
            if (w < 1 || (e->worker == FAULT_ANY && w > 3)) abort();
            (void)fault_event_cuts(e, 0, 1);
        }
        for (int w = 0; w < 4; w++) {
            fault_disk_t d;
            fault_disk(s, w, &d);
            if (!(d.slow >= 1)) abort();
        }
        // The setters and a restriction to fewer workers keep the text canonical.
        fault_spec_t *r = NULL;
        if (fault_restrict(s, 2, &r, err, sizeof err) == 0) {
            fault_spec_t *rr = NULL;
            if (fault_parse(fault_spec_text(r), &rr, err, sizeof err) != 0 || strcmp(fault_spec_text(r), fault_spec_text(rr)) != 0)
                abort();
            if (fault_n_events(r) > fault_n_events(s)) abort();
            fault_free(&rr);
        }
        fault_free(&r);
        if (fault_set_seed(t, 42) == 0 && fault_set_board(t, "/tmp/fuzz-board") == 0) {
            fault_spec_t *u = NULL;
            if (fault_parse(fault_spec_text(t), &u, err, sizeof err) != 0 || fault_seed(u) != 42 ||
                strcmp(fault_board_path(u), "/tmp/fuzz-board") != 0)
                abort();
            fault_free(&u);
        }
        fault_free(&t);
        free(canon);
    }
    fault_free(&s);
    free(text);
}

static void fuzz_stamp(const uint8_t *data, size_t size) {
    // Frames: each one's length is the next byte (mod 40), taken from the rest of the input.
    comm_msg_t m;
    memset(&m, 0, sizeof m);
    size_t at = 0;
    while (at < size && m.n < COMM_MAX_FRAMES) {
        size_t len = data[at++] % 40;
        if (len > size - at) len = size - at;
        m.data[m.n] = malloc(len ? len : 1);
        if (!m.data[m.n]) break;
        memcpy(m.data[m.n], data + at, len);
        m.len[m.n++] = len;
        at += len;
    }
    int64_t ns = 0;
    (void)fault_stamp_strip(&m, &ns);
    comm_msg_free(&m);
}

// --- public API

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0 || size > 8192) return 0;
    if (data[0] & 1) fuzz_spec(data + 1, size - 1);
    else fuzz_stamp(data + 1, size - 1);
    return 0;
}
