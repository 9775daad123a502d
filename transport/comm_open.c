// The table of transport backends by name, and the "fault:" prefix that wraps any of them.
#include "transport/comm_open.h"

#include <stdio.h>
#include <string.h>

#include "core/err.h"
#include "transport/comm_inproc.h"
#include "transport/comm_link.h"
#include "transport/comm_mpi.h"
#include "transport/comm_zmq.h"

// --- types

typedef struct {
    const char *name;                                                   // what comm_open is given
    int (*open)(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen); // in the backend's file
} backend_t;

// The one list of backends.
static const backend_t BACKENDS[] = {
    {"zmq", comm_zmq_open},
    {"mpi", comm_mpi_open},
    {"inproc", comm_inproc_open},
    {"link", comm_link_open},
};

#define FAULT_PREFIX "fault:"

// --- helpers

// Wraps *c with the spec the options or the environment name. 0 or MLM_E* with err.
static int wrap(comm_t **c, const comm_open_opts_t *o, const char *inner, char *err, size_t errlen) {
    fault_spec_t *owned = NULL;
    const fault_spec_t *spec = o ? o->fault_spec : NULL;
    int rc = 0;
    if (!spec && o && o->faults) rc = fault_parse(o->faults, &owned, err, errlen);
    else if (!spec) rc = fault_from_env(&owned, err, errlen);
    if (rc != 0) return rc;
    if (!spec) spec = owned;
    if (!spec) return mlm_fail(err, errlen, MLM_EINVAL, "fault:%s: no fault spec (options or $MESHLM_FAULTS)", inner);
    // a cut link loses its peer after the heartbeat, as the backend's own heartbeat would
    fault_wrap_opts_t wo = {.heartbeat_ms = o && o->heartbeat_ivl_ms > 0 ? o->heartbeat_ivl_ms + o->heartbeat_timeout_ms : 0,
                            .fail_on_any_loss = o && o->fail_on_any_loss, .reliable = true};
    rc = comm_fault_wrap_opts(c, spec, &wo, err, errlen);
    fault_free(&owned);
    return rc;
}

// --- public API

const char *comm_open_name(int i) {
    return i >= 0 && (size_t)i < sizeof BACKENDS / sizeof BACKENDS[0] ? BACKENDS[i].name : NULL;
}

int comm_open(comm_t **out, const char *name, const comm_open_opts_t *o, char *err, size_t errlen) {
    if (out) *out = NULL;
    if (!out || !name) return mlm_fail(err, errlen, MLM_EINVAL, "comm_open: no backend name");
    if (strncmp(name, FAULT_PREFIX, strlen(FAULT_PREFIX)) == 0) {
        const char *inner = name + strlen(FAULT_PREFIX);
        comm_t *c = NULL;
        int rc = comm_open(&c, inner, o, err, errlen);
        if (rc == 0) rc = wrap(&c, o, inner, err, errlen);
        if (rc != 0) {
            comm_destroy(&c);
            return rc;
        }
        *out = c;
        return 0;
    }
    for (size_t i = 0; i < sizeof BACKENDS / sizeof BACKENDS[0]; i++)
        if (strcmp(name, BACKENDS[i].name) == 0) {
            int rc = BACKENDS[i].open(out, o, err, errlen);
            if (rc != 0) comm_destroy(out);
            return rc;
        }
    char known[128] = ""; // the names, comma-separated
    for (int i = 0; comm_open_name(i); i++) {
        size_t k = strlen(known);
        snprintf(known + k, sizeof known - k, "%s%s", i ? ", " : "", comm_open_name(i));
    }
    return mlm_fail(err, errlen, MLM_EINVAL, "unknown transport '%s' (%s, or fault:<one of them>)", name, known);
}
